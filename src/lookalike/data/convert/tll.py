"""Totally-Looks-Like: left/ and right/ images paired by file name, into a pairs table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lookalike.core.errors import LookalikeError
from lookalike.data.convert.base import Conversion, find_file, list_images
from lookalike.data.decode import display_path
from lookalike.data.pairs import validate_pairs


def _names(root: Path, side: str) -> dict[str, str]:
    """File name -> path relative to ROOT for the images of left/ or right/."""
    folder = find_file(root, (side,), f"the {side}/ folder")
    return {p.name: p.relative_to(root).as_posix() for p in list_images(folder)}


def _unpaired(names: set[str], side: str, other: str, shown: int = 5) -> str:
    listed = ", ".join(display_path(n) for n in sorted(names)[:shown]) + (", ..." if len(names) > shown else "")
    return f"{len(names)} in {side}/ have no partner in {other}/ ({listed})"


def convert_tll(root: Path, validation_fraction: float = 0.0, seed: int = 0) -> Conversion:
    """One pair per file name found in both folders; a name in only one folder is an error that lists them."""
    if not 0.0 <= validation_fraction <= 1.0:
        raise LookalikeError(f"validation_fraction: expected a number in [0, 1], got {validation_fraction}")
    left, right = _names(root, "left"), _names(root, "right")
    only = [(set(left) - set(right), "left", "right"), (set(right) - set(left), "right", "left")]
    problems = [_unpaired(names, side, other) for names, side, other in only if names]
    if problems:
        raise LookalikeError(f"{display_path(root)}: " + "; ".join(problems))
    if not left:
        raise LookalikeError(f"{display_path(root)}: no images in left/ and right/")
    names = sorted(left)
    n_val = int(round(validation_fraction * len(names)))
    val = np.zeros(len(names), dtype=bool)
    val[np.random.default_rng(seed).permutation(len(names))[:n_val]] = True
    frame = pd.DataFrame(
        {
            "left": [left[n] for n in names],
            "right": [right[n] for n in names],
            "split": np.where(val, "validation", "train"),
        }
    )
    return Conversion(validate_pairs(frame, root, f"{display_path(root)} (tll)", check_files=False))
