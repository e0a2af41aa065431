"""The dataset table: loading an OML-format CSV, every validation error, split and atomic save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lookalike.core.errors import LookalikeError, TableError
from lookalike.core.table import REQUIRED_COLUMNS, DatasetTable, load_table, validate_table


def row(label="0", path="a/1.png", split="validation", is_query="True", is_gallery="True", **extra) -> dict:
    return {"label": label, "path": path, "split": split, "is_query": is_query, "is_gallery": is_gallery, **extra}


def valid_rows() -> list[dict]:
    """Two train rows (roles left empty) and four validation rows, two classes each."""
    return [
        row("0", "a/1.png", "train", "", ""),
        row("0", "a/2.png", "train", "", ""),
        row("1", "b/1.png", "validation", "True", "True"),
        row("1", "b/2.png", "validation", "False", "True"),
        row("2", "c/1.png", "validation", "1", "0"),
        row("2", "c/2.png", "validation", "0", "1"),
    ]


def write_table(
    directory: Path, rows: list[dict], name: str = "table.csv", create_files: bool = True, drop: tuple[str, ...] = ()
) -> Path:
    """Write `rows` as a CSV (every cell verbatim) and create an empty image file for each relative path."""
    frame = pd.DataFrame(rows, dtype=str).drop(columns=list(drop))
    path = directory / name
    frame.to_csv(path, index=False)
    if create_files:
        for r in rows:
            p = Path(r["path"])
            if r["path"].strip() and not p.is_absolute():
                (directory / p).parent.mkdir(parents=True, exist_ok=True)
                (directory / p).touch()
    return path


def load_error(path: Path, match: str, **kwargs) -> TableError:
    """load_table must raise a one-line TableError matching `match`."""
    with pytest.raises(TableError, match=match) as info:
        load_table(path, **kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, LookalikeError) and isinstance(info.value, ValueError)
    return info.value


# --- loading a valid table ---------------------------------------------------------------------


def test_valid_table_loads(tmp_path):
    table = load_table(write_table(tmp_path, valid_rows()))
    frame = table.frame
    assert isinstance(table, DatasetTable)
    assert len(table) == 6
    assert list(frame.columns)[:5] == list(REQUIRED_COLUMNS)
    assert frame["label"].dtype == np.int64
    assert frame["label"].tolist() == [0, 0, 1, 1, 2, 2]
    assert frame["split"].tolist() == ["train"] * 2 + ["validation"] * 4
    assert frame["is_query"].dtype == bool and frame["is_gallery"].dtype == bool
    assert frame["is_query"].tolist() == [False, False, True, False, True, False]
    assert frame["is_gallery"].tolist() == [False, False, True, True, False, True]
    assert table.root == tmp_path
    assert table.source == str(tmp_path / "table.csv")
    assert not table.has_bbox


def test_labels_are_strings_when_any_is_not_an_integer(tmp_path):
    rows = valid_rows()
    rows[5]["label"] = "cat"
    frame = load_table(write_table(tmp_path, rows)).frame
    assert frame["label"].tolist() == ["0", "0", "1", "1", "2", "cat"]
    assert all(isinstance(v, str) for v in frame["label"])


def test_labels_are_stripped(tmp_path):
    rows = valid_rows()
    rows[0]["label"] = " 0 "
    rows[5]["label"] = " dog "
    frame = load_table(write_table(tmp_path, rows)).frame
    assert frame["label"][0] == "0" and frame["label"][5] == "dog"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("True", True),
        ("False", False),
        ("1", True),
        ("0", False),
        ("true", True),
        ("FALSE", False),
        (" yes ", True),
        ("no", False),
    ],
)
def test_bool_spellings(tmp_path, text, value):
    rows = [
        row("1", "b/1.png", is_query="True", is_gallery="True"),
        row("1", "b/2.png", is_query=text, is_gallery="True"),
    ]
    frame = load_table(write_table(tmp_path, rows)).frame
    assert frame["is_query"][1] is np.bool_(value)


def test_train_rows_may_leave_roles_empty(tmp_path):
    rows = [row("0", "a/1.png", "train", "", ""), row("0", "a/2.png", "train", "True", "0")]
    frame = load_table(write_table(tmp_path, rows)).frame
    assert frame["is_query"].tolist() == [False, True]
    assert frame["is_gallery"].tolist() == [False, False]


def test_table_without_validation_rows_needs_no_query_or_gallery(tmp_path):
    rows = [row("0", "a/1.png", "train", "", ""), row("1", "a/2.png", "train", "", "")]
    assert len(load_table(write_table(tmp_path, rows))) == 2


def test_relative_paths_resolve_against_csv_folder_absolute_kept(tmp_path):
    outside = tmp_path / "elsewhere" / "x.png"
    outside.parent.mkdir()
    outside.touch()
    data = tmp_path / "data"
    data.mkdir()
    rows = valid_rows()
    rows[1]["path"] = str(outside)
    table = load_table(write_table(data, rows))
    paths = table.image_paths()
    assert paths[0] == data / "a" / "1.png"
    assert paths[1] == outside
    assert all(p.is_file() for p in paths)


def test_root_argument_overrides_csv_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_table(images, valid_rows())  # images live under images/
    csv = tmp_path / "tables" / "t.csv"
    csv.parent.mkdir()
    (images / "table.csv").rename(csv)
    load_error(csv, r"row 1 \(line 2\), column 'path': image file not found")
    table = load_table(csv, root=images)
    assert table.root == images
    assert table.image_paths()[2] == images / "b" / "1.png"


def test_check_files_false_skips_the_file_check(tmp_path):
    table = load_table(write_table(tmp_path, valid_rows(), create_files=False), check_files=False)
    assert len(table) == 6


def test_split(tmp_path):
    table = load_table(write_table(tmp_path, valid_rows()))
    val = table.split("validation")
    assert len(val) == 4
    assert list(val.frame.index) == [0, 1, 2, 3]
    assert val.frame["path"].tolist() == ["b/1.png", "b/2.png", "c/1.png", "c/2.png"]
    assert (val.frame["split"] == "validation").all()
    assert val.root == table.root and val.source == table.source
    train = table.split("train")
    assert train.frame["path"].tolist() == ["a/1.png", "a/2.png"]
    with pytest.raises(TableError, match=r"unknown split 'test'; expected one of train, validation"):
        table.split("test")


def test_bbox_columns_parsed(tmp_path):
    rows = valid_rows()
    for i, r in enumerate(rows):
        r.update(x_1=str(i), y_1="0", x_2=str(i + 10), y_2="5.5")
    rows[3].update(x_1="", y_1="", x_2="", y_2="")  # a row may have no box at all
    table = load_table(write_table(tmp_path, rows))
    assert table.has_bbox
    assert table.frame["x_2"][0] == 10.0 and table.frame["y_2"][0] == 5.5
    assert table.frame[["x_1", "y_1", "x_2", "y_2"]].iloc[3].isna().all()


def test_sequence_empty_cells_become_nan(tmp_path):
    rows = valid_rows()
    for i, r in enumerate(rows):
        r["sequence"] = "s1" if i < 2 else ""
    frame = load_table(write_table(tmp_path, rows)).frame
    assert frame["sequence"][0] == "s1"
    assert frame["sequence"][2:].isna().all()


def test_save_round_trips(tmp_path):
    rows = valid_rows()
    rows[0].update(x_1="1", y_1="2", x_2="3", y_2="4")
    for r in rows[1:]:
        r.update(x_1="", y_1="", x_2="", y_2="")
    table = load_table(write_table(tmp_path, rows))
    out = tmp_path / "saved.csv"
    table.save(out)
    again = load_table(out)
    pd.testing.assert_frame_equal(again.frame, table.frame, check_dtype=False)
    assert again.frame["label"].dtype == np.int64 and again.frame["is_query"].dtype == bool
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["saved.csv", "table.csv"]  # no temp file left


def test_save_creates_missing_folders_and_overwrites(tmp_path):
    table = load_table(write_table(tmp_path, valid_rows()))
    out = tmp_path / "new" / "dir" / "t.csv"
    out.parent.mkdir(parents=True)
    out.write_text("old contents\n")
    table.save(out)
    assert "old contents" not in out.read_text()
    again = load_table(out)  # paths were rewritten relative to the new CSV's folder
    assert again.frame["path"][0] == "../../a/1.png"
    assert [p.resolve() for p in again.image_paths()] == [p.resolve() for p in table.image_paths()]


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    table = load_table(write_table(tmp_path, valid_rows()))
    out = tmp_path / "out.csv"
    out.write_text("previous\n")

    def broken_to_csv(self, path, *args, **kwargs):
        Path(path).write_text("label,pa")  # half a file, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken_to_csv)
    with pytest.raises(OSError, match="disk full"):
        table.save(out)
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["out.csv", "table.csv"]


# --- validation errors -------------------------------------------------------------------------


@pytest.mark.parametrize("column", REQUIRED_COLUMNS[1:])
def test_missing_required_column(tmp_path, column):
    path = write_table(tmp_path, valid_rows(), drop=(column,))
    err = load_error(
        path, rf"missing required column '{column}' \(expected columns label, path, split, is_query, is_gallery; found "
    )
    assert str(err).startswith(str(path))


def test_a_table_without_labels_is_a_gallery_table(tmp_path):
    path = write_table(tmp_path, valid_rows(), drop=("label", "split", "is_query", "is_gallery"))
    table = load_table(path)
    assert not table.has_labels and table.split_counts() == {"train": 0, "validation": len(table)}
    assert table.column("is_query").all() and table.column("is_gallery").all()  # every image queries the others
    with pytest.raises(TableError, match=r"table\.csv: has no label column; evaluate needs labels$"):
        table.require_labels("evaluate")
    load_error(
        write_table(tmp_path, valid_rows(), drop=("label", "path")),
        r"missing required column 'path' \(expected "
        r"columns path \(a gallery table without labels\); found ",
    )


def test_column_names_are_stripped(tmp_path):
    path = write_table(tmp_path, valid_rows())
    text = path.read_text().splitlines()
    text[0] = " label , path,split , is_query,is_gallery"
    path.write_text("\n".join(text) + "\n")
    assert len(load_table(path)) == 6


def test_empty_table(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(",".join(REQUIRED_COLUMNS) + "\n")
    load_error(path, r"t\.csv: the table has no rows$")


# (row index to edit, column, new value, expected message), for the first six valid rows.
ROW_ERRORS = [
    pytest.param(
        1,
        "is_query",
        "maybe",
        r"row 2 \(line 3\), column 'is_query': expected a boolean \(True/False or 1/0\), got 'maybe'",
        id="bad-bool-train",
    ),
    pytest.param(
        3,
        "is_gallery",
        "yes please",
        r"row 4 \(line 5\), column 'is_gallery': expected a boolean .*got 'yes please'",
        id="bad-bool-val",
    ),
    pytest.param(
        2,
        "is_query",
        "",
        r"row 3 \(line 4\), column 'is_query': expected a boolean .*got ''",
        id="empty-bool-val-query",
    ),
    pytest.param(
        4,
        "is_gallery",
        " ",
        r"row 5 \(line 6\), column 'is_gallery': expected a boolean .*got ' '",
        id="empty-bool-val-gallery",
    ),
    pytest.param(
        1,
        "split",
        "test",
        r"row 2 \(line 3\), column 'split': expected 'train' or 'validation', got 'test'",
        id="unknown-split",
    ),
    pytest.param(
        0, "split", "", r"row 1 \(line 2\), column 'split': expected 'train' or 'validation', got ''", id="empty-split"
    ),
    pytest.param(
        2, "label", "", r"row 3 \(line 4\), column 'label': expected a value, got an empty cell", id="empty-label"
    ),
    pytest.param(
        5, "label", "   ", r"row 6 \(line 7\), column 'label': expected a value, got an empty cell", id="blank-label"
    ),
    pytest.param(
        3, "path", "", r"row 4 \(line 5\), column 'path': expected a value, got an empty cell", id="empty-path"
    ),
]


@pytest.mark.parametrize(("index", "column", "value", "match"), ROW_ERRORS)
def test_row_errors_name_row_and_column(tmp_path, index, column, value, match):
    rows = valid_rows()
    rows[index][column] = value
    path = write_table(tmp_path, rows)
    err = load_error(path, match)
    assert str(err).startswith(f"{path}, row {index + 1} (line {index + 2}), column '{column}': ")


def test_first_bad_row_is_reported(tmp_path):
    rows = valid_rows()
    rows[4]["split"] = "nope"
    rows[1]["split"] = "bad"
    load_error(write_table(tmp_path, rows), r"row 2 \(line 3\), column 'split': .*got 'bad'")


def test_missing_image_file(tmp_path):
    path = write_table(tmp_path, valid_rows())
    (tmp_path / "b" / "2.png").unlink()
    load_error(path, r"row 4 \(line 5\), column 'path': image file not found: .*b/2\.png$")


def test_missing_absolute_image_file(tmp_path):
    rows = valid_rows()
    rows[0]["path"] = str(tmp_path / "nowhere" / "x.png")
    load_error(write_table(tmp_path, rows), r"row 1 \(line 2\), column 'path': image file not found: .*nowhere/x\.png$")


def test_validation_rows_without_query(tmp_path):
    rows = valid_rows()
    for r in rows[2:]:
        r["is_query"] = "False"
    rows[0]["is_query"] = "True"  # a train query does not count
    load_error(
        write_table(tmp_path, rows), r"column 'is_query': validation rows have no query; expected at least one True$"
    )


def test_validation_rows_without_gallery(tmp_path):
    rows = valid_rows()
    for r in rows[2:]:
        r["is_gallery"] = "0"
    rows[1]["is_gallery"] = "1"
    load_error(
        write_table(tmp_path, rows),
        r"column 'is_gallery': validation rows have no gallery; expected at least one True$",
    )


def test_duplicate_paths_name_both_rows(tmp_path):
    rows = valid_rows()
    rows[4]["path"] = "a/2.png"
    load_error(
        write_table(tmp_path, rows),
        r"row 5 \(line 6\), column 'path': duplicate path 'a/2\.png' \(first seen in row 2\)$",
    )


def bbox_rows(**changes) -> list[dict]:
    """Valid rows with a 0,0,10,10 box each; `changes` maps 'x_2_3' (column_rowindex) to a new cell."""
    rows = valid_rows()
    for r in rows:
        r.update(x_1="0", y_1="0", x_2="10", y_2="10")
    for key, value in changes.items():
        col, index = key.rsplit("_", 1)
        rows[int(index)][col] = value
    return rows


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        pytest.param(
            {"x_1_2": "abc"}, r"row 3 \(line 4\), column 'x_1': expected a number, got 'abc'", id="not-a-number"
        ),
        pytest.param(
            {"y_2_0": "1,5"}, r"row 1 \(line 2\), column 'y_2': expected a number, got '1,5'", id="comma-decimal"
        ),
        pytest.param(
            {"x_2_1": ""},
            r"row 2 \(line 3\), column 'x_2': expected a number \(a bbox needs all four corners\), got an empty cell",
            id="partial",
        ),
        pytest.param(
            {"x_1_4": "", "y_1_4": ""},
            r"row 5 \(line 6\), column 'x_1': expected a number \(a bbox needs all four corners\)",
            id="partial-two",
        ),
        pytest.param(
            {"x_2_3": "0"},
            r"row 4 \(line 5\), column 'x_2': expected x_1 < x_2 and y_1 < y_2, got box \[0\.0, 0\.0, 0\.0, 10\.0\]",
            id="x-inverted",
        ),
        pytest.param(
            {"y_1_5": "20"},
            r"row 6 \(line 7\), column 'y_2': expected x_1 < x_2 and y_1 < y_2, got box \[0\.0, 20\.0, 10\.0, 10\.0\]",
            id="y-inverted",
        ),
    ],
)
def test_bbox_errors(tmp_path, changes, match):
    load_error(write_table(tmp_path, bbox_rows(**changes)), match)


@pytest.mark.parametrize("absent", ["x_1", "y_2"])
def test_bbox_missing_one_column(tmp_path, absent):
    path = write_table(tmp_path, bbox_rows(), drop=(absent,))
    load_error(path, rf"table\.csv: bbox column '{absent}' missing; expected all of x_1, y_1, x_2, y_2 or none$")


def test_nonexistent_csv(tmp_path):
    load_error(tmp_path / "missing.csv", r"missing\.csv: no such dataset table$")


def test_directory_is_not_a_csv(tmp_path):
    load_error(tmp_path, r"no such dataset table$")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        pytest.param(b"", r"not a readable CSV \(", id="empty-file"),
        pytest.param(
            b"label,path\n1,2\n1,2,3,4\n",
            r"not a readable CSV \(Error tokenizing data.*Expected 2 fields in line 3, saw 4\)$",
            id="ragged",
        ),
    ],
)
def test_unreadable_csv(tmp_path, content, match):
    path = tmp_path / "t.csv"
    path.write_bytes(content)
    load_error(path, rf"t\.csv: {match}")


def test_validate_table_frame_with_any_index():
    frame = pd.DataFrame(
        [row("0", "x.png", "train"), row("1", "y.png", "oops"), row("2", "z.png", "train")], index=[7, 3, 9]
    )
    with pytest.raises(TableError, match=r"<table>, row 2 \(line 3\), column 'split': .*got 'oops'"):
        validate_table(frame, ".", check_files=False)
    frame.loc[3, "split"] = "train"
    table = validate_table(frame, ".", check_files=False)
    assert list(table.frame.index) == [0, 1, 2]
    assert table.frame["label"].tolist() == [0, 1, 2]
