"""What callers ask a dataset table (paths, labels, boxes and categories of ids, row subsets, counts) through methods,
so no module outside lookalike.core spells its column names."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.core.errors import TableError
from lookalike.core.table import load_table
from lookalike.data.pairs import load_pairs
from test_table import row, valid_rows, write_table


@pytest.fixture
def table(tmp_path):
    rows = valid_rows()
    for i, r in enumerate(rows):
        r.update(x_1=str(i), y_1="0", x_2=str(i + 10), y_2="5", category="shoe" if i % 2 else "bag")
    rows[3].update(x_1="", y_1="", x_2="", y_2="")
    rows.append(row("cat", "d/1.png", "validation", "True", "False", domain="sketch", category="bag"))
    return load_table(write_table(tmp_path, rows))


def test_paths_and_labels_in_row_order(table):
    assert table.paths.tolist() == ["a/1.png", "a/2.png", "b/1.png", "b/2.png", "c/1.png", "c/2.png", "d/1.png"]
    assert table.labels.tolist() == ["0", "0", "1", "1", "2", "2", "cat"]  # one label is not an integer: all str


def test_labels_of_follow_the_ids_order(table):
    assert table.labels_of(np.array(["c/2.png", "a/1.png", "d/1.png"])).tolist() == ["2", "0", "cat"]
    assert table.labels_of([]).tolist() == []


def test_an_id_not_in_the_table_is_one_error_naming_it(table):
    with pytest.raises(TableError, match=r"^query id 'x/9.png' is not a path of the dataset table .*table.csv$"):
        table.labels_of(["a/1.png", "x/9.png"], what="query id")
    with pytest.raises(TableError, match="'nope.png' is not a path"):
        table.rows_of(["nope.png"])
    assert table.labels_of(["x/9.png", "b/1.png"], missing="").tolist() == ["", "1"]


def test_rows_boxes_categories_and_values_of_ids(table):
    assert table.rows_of(["b/2.png", "a/1.png"]).tolist() == [3, 0]
    assert table.rows_of(["b/2.png"]).dtype == np.int64
    boxes = table.boxes_of(["c/1.png", "b/2.png"])
    assert boxes.shape == (2, 4) and boxes[0].tolist() == [4.0, 0.0, 14.0, 5.0] and np.isnan(boxes[1]).all()
    assert table.categories_of(["a/2.png", "c/1.png"]).tolist() == ["shoe", "bag"]
    assert table.values_of("domain", ["d/1.png", "a/1.png"]).tolist() == ["sketch", ""]
    assert table.values_of("sequence", ["a/1.png"], default=None).tolist() == [None]


def test_optional_columns_absent(tmp_path):
    plain = load_table(write_table(tmp_path, valid_rows()))
    assert plain.boxes_of(["a/1.png"]) is None and plain.categories_of(["a/1.png"]) is None
    assert not plain.has_column("sequence") and plain.column("sequence", None).tolist() == [None] * 6
    with pytest.raises(TableError, match=r"no column 'sequence'; found label, path, split, is_query, is_gallery"):
        plain.column("sequence")


def test_where_split_and_counts(table):
    val = table.split("validation")
    assert val.paths.tolist() == ["b/1.png", "b/2.png", "c/1.png", "c/2.png", "d/1.png"]
    assert val.rows_of(["b/1.png"]).tolist() == [0]  # re-indexed from 0, its own lookup
    picked = table.where(table.labels == "2")
    assert picked.paths.tolist() == ["c/1.png", "c/2.png"] and picked.source == table.source
    assert table.split_counts() == {"train": 2, "validation": 5}
    assert table.counts() == {
        "images": 7,
        "labels": 4,
        "train": 2,
        "validation": 5,
        "queries": 3,
        "gallery": 3,
        "domain ": 6,
        "domain sketch": 1,
    }


def test_with_rows_appends_an_unvalidated_row(table):
    more = table.with_rows({"path": ["/tmp/upload.png"], "label": [""]}, "<gallery + query>")
    assert len(more) == len(table) + 1 and more.source == "<gallery + query>"
    assert more.rows_of(["/tmp/upload.png"]).tolist() == [7] and more.labels_of(["/tmp/upload.png"]).tolist() == [""]
    assert more.image_paths()[-1].as_posix() == "/tmp/upload.png" and len(table) == 7


def test_pairs_table_columns_and_paths(tmp_path):
    (tmp_path / "l.png").touch()
    (tmp_path / "r.png").touch()
    (tmp_path / "pairs.csv").write_text("left,right\nl.png,r.png\n")
    pairs = load_pairs(tmp_path / "pairs.csv")
    assert pairs.column("left").tolist() == ["l.png"] and pairs.split_counts() == {"train": 1, "validation": 0}
    assert pairs.resolve("right") == [tmp_path / "r.png"] == pairs.image_paths("right")
