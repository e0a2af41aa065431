"""The pairs table: one CSV row per pair of images that look alike (`left`, `right`, optional `split`), validated."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath

import pandas as pd

from lookalike.core.errors import TableError
from lookalike.core.table import (
    RowTable,
    check_files_exist,
    check_non_empty,
    check_paths,
    check_split,
    column_names,
    first_bad,
    read_csv_cells,
    where,
)

PAIR_COLUMNS = ("left", "right")


@dataclass(frozen=True)
class PairsTable(RowTable):
    """A validated pairs table: one row per pair of images that look alike."""

    def image_paths(self, side: str) -> list[Path]:
        """Absolute paths of the 'left' or 'right' images, in row order."""
        return self.resolve(side)

    def save(self, path: str | os.PathLike) -> None:
        """Write the pairs as CSV atomically, paths relative to the CSV's folder."""
        self.write_csv(path, PAIR_COLUMNS)


def load_pairs(path: str | os.PathLike, root: str | os.PathLike | None = None, check_files: bool = True) -> PairsTable:
    """Read and validate a pairs CSV; `root` defaults to the CSV's folder."""
    path = Path(path)
    frame = read_csv_cells(path, "pairs table")
    return validate_pairs(frame, Path(root) if root is not None else path.parent, str(path), check_files)


def validate_pairs(
    frame: pd.DataFrame, root: str | os.PathLike, source: str = "<pairs>", check_files: bool = True
) -> PairsTable:
    """Check the columns and rows of a raw pairs table (no `split` column: every pair is 'train'); TableError names the
    row."""
    frame = frame.reset_index(drop=True).astype(str)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in PAIR_COLUMNS if c not in frame.columns]
    if missing:
        raise TableError(
            f"{source}: missing required column {missing[0]!r} (expected left, right and optionally split; found "
            f"{column_names(frame.columns)})"
        )
    if len(frame) == 0:
        raise TableError(f"{source}: the table has no rows")
    for col in PAIR_COLUMNS:
        check_paths(frame, col, source)
    if "split" not in frame.columns:
        frame["split"] = "train"
    check_split(frame, source)
    dup = frame.duplicated(list(PAIR_COLUMNS)).to_numpy()
    if dup.any():
        i = first_bad(dup)
        raise TableError(f"{where(source, i, 'right')}: duplicate pair ({frame['left'][i]!r}, {frame['right'][i]!r})")
    if check_files:
        for col in PAIR_COLUMNS:
            check_files_exist(frame, col, Path(root), source)
    return PairsTable(frame, Path(root), source)


def read_name_list(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """The file names in one column of a CSV with a header, such as the published TLL_obj.csv (an unnamed index column,
    then `TLL_obj`); without `column`, the CSV's only named column."""
    path = Path(path)
    frame = read_csv_cells(path, "list of file names")
    named = [c for c in frame.columns if c]
    if column is None and len(named) != 1:
        raise TableError(
            f"{path}: expected one named column of file names, found {column_names(frame.columns)}; name the column to "
            "use"
        )
    column = named[0] if column is None else column
    if column not in frame.columns:
        raise TableError(f"{path}: no column {column!r}; found {column_names(frame.columns)}")
    check_non_empty(frame, column, str(path))
    return frame[column].str.strip().tolist()


def subset_pairs(pairs: PairsTable, names: list[str], source: str = "<names>") -> PairsTable:
    """The pairs whose left or right image has one of `names` as file name, in table order; a name that matches no
    pair is an error that lists such names."""
    wanted = set(names)
    left, right = (pd.Series(pairs.column(side)).map(lambda p: PurePath(p).name) for side in PAIR_COLUMNS)
    unmatched = sorted(wanted - set(left) - set(right))
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (", ..." if len(unmatched) > 5 else "")
        raise TableError(f"{source}: {len(unmatched)} file names match no pair of {pairs.source} ({shown})")
    keep = (left.isin(wanted) | right.isin(wanted)).to_numpy()
    return pairs.where(keep)
