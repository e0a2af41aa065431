"""Checking the images a table names before any work starts: missing, empty, undecodable, bbox outside the image."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.core.errors import ImageError, LookalikeError, LookalikeWarning
from lookalike.core.table import DatasetTable
from lookalike.data.decode import display_path, verify_image


@dataclass(frozen=True)
class ImageProblem:
    """One unusable image: its position in the list checked, its path, and what is wrong."""

    index: int
    path: str
    reason: str

    @property
    def missing(self) -> bool:
        return self.reason == "missing"

    def __str__(self) -> str:
        return f"{display_path(self.path)} ({self.reason})"


def image_problem(path: Path, bbox: np.ndarray | None = None, decode: bool = False) -> str | None:
    """Why an image cannot be used ('missing', 'empty file', a decoding error), or None when it is fine."""
    try:
        if not path.is_file():
            return "missing"
        if path.stat().st_size == 0:
            return "empty file"
    except (OSError, ValueError):
        return "missing"
    try:
        if decode:
            verify_image(path, bbox)
    except ImageError as exc:
        return exc.reason
    return None


def find_image_problems(
    paths: list[Path],
    boxes: np.ndarray | None = None,
    decode: bool = False,
    names: list[str] | None = None,
    workers: int | None = None,
) -> list[ImageProblem]:
    """Every missing or empty image, and with `decode` every undecodable one or one its bbox misses, in list order.

    Problems carry `names[i]` (e.g. the path as the table writes it) when given, else the path checked.
    """

    def check(i: int) -> str | None:
        return image_problem(paths[i], None if boxes is None else boxes[i], decode)

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # Pillow decodes without holding the GIL
        reasons = list(pool.map(check, range(len(paths))))
    names = names if names is not None else [str(p) for p in paths]
    return [ImageProblem(i, names[i], r) for i, r in enumerate(reasons) if r is not None]


def table_image_problems(table: DatasetTable, decode: bool = False) -> list[ImageProblem]:
    """The problems of the images of a dataset table, indexed by row and named by the table's paths."""
    boxes = table.boxes
    return find_image_problems(table.image_paths(), boxes, decode, names=table.paths.tolist())


def describe_problems(problems: list[ImageProblem], n_checked: int, shown: int = 5) -> list[str]:
    """Lines for the user: how many images are missing and how many unreadable, with the first few of each by name."""
    lines = []
    for missing, what in ((True, "missing"), (False, "unreadable")):
        group = [p for p in problems if p.missing == missing]
        if group:
            names = ", ".join(display_path(p.path) if missing else str(p) for p in group[:shown])
            more = f", and {len(group) - shown} more" if len(group) > shown else ""
            lines.append(f"{len(group)} of {n_checked} images {what}: {names}{more}")
    return lines


def skip_bad_images(table: DatasetTable) -> DatasetTable:
    """The table without rows whose image is missing, empty, undecodable or missed by its bbox; warns with the count."""
    problems = table_image_problems(table, decode=True)
    if not problems:
        return table
    if len(problems) == len(table):
        raise LookalikeError(
            f"{table.source}: no usable image (data.skip_bad_images=true): "
            + "; ".join(describe_problems(problems, len(table)))
        )
    keep = np.ones(len(table), dtype=bool)
    keep[[p.index for p in problems]] = False
    described = "; ".join(describe_problems(problems, len(table)))
    warnings.warn(
        LookalikeWarning(f"skipped {len(problems)} bad images (data.skip_bad_images=true): {described}"), stacklevel=2
    )
    return table.where(keep)
