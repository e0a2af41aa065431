"""Property-based tests: no CSV, however broken, makes the table loaders crash; they accept it or raise TableError."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookalike.core.errors import TableError
from lookalike.core.table import BBOX_COLUMNS, REQUIRED_COLUMNS, load_table
from lookalike.data.pairs import load_pairs

# The same examples on every run (CI stays deterministic); raise max_examples and drop derandomize to search wider.
FUZZ = settings(
    max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
OPTIONAL_COLUMNS = ("category", "sequence", *BBOX_COLUMNS, "domain")  # the optional columns of the table format
COLUMNS = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, "left", "right", "extra", "", " label ", "\ufefflabel")
CELLS = (
    "",
    " ",
    "1",
    "0",
    "-3",
    "1.0",
    "1.5",
    "True",
    "false",
    "yes",
    "maybe",
    "train",
    "validation",
    " train ",
    "a.png",
    "b.png",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e400",
    "99999999999999999999",
    "None",
    "NA",
    "\x00",
    "caf\udce9",
    '"',
    "a,b",
    "\n",
    "x\ry",
)


def cell() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(CELLS), st.text(max_size=8))


def quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


@st.composite
def csv_text(draw) -> bytes:
    """A header of known (sometimes repeated or odd) column names and rows of tricky cells, sometimes ragged or
    unquoted."""
    header = draw(st.lists(st.sampled_from(COLUMNS), min_size=0, max_size=12))
    rows = draw(st.lists(st.lists(cell(), min_size=max(len(header) - 1, 0), max_size=len(header) + 1), max_size=6))
    quote = draw(st.booleans())
    lines = [",".join(quoted(c) if quote else c for c in line) for line in [header, *rows]]
    return "\n".join(lines).encode("utf-8", "surrogateescape")


def loads_or_table_error(load, data: bytes, check_files: bool):
    """Write `data` as a CSV beside two real files and load it; return the table, or None on a TableError."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "a.png").write_bytes(b"x")
        (Path(folder) / "b.png").write_bytes(b"x")
        path = Path(folder) / "t.csv"
        path.write_bytes(data)
        try:
            return load(path, check_files=check_files)
        except TableError as exc:
            assert "\n" not in str(exc).replace(
                repr("\n")[1:-1], ""
            )  # one line (a newline inside a quoted value is shown escaped)
            return None


def assert_well_formed(table) -> None:
    """What every accepted dataset table guarantees to the code that uses it."""
    frame = table.frame
    assert frame["split"].isin(["train", "validation"]).all()
    assert frame["is_query"].dtype == bool and frame["is_gallery"].dtype == bool
    assert not table.has_labels or frame["label"].dtype == np.int64 or frame["label"].map(type).eq(str).all()
    assert table.ids.tolist() == list(dict.fromkeys(table.ids))  # external ids unique
    assert frame["path"].is_unique and not frame["path"].str.contains("\x00").any()
    if table.has_bbox:
        box = frame[list(BBOX_COLUMNS)].to_numpy(float)
        assert not np.isinf(box).any()
        drawn = ~np.isnan(box).any(1)
        assert (box[drawn, 2] > box[drawn, 0]).all() and (box[drawn, 3] > box[drawn, 1]).all()


@FUZZ
@given(data=st.one_of(csv_text(), st.binary(max_size=300)), check_files=st.booleans())
def test_dataset_table_loader_never_crashes(data, check_files):
    table = loads_or_table_error(load_table, data, check_files)
    if table is not None:
        assert_well_formed(table)


@FUZZ
@given(data=st.one_of(csv_text(), st.binary(max_size=300)), check_files=st.booleans())
def test_pairs_loader_never_crashes(data, check_files):
    pairs = loads_or_table_error(load_pairs, data, check_files)
    if pairs is not None:
        assert pairs.frame["split"].isin(["train", "validation"]).all()
        assert not pairs.frame.duplicated(["left", "right"]).any()


@FUZZ
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["1", "2", "x"]),
            st.sampled_from(["a.png", "b.png"]),
            st.sampled_from(["train", "validation"]),
            st.sampled_from(["1", "0"]),
            st.sampled_from(["1", "0"]),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_valid_looking_tables_load_or_say_why(rows):
    """Tables in the right shape: loaded with the same rows, or refused for a reason the schema states."""
    text = "label,path,split,is_query,is_gallery\n" + "\n".join(",".join(r) for r in rows) + "\n"
    table = loads_or_table_error(load_table, text.encode(), True)
    frame = pd.DataFrame(rows, columns=["label", "path", "split", "is_query", "is_gallery"])
    val = frame[frame["split"] == "validation"]
    acceptable = frame["path"].is_unique and (
        val.empty or ((val["is_query"] == "1").any() and (val["is_gallery"] == "1").any())
    )
    assert (table is not None) == acceptable
    if table is not None:
        assert table.frame["path"].tolist() == frame["path"].tolist()
