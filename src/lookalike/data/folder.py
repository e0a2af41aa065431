"""Import a class-per-folder image tree as a dataset table, split by class."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from lookalike.core.errors import TableError
from lookalike.core.table import DatasetTable, validate_table

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(folder: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under `folder` (recursively), sorted, by extension."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file())


def import_folder(
    root: str | os.PathLike,
    validation_fraction: float = 0.5,
    seed: int = 0,
    queries_per_class: int | None = None,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    labels: bool | None = None,
) -> DatasetTable:
    """Build a table from `root/<class folders>/image`: one label per leaf folder, classes split train/validation;
    or, from a flat folder (or with labels=False, any tree), a gallery table without labels.

    Validation rows are all query+gallery (every image queries the others) unless `queries_per_class`
    picks that many queries per class, the rest being gallery only.

    Args:
        root: the tree's top folder.
        validation_fraction: share of the classes (not images) that go to the validation split.
        seed: seed of the class split and the query choice.
        queries_per_class: queries per validation class (None: every validation image).
        extensions: file endings that count as images.
        labels: True: one label per leaf folder (an image directly in `root` is an error); False: no labels, every
            image of the tree in the gallery with its path relative to `root` as its `id`; None: False for a flat
            folder (every image directly in `root`), else True.

    Returns:
        DatasetTable with label, path (relative to root), split, is_query, is_gallery; without labels: id, path.

    Example:
        >>> import lookalike
        >>> table = lookalike.import_folder("data/omniglot/images_background_small1/Latin", validation_fraction=0.5)
        >>> table.split_counts()
        {'train': 260, 'validation': 260}
    """
    root = Path(root)
    if not root.is_dir():
        raise TableError(f"{root}: not a folder of images")
    if not 0.0 <= validation_fraction <= 1.0:
        raise TableError(f"validation_fraction: expected a number in [0, 1], got {validation_fraction}")
    files = list_images(root, extensions)
    if not files:
        raise TableError(f"{root}: no images found (looked for {', '.join(extensions)})")
    loose = [p for p in files if p.parent == root]
    rel = [p.relative_to(root) for p in files]
    if labels is False or (labels is None and len(loose) == len(files)):
        return _gallery_table(rel, root)
    if loose:
        raise TableError(
            f"{loose[0]}: image directly in the root folder; expected root/<class folder>/<image> (or --no-labels: "
            "a gallery without labels)"
        )
    frame = pd.DataFrame({"label": [p.parent.as_posix() for p in rel], "path": [p.as_posix() for p in rel]})
    rng = np.random.default_rng(seed)
    frame["split"] = _split_by_class(frame["label"], validation_fraction, rng)
    frame["is_query"], frame["is_gallery"] = _assign_roles(frame, queries_per_class, rng)
    return validate_table(frame.astype(str), root, str(root), check_files=False)


def _gallery_table(rel: list[Path], root: Path) -> DatasetTable:
    """A gallery table without labels: each image's path relative to `root` is its path and its stable id."""
    names = [p.as_posix() for p in rel]
    return validate_table(pd.DataFrame({"id": names, "path": names}), root, str(root), check_files=False)


def _split_by_class(labels: pd.Series, validation_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Shuffle the classes and send a fraction of them (at least one, when asked for any) to validation."""
    classes = labels.unique()
    n_val = int(round(validation_fraction * len(classes)))
    if validation_fraction > 0:
        n_val = max(n_val, 1)
    if validation_fraction < 1 and len(classes) > 1:
        n_val = min(n_val, len(classes) - 1)
    val_classes = set(rng.permutation(classes)[:n_val])
    return np.where(labels.isin(val_classes), "validation", "train")


def _assign_roles(
    frame: pd.DataFrame, queries_per_class: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """All validation rows are query and gallery, or `queries_per_class` random queries per class."""
    is_val = (frame["split"] == "validation").to_numpy()
    if queries_per_class is None:
        return is_val.copy(), is_val.copy()
    if queries_per_class < 1:
        raise TableError(f"queries_per_class: expected a positive integer, got {queries_per_class}")
    order = rng.permutation(len(frame))
    rank_in_class = frame.iloc[order].groupby("label").cumcount().reindex(frame.index).to_numpy()
    is_query = is_val & (rank_in_class < queries_per_class)
    return is_query, is_val & ~is_query
