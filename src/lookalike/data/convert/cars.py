"""Stanford Cars-196 from the devkit .mat files (scipy); classes 1-98 train, 99-196 validation, bbox from the
annotations."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

from lookalike.core.errors import LookalikeError
from lookalike.data.convert.base import Conversion, find_file, find_optional, finish, split_by_class
from lookalike.data.decode import display_path

LAST_TRAIN_CLASS = 98
FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
SOURCES = (("cars_train_annos.mat", "cars_train"), ("cars_test_annos_withlabels.mat", "cars_test"))


def load_mat(path: Path, variable: str) -> np.ndarray:
    """One variable of a MATLAB file as a 1-D array; errors name the file and the variable."""
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except (scipy.io.matlab.MatReadError, ValueError, TypeError, OSError, NotImplementedError, struct.error) as exc:
        raise LookalikeError(f"{display_path(path)}: not a readable MATLAB .mat file ({exc})") from None
    if variable not in mat:
        raise LookalikeError(
            f"{display_path(path)}: expected a variable {variable!r}, found "
            f"{', '.join(k for k in mat if not k.startswith('__')) or 'none'}"
        )
    return np.atleast_1d(mat[variable])


def _annotations(path: Path, folder: str) -> pd.DataFrame:
    """The `annotations` struct array as rows: path under `folder`, integer class, bbox."""
    ann = load_mat(path, "annotations")
    missing = [f for f in FIELDS if ann.dtype.names is None or f not in ann.dtype.names]
    if missing:
        raise LookalikeError(
            f"{display_path(path)}: annotations lack the field {missing[0]!r} (expected {', '.join(FIELDS)})"
        )
    frame = pd.DataFrame(
        {f: [np.asarray(v).squeeze().item() if np.size(v) == 1 else None for v in ann[f]] for f in FIELDS}
    )
    numbers = frame[list(FIELDS[:5])].apply(pd.to_numeric, errors="coerce")
    bad = (frame["fname"].isna() | numbers.isna().any(axis=1)).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LookalikeError(
            f"{display_path(path)}: annotation {i + 1}: expected one number each for {', '.join(FIELDS[:5])} and a "
            "file name"
        )
    return pd.DataFrame(
        {
            "label": numbers["class"].astype(np.int64),
            "path": folder + "/" + frame["fname"].astype(str),
            **{corner: numbers[field].astype(float) for corner, field in zip(("x_1", "y_1", "x_2", "y_2"), FIELDS[:4])},
        }
    )


def _check_classes(frame: pd.DataFrame, n_classes: int, path: Path) -> None:
    """Class ids lie in 1..n_classes (the class_names of cars_meta.mat, 196 without it)."""
    bad = ~frame["label"].between(1, n_classes).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LookalikeError(
            f"{display_path(path)}: annotation {i + 1} has class {frame['label'].iloc[i]}; expected 1..{n_classes}"
        )


def convert_cars(root: Path) -> Conversion:
    """Train and test annotations together, split by class (the retrieval protocol ignores the classification split)."""
    meta = find_optional(root, ("devkit/cars_meta.mat", "cars_meta.mat"))
    n_classes = len(load_mat(meta, "class_names")) if meta is not None else 196
    parts = []
    for name, folder in SOURCES:
        path = find_file(root, (name, f"devkit/{name}"), name)
        parts.append(_annotations(path, folder))
        _check_classes(parts[-1], n_classes, path)
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.assign(**split_by_class(frame["label"], LAST_TRAIN_CLASS))
    return finish(frame, root, "cars")
