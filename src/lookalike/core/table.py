"""The dataset table: one CSV row per image, in Open Metric Learning's column format, validated."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from lookalike.core.atomic import atomic_path
from lookalike.core.errors import TableError

# File names that are not valid UTF-8 are kept as surrogate escapes (os.listdir, CSVs read with surrogateescape).
# pandas 3 stores strings in Arrow when pyarrow is installed (milvus-lite installs it), and Arrow strings cannot hold
# surrogates, so lookalike keeps pandas' Python string storage, its default without pyarrow.
pd.set_option("mode.string_storage", "python")

REQUIRED_COLUMNS = ("label", "path", "split", "is_query", "is_gallery")  # of a labelled table
# a table without a label column is a gallery table: `path` alone is required, these fill what it leaves out (every row
# a validation query and gallery item, so `search` pairs every image with the others)
GALLERY_DEFAULTS = {"split": "validation", "is_query": "True", "is_gallery": "True"}
# the columns lookalike reads; every other column of a table is metadata, kept through `index` to search results
SCHEMA_COLUMNS = (*REQUIRED_COLUMNS, "id", "sequence", *("x_1", "y_1", "x_2", "y_2"))
BBOX_COLUMNS = ("x_1", "y_1", "x_2", "y_2")
SPLITS = ("train", "validation")
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


T = TypeVar("T", bound="RowTable")
_REQUIRED = object()  # `column(name)` without a default: an absent column is an error


@dataclass(frozen=True)
class RowTable:
    """A validated CSV table with a `split` column: `frame` holds the rows, `root` resolves relative paths.

    `frame` is core's own: code outside lookalike.core reads a table through the methods below (tests/test_architecture
    checks it), so the column names live here.
    """

    frame: pd.DataFrame
    root: Path
    source: str = "<table>"

    def __len__(self) -> int:
        return len(self.frame)

    def split(self: T, name: str) -> T:
        """The rows of one split ('train' or 'validation'), re-indexed from 0."""
        if name not in SPLITS:
            raise TableError(f"{self.source}: unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return self.where(self.frame["split"].to_numpy() == name)

    def where(self: T, mask: np.ndarray) -> T:
        """The rows where `mask` [N] (bool) is True, in table order and re-indexed from 0.

        Args:
            mask: one bool per row.

        Returns:
            A table of the same kind, root and source.
        """
        return replace(self, frame=self.frame[np.asarray(mask, dtype=bool)].reset_index(drop=True))

    def with_paths(self: T, paths: list[str] | np.ndarray) -> T:
        """The same rows with their `path` column replaced (e.g. resolved to absolute paths), one path per row."""
        if len(paths) != len(self):
            raise TableError(f"{self.source}: {len(paths)} paths for {len(self)} rows")
        return replace(self, frame=self.frame.assign(path=list(paths)))

    @property
    def column_names(self) -> list[str]:
        """The table's columns, in order (its own and any further ones, such as metadata)."""
        return [str(name) for name in self.frame.columns]

    def has_column(self, name: str) -> bool:
        """Whether the table has the (optional) column `name`."""
        return name in self.frame.columns

    def column(self, name: str, default: object = _REQUIRED) -> np.ndarray:
        """One column's values in row order.

        Args:
            name: the column ('label', 'split', 'left', 'sequence', ...).
            default: the value of every row when the table has no such column; without it an absent column is an
                error naming the column.

        Returns:
            np.ndarray [N] (object dtype when filled from `default`).
        """
        if name in self.frame.columns:
            return self.frame[name].to_numpy()
        if default is _REQUIRED:
            raise TableError(f"{self.source}: no column {name!r}; found {column_names(self.frame.columns)}")
        return np.full(len(self), default, dtype=object)

    def split_counts(self) -> dict[str, int]:
        """Rows per split, every split named (0 when it has none): {'train': n, 'validation': m}."""
        counts = self.frame["split"].value_counts()
        return {name: int(counts.get(name, 0)) for name in SPLITS}

    def resolve(self, column: str) -> list[Path]:
        """The absolute file paths of a path column ('path', 'left', 'right'), in row order."""
        return [_resolve(self.root, p) for p in self.frame[column]]

    def write_csv(self, path: str | os.PathLike, path_columns: tuple[str, ...]) -> None:
        """Write the table as CSV atomically, `path_columns` made relative to the CSV's folder (see `save_csv`)."""
        save_csv(self.frame, path_columns, self.root, path)


@dataclass(frozen=True)
class DatasetTable(RowTable):
    """A validated dataset table: one row per image; a row's path is its id (in Embeddings and RetrievalResults)."""

    @property
    def paths(self) -> np.ndarray:
        """The paths as the table writes them (the ids of the rows' embeddings), str [N], in row order."""
        return self.frame["path"].to_numpy(str)

    @property
    def labels(self) -> np.ndarray:
        """The labels [N] in row order: int64 when every label is an integer, else str (object); a gallery table (no
        label column) is a TableError saying so."""
        self.require_labels("this step")
        return self.frame["label"].to_numpy()

    @property
    def has_labels(self) -> bool:
        """Whether the table has labels (False: a gallery table, fit for index/serve/search, not for evaluate/train)."""
        return "label" in self.frame.columns

    def require_labels(self, command: str) -> None:
        """One line for a command that needs labels run on a gallery table ("T.csv: has no label column; evaluate needs
        labels")."""
        if not self.has_labels:
            raise TableError(f"{self.source}: has no label column; {command} needs labels")

    @property
    def ids(self) -> np.ndarray:
        """The rows' external ids, str [N]: the `id` column, or the path as the table writes it; unique."""
        return self.frame["id"].to_numpy(str) if "id" in self.frame.columns else self.paths

    @property
    def metadata_columns(self) -> list[str]:
        """The columns lookalike does not read (SCHEMA_COLUMNS aside), kept as metadata, in table order."""
        return [c for c in self.frame.columns if c not in SCHEMA_COLUMNS]

    def metadata(self) -> pd.DataFrame:
        """The metadata columns as strings (empty cells ""), one row per table row, index 0..N-1."""
        return self.frame[self.metadata_columns].fillna("").astype(str).reset_index(drop=True)

    @property
    def has_bbox(self) -> bool:
        return all(c in self.frame.columns for c in BBOX_COLUMNS)

    @property
    def boxes(self) -> np.ndarray | None:
        """The bbox columns as float [N, 4] (NaN where a row has none), or None when the table has no bbox."""
        return self.frame[list(BBOX_COLUMNS)].to_numpy(float) if self.has_bbox else None

    @cached_property
    def _path_index(self) -> pd.Index:
        """Paths -> row positions (paths are unique in a validated table)."""
        return pd.Index(self.paths)

    def rows_of(self, ids: np.ndarray | list, what: str = "id") -> np.ndarray:
        """The row positions of ids (table paths).

        Args:
            ids: [M] paths of the table, e.g. a RetrievalResults' query_ids.
            what: how the error names an id ("query id", "rerank pairwise: gallery id", ...).

        Returns:
            int64 [M]; an id that is not a path of the table is a TableError naming it.
        """
        ids = np.asarray(ids).astype(str)
        rows = self._path_index.get_indexer(ids)
        if (rows < 0).any():
            raise TableError(f"{what} {str(ids[rows < 0][0])!r} is not a path of the dataset table {self.source}")
        return rows.astype(np.int64)

    def values_of(self, name: str, ids: np.ndarray | list, default: object = _REQUIRED, what: str = "id") -> np.ndarray:
        """One column's values for `ids` (table paths), in the order of `ids`.

        Args:
            name: the column.
            ids: [M] paths of the table.
            default: the value of every id when the table has no such column (see `column`).
            what: how an error names an id that is not in the table (see `rows_of`).

        Returns:
            np.ndarray [M].
        """
        return self.column(name, default)[self.rows_of(ids, what)]

    def labels_of(self, ids: np.ndarray | list, missing: object = _REQUIRED, what: str = "id") -> np.ndarray:
        """The labels of `ids` (table paths), in the order of `ids`.

        Args:
            ids: [M] paths.
            missing: the label of an id that is not in the table; without it such an id is an error naming it.
            what: how that error names the id (see `rows_of`).

        Returns:
            np.ndarray [M] of labels (object dtype when `missing` filled some).
        """
        if missing is _REQUIRED:
            return self.labels[self.rows_of(ids, what)]
        rows = self._path_index.get_indexer(np.asarray(ids).astype(str))
        return np.where(rows >= 0, self.labels.astype(object)[rows], missing)

    def categories_of(self, ids: np.ndarray | list, what: str = "id") -> np.ndarray | None:
        """The `category` of `ids` (table paths), or None when the table has no category column."""
        return self.values_of("category", ids, what=what) if self.has_column("category") else None

    def boxes_of(self, ids: np.ndarray | list, what: str = "id") -> np.ndarray | None:
        """The bboxes of `ids` (table paths) as float [M, 4] (NaN where a row has none), or None without bbox
        columns."""
        return self.boxes[self.rows_of(ids, what)] if self.has_bbox else None

    def counts(self) -> dict[str, int]:
        """Counts for the user: images, labels, train and validation rows, queries, gallery, and rows per domain."""
        val = self.frame["split"].to_numpy() == "validation"
        counts = {
            "images": len(self),
            "labels": int(self.frame["label"].nunique()) if self.has_labels else 0,
            **self.split_counts(),
            "queries": int((self.frame["is_query"].to_numpy(bool) & val).sum()),
            "gallery": int((self.frame["is_gallery"].to_numpy(bool) & val).sum()),
        }
        if self.has_column("domain"):
            counts |= {f"domain {k}": int(v) for k, v in self.frame["domain"].value_counts().sort_index().items()}
        return counts

    def with_rows(self, rows: dict[str, list], source: str) -> DatasetTable:
        """This table plus rows given column by column (e.g. an uploaded query's path and label), not validated.

        Args:
            rows: column -> values; columns not given are empty for the new rows.
            source: what errors call the new table.

        Returns:
            DatasetTable with the new rows after the old ones.
        """
        return DatasetTable(pd.concat([self.frame, pd.DataFrame(rows)], ignore_index=True), self.root, source)

    def image_paths(self) -> list[Path]:
        """Absolute image paths, in row order."""
        return self.resolve("path")

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as CSV atomically, paths made relative to the CSV's folder so `load_table(path)` finds
        them."""
        self.write_csv(path, ("path",))


def save_csv(frame: pd.DataFrame, path_columns: tuple[str, ...], root: Path, path: str | os.PathLike) -> None:
    """Write a table atomically with its path columns re-rooted at the CSV's folder (non-UTF-8 file names kept byte for
    byte)."""
    folder = Path(path).resolve().parent
    frame = frame.copy()
    for col in path_columns:
        frame[col] = [p if os.path.isabs(p) else os.path.relpath((root / p).resolve(), folder) for p in frame[col]]
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, errors="surrogateescape")


def _resolve(root: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def load_table(
    path: str | os.PathLike, root: str | os.PathLike | None = None, check_files: bool = True
) -> DatasetTable:
    """Read and validate a dataset CSV; `root` defaults to the CSV's folder.

    Args:
        path: the CSV (columns in README, "The dataset table").
        root: folder that relative image paths start from.
        check_files: fail when an image file is missing.

    Returns:
        DatasetTable; a bad cell is one error naming the row and column.

    Example:
        >>> import lookalike
        >>> len(lookalike.load_table("data/omniglot/omniglot.csv").split("validation"))
        820
    """
    path = Path(path)
    frame = read_csv_cells(path, "dataset table")
    return validate_table(frame, Path(root) if root is not None else path.parent, str(path), check_files)


def read_csv_cells(path: Path, what: str) -> pd.DataFrame:
    """Every cell of a CSV as a string, header row as column names; bytes that are not UTF-8 kept as in file names."""
    if not path.is_file():
        raise TableError(f"{path}: no such {what}")
    try:
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, encoding_errors="surrogateescape")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as exc:
        raise TableError(
            f"{path}: not a readable CSV ({(str(exc).splitlines() or [exc.__class__.__name__])[0]})"
        ) from None
    header = [str(c).strip().lstrip("\ufeff").strip() for c in raw.iloc[0]]
    dup = pd.Series(header).duplicated().to_numpy()
    if dup.any():
        raise TableError(f"{path}, line 1: column {header[first_bad(dup)]!r} appears twice; expected each column once")
    return pd.DataFrame(raw.iloc[1:].to_numpy(), columns=header)


def validate_table(
    frame: pd.DataFrame, root: str | os.PathLike, source: str = "<table>", check_files: bool = True
) -> DatasetTable:
    """Check every column and row of a raw table; raise TableError naming the first bad row and column."""
    frame = frame.reset_index(drop=True)  # positional row numbers in errors, whatever the index
    frame.columns = [str(c).strip().lstrip("\ufeff").strip() for c in frame.columns]
    frame = _with_gallery_defaults(frame, source)
    if len(frame) == 0:
        raise TableError(f"{source}: the table has no rows")
    frame = frame.astype({c: str for c in frame.columns if frame[c].dtype == object or c in REQUIRED_COLUMNS})
    root = Path(root)
    check_split(frame, source)
    check_paths(frame, "path", source)
    if "label" in frame.columns:
        check_non_empty(frame, "label", source)
        frame["label"] = _parse_labels(frame["label"])
    if "id" in frame.columns:
        _check_ids(frame, source)
    is_val = (frame["split"] == "validation").to_numpy()
    for col in ("is_query", "is_gallery"):
        frame[col] = _parse_bools(frame[col], col, is_val, source)
    _check_validation_roles(frame, is_val, source)
    _check_duplicate_paths(frame, source)
    if any(c in frame.columns for c in BBOX_COLUMNS):
        _parse_bbox(frame, source)
    if "sequence" in frame.columns:
        frame["sequence"] = frame["sequence"].replace("", np.nan)
    if check_files:
        check_files_exist(frame, "path", root, source)
    return DatasetTable(frame.reset_index(drop=True), root, source)


def _with_gallery_defaults(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """A labelled table must have every required column; a gallery table (no label) needs `path` and gets
    GALLERY_DEFAULTS for the columns it leaves out."""
    required = REQUIRED_COLUMNS if "label" in frame.columns else ("path",)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        expected = ", ".join(REQUIRED_COLUMNS) if "label" in frame.columns else "path (a gallery table without labels)"
        raise TableError(
            f"{source}: missing required column {missing[0]!r} (expected columns {expected}; "
            f"found {column_names(frame.columns)})"
        )
    absent = {c: v for c, v in GALLERY_DEFAULTS.items() if c not in frame.columns}
    return frame.assign(**absent) if "label" not in frame.columns and absent else frame


def _check_ids(frame: pd.DataFrame, source: str) -> None:
    """External ids: a value in every row, each id once (the first repeat named with the row it repeats)."""
    check_non_empty(frame, "id", source)
    frame["id"] = frame["id"].str.strip()
    dup = frame["id"].duplicated().to_numpy()
    if dup.any():
        i = first_bad(dup)
        first = int(np.flatnonzero((frame["id"] == frame["id"][i]).to_numpy())[0])
        raise TableError(f"{where(source, i, 'id')}: duplicate id {frame['id'][i]!r} (first seen in row {first + 1})")


def column_names(columns) -> str:
    """The columns found, comma-separated on one line (control characters escaped), or 'none'."""
    return ", ".join(repr(str(c))[1:-1] for c in columns) or "none"


def where(source: str, row: int, column: str) -> str:
    return f"{source}, row {row + 1} (line {row + 2}), column {column!r}"


def first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_split(frame: pd.DataFrame, source: str) -> None:
    split = frame["split"].str.strip()
    bad = ~split.isin(SPLITS).to_numpy()
    if bad.any():
        i = first_bad(bad)
        raise TableError(f"{where(source, i, 'split')}: expected 'train' or 'validation', got {frame['split'][i]!r}")
    frame["split"] = split


def check_non_empty(frame: pd.DataFrame, column: str, source: str) -> None:
    bad = (frame[column].str.strip() == "").to_numpy()
    if bad.any():
        raise TableError(f"{where(source, first_bad(bad), column)}: expected a value, got an empty cell")


def check_paths(frame: pd.DataFrame, column: str, source: str) -> None:
    """A file path in every cell: not empty, no NUL character."""
    check_non_empty(frame, column, source)
    bad = frame[column].str.contains("\x00", regex=False).to_numpy()
    if bad.any():
        raise TableError(
            f"{where(source, first_bad(bad), column)}: expected a file path, got {frame[column][first_bad(bad)]!r} "
            "(contains a NUL character)"
        )


def _parse_labels(labels: pd.Series) -> pd.Series:
    """Integer labels when every label is an integer that int64 holds exactly, strings otherwise."""
    stripped = labels.str.strip()
    if not stripped.str.fullmatch(r"[+-]?\d{1,18}(\.0*)?").all():
        return stripped
    return stripped.str.replace(r"\.0*$", "", regex=True).astype(np.int64)


def _parse_bools(values: pd.Series, column: str, required: np.ndarray, source: str) -> pd.Series:
    """Parse True/False/1/0/yes/no; empty is allowed (as False) only on train rows."""
    lowered = values.str.strip().str.lower()
    true, false, empty = lowered.isin(_TRUE).to_numpy(), lowered.isin(_FALSE).to_numpy(), (lowered == "").to_numpy()
    bad = ~(true | false | empty) | (empty & required)
    if bad.any():
        i = first_bad(bad)
        raise TableError(f"{where(source, i, column)}: expected a boolean (True/False or 1/0), got {values[i]!r}")
    return pd.Series(true, index=values.index)


def _check_validation_roles(frame: pd.DataFrame, is_val: np.ndarray, source: str) -> None:
    if not is_val.any():
        return
    for col, role in (("is_query", "query"), ("is_gallery", "gallery")):
        if not frame.loc[is_val, col].any():
            raise TableError(f"{source}, column {col!r}: validation rows have no {role}; expected at least one True")


def _check_duplicate_paths(frame: pd.DataFrame, source: str) -> None:
    dup = frame["path"].duplicated().to_numpy()
    if dup.any():
        i = first_bad(dup)
        first = int(np.flatnonzero((frame["path"] == frame["path"][i]).to_numpy())[0])
        raise TableError(
            f"{where(source, i, 'path')}: duplicate path {frame['path'][i]!r} (first seen in row {first + 1})"
        )


def _parse_bbox(frame: pd.DataFrame, source: str) -> None:
    """All four bbox columns or none; numbers with x_1 < x_2 and y_1 < y_2, or all empty for a row."""
    absent = [c for c in BBOX_COLUMNS if c not in frame.columns]
    if absent:
        raise TableError(
            f"{source}: bbox column {absent[0]!r} missing; expected all of {', '.join(BBOX_COLUMNS)} or none"
        )
    for col in BBOX_COLUMNS:
        text = frame[col].astype(str).str.strip()
        numbers = pd.to_numeric(text.replace("", np.nan), errors="coerce").astype(float)
        bad = ((numbers.isna() | np.isinf(numbers)) & (text != "")).to_numpy()
        if bad.any():
            i = first_bad(bad)
            raise TableError(f"{where(source, i, col)}: expected a number, got {frame[col][i]!r}")
        frame[col] = numbers
    box = frame[list(BBOX_COLUMNS)].to_numpy(dtype=float)
    partial = np.isnan(box).any(1) & ~np.isnan(box).all(1)
    if partial.any():
        i = first_bad(partial)
        col = BBOX_COLUMNS[int(np.flatnonzero(np.isnan(box[i]))[0])]
        raise TableError(
            f"{where(source, i, col)}: expected a number (a bbox needs all four corners), got an empty cell"
        )
    with np.errstate(invalid="ignore"):
        inverted = (box[:, 2] <= box[:, 0]) | (box[:, 3] <= box[:, 1])
    if inverted.any():
        i = first_bad(inverted)
        col = "x_2" if box[i, 2] <= box[i, 0] else "y_2"
        raise TableError(f"{where(source, i, col)}: expected x_1 < x_2 and y_1 < y_2, got box {box[i].tolist()}")


def check_files_exist(frame: pd.DataFrame, column: str, root: Path, source: str) -> None:
    """Every file named in `column` exists; the first missing one is named with its row."""
    exists = np.fromiter((_resolve(root, p).is_file() for p in frame[column]), dtype=bool, count=len(frame))
    if not exists.all():
        i = first_bad(~exists)
        raise TableError(f"{where(source, i, column)}: image file not found: {_resolve(root, frame[column][i])}")
