"""What every converter shares: the Conversion result, finding and parsing annotation files, building the table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lookalike.core.errors import LookalikeError
from lookalike.core.table import DatasetTable, validate_table
from lookalike.data.decode import display_path
from lookalike.data.folder import list_images  # noqa: F401 - the converters import it from here
from lookalike.data.pairs import PairsTable


@dataclass
class Conversion:
    """A converted dataset: the table (or pairs table) and notes on what was dropped or assumed."""

    table: DatasetTable | PairsTable
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Images, labels, train/validation rows, queries, gallery and rows per domain (pairs: pairs per split)."""
        if isinstance(self.table, PairsTable):
            return {"pairs": len(self.table), **self.table.split_counts()}
        return self.table.counts()

    def summary(self) -> str:
        """One line of counts, e.g. '120 images, 12 labels, 60 train, 60 validation, 60 queries, 60 gallery'."""
        return ", ".join(f"{v} {k}" for k, v in self.counts().items())


def find_optional(root: Path, candidates: tuple[str, ...]) -> Path | None:
    """The first of `candidates` (relative to root) that exists, or None."""
    return next((root / name for name in candidates if (root / name).exists()), None)


def find_file(root: Path, candidates: tuple[str, ...], what: str) -> Path:
    """The first of `candidates` (relative to root) that exists; an error naming them all otherwise."""
    found = find_optional(root, candidates)
    if found is not None:
        return found
    raise LookalikeError(f"{display_path(root)}: {what} not found (looked for {', '.join(candidates)})")


def read_columns(
    path: Path, columns: tuple[str, ...], header: tuple[str, ...] = (), counted: bool = False
) -> pd.DataFrame:
    """A whitespace-separated text file as string columns, one row per non-blank line.

    `counted`: the first line holds the number of rows (DeepFashion); `header`: the expected column-name line.
    Errors name the file and line: a wrong header, a wrong number of fields, a row count that does not match.
    """
    try:
        lines = path.read_bytes().decode("utf-8", "surrogateescape").splitlines()
    except OSError as exc:
        raise LookalikeError(f"{display_path(path)}: cannot read ({exc.strerror or exc})") from None
    numbered = [(n, line.split()) for n, line in enumerate(lines, 1) if line.strip()]
    first = 0
    if counted:
        first = _check_count_line(path, numbered)
    if header:
        _check_header(path, numbered[first] if len(numbered) > first else None, header)
        first += 1
    rows = numbered[first:]
    lengths = np.fromiter((len(fields) for _, fields in rows), dtype=int, count=len(rows))
    bad = np.flatnonzero(lengths != len(columns))
    if bad.size:
        n, fields = rows[bad[0]]
        raise LookalikeError(
            f"{display_path(path)}, line {n}: expected {len(columns)} fields ({' '.join(columns)}), got {len(fields)}"
        )
    frame = pd.DataFrame([fields for _, fields in rows], columns=list(columns), dtype=str)
    frame["line"] = [n for n, _ in rows]
    if counted and len(frame) != int(numbered[0][1][0]):
        raise LookalikeError(
            f"{display_path(path)}, line {numbered[0][0]}: announces {numbered[0][1][0]} rows, found {len(frame)} "
            "(incomplete download?)"
        )
    return frame


def _check_count_line(path: Path, numbered: list[tuple[int, list[str]]]) -> int:
    if not numbered or len(numbered[0][1]) != 1 or not numbered[0][1][0].isdecimal():
        got = " ".join(numbered[0][1]) if numbered else "an empty file"
        raise LookalikeError(f"{display_path(path)}, line 1: expected the number of rows, got {got!r}")
    return 1


def _check_header(path: Path, line: tuple[int, list[str]] | None, header: tuple[str, ...]) -> None:
    if line is None or tuple(line[1]) != header:
        got = " ".join(line[1]) if line else "nothing"
        raise LookalikeError(
            f"{display_path(path)}, line {line[0] if line else 1}: expected the header {' '.join(header)!r}, got "
            f"{got!r}"
        )


def parse_numbers(frame: pd.DataFrame, columns: tuple[str, ...], path: Path, kind: type = int) -> None:
    """Turn string columns into numbers in place; the first bad cell is named by file, line and column."""
    for col in columns:
        values = pd.to_numeric(frame[col], errors="coerce")
        not_int = ((values % 1 != 0) | (values.abs() > 2**53)) if kind is int else False  # 2**53: exact in float64
        bad = (values.isna() | ~np.isfinite(values.astype(float)) | not_int).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise LookalikeError(
                f"{display_path(path)}, line {frame['line'].iloc[i]}, column {col!r}: expected "
                f"{'an integer' if kind is int else 'a number'}, got {frame[col].iloc[i]!r}"
            )
        frame[col] = values.astype(np.int64 if kind is int else float)


def check_values(frame: pd.DataFrame, column: str, allowed: tuple[str, ...], path: Path) -> None:
    """Every cell of `column` is one of `allowed`; the first other one is named by file and line."""
    bad = ~frame[column].isin(allowed).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LookalikeError(
            f"{display_path(path)}, line {frame['line'].iloc[i]}, column {column!r}: expected {' or '.join(allowed)}, "
            f"got {frame[column].iloc[i]!r}"
        )


def join_on(left: pd.DataFrame, right: pd.DataFrame, key: str, left_path: Path, right_path: Path) -> pd.DataFrame:
    """Rows of `left` with the columns of `right` for the same key; a key that `right` lacks is an error naming it."""
    dup = right[key].duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise LookalikeError(
            f"{display_path(right_path)}, line {right['line'].iloc[i]}: {key} {right[key].iloc[i]} appears twice"
        )
    merged = left.merge(right.drop(columns="line"), on=key, how="left", indicator=True)
    absent = (merged["_merge"] == "left_only").to_numpy()
    if absent.any():
        i = int(np.flatnonzero(absent)[0])
        raise LookalikeError(
            f"{display_path(right_path)}: no line for {key} {merged[key].iloc[i]} ({display_path(left_path)}, line "
            f"{merged['line'].iloc[i]}); "
            f"{int(absent.sum())} of {len(merged)} missing"
        )
    return merged.drop(columns="_merge")


def split_by_class(labels: pd.Series, last_train_class: int) -> pd.DataFrame:
    """The retrieval protocol of CUB and Cars: classes up to `last_train_class` train, the rest validation (all query
    and gallery)."""
    train = (labels <= last_train_class).to_numpy()
    return pd.DataFrame(
        {"split": np.where(train, "train", "validation"), "is_query": ~train, "is_gallery": ~train}, index=labels.index
    )


def relative(paths: list[Path], root: Path) -> list[str]:
    """Paths relative to `root`, with forward slashes."""
    return [p.relative_to(root).as_posix() for p in paths]


def finish(frame: pd.DataFrame, root: Path, name: str, notes: list[str] | None = None) -> Conversion:
    """Validate the converted rows as a dataset table (files are checked separately, all at once)."""
    columns = [c for c in frame.columns if c != "line"]
    table = validate_table(
        frame[columns].reset_index(drop=True), root, f"{display_path(root)} ({name})", check_files=False
    )
    return Conversion(table, notes or [])
