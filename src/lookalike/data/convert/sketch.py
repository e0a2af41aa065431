"""Sketchy and TU-Berlin for zero-shot sketch-to-photo retrieval: class folders of sketches and of photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lookalike.data.convert.base import Conversion, find_file, finish, list_images, relative
from lookalike.data.decode import display_path
from lookalike.errors import LookalikeError

# candidate folders (relative to ROOT) holding one sub-folder per class; the first that exists is used
SKETCHY = {"sketch": ("sketch/tx_000000000000", "256x256/sketch/tx_000000000000", "sketch"),
           "photo": ("photo/tx_000000000000", "256x256/photo/tx_000000000000", "photo")}
TU_BERLIN = {"sketch": ("png", "sketch", "sketches"), "photo": ("ImageResized", "photo", "images")}


def _domain(root: Path, domain: str, candidates: tuple[str, ...]) -> pd.DataFrame:
    """The images of one domain: label = class folder name."""
    folder = find_file(root, candidates, f"the {domain} folder")
    paths = list_images(folder)
    if not paths:
        raise LookalikeError(f"{display_path(folder)}: no {domain} images found")
    return pd.DataFrame({"label": [p.relative_to(folder).parts[0] for p in paths], "path": relative(paths, root), "domain": domain})


def read_class_list(path: Path, known: set[str]) -> set[str]:
    """Class names, one per line ('#' comments and blank lines ignored); a name not in the dataset is named with its line."""
    try:
        lines = path.read_bytes().decode("utf-8", "surrogateescape").splitlines()
    except OSError as exc:
        raise LookalikeError(f"{display_path(path)}: cannot read the class list ({exc.strerror or exc})") from None
    classes = set()
    for n, line in enumerate(lines, 1):
        name = line.split("#", 1)[0].strip()
        if name and name not in known:
            raise LookalikeError(f"{display_path(path)}, line {n}: class {name!r} is not a class folder of the dataset")
        if name:
            classes.add(name)
    if not classes:
        raise LookalikeError(f"{display_path(path)}: expected class names, one per line; found none")
    return classes


def convert_sketch(root: Path, folders: dict[str, tuple[str, ...]], name: str, class_split: Path | None = None) -> Conversion:
    """Sketch and photo rows; the classes of `class_split` (the zero-shot test classes) are validation, the others train.

    In validation, sketches query the photo gallery. Without `class_split` every class is validation.
    """
    frame = pd.concat([_domain(root, d, c) for d, c in folders.items()], ignore_index=True)
    per_domain = frame.groupby("domain")["label"].agg(set)
    lonely = sorted(per_domain["sketch"] ^ per_domain["photo"])
    if lonely:
        has = "sketches" if lonely[0] in per_domain["sketch"] else "photos"
        raise LookalikeError(f"{display_path(root)}: class {lonely[0]!r} has only {has} ({len(lonely)} classes lack one of the domains)")
    test = read_class_list(class_split, per_domain["sketch"]) if class_split else per_domain["sketch"]
    val = frame["label"].isin(test).to_numpy()
    frame = frame.assign(split=np.where(val, "validation", "train"), is_query=val & (frame["domain"] == "sketch").to_numpy(),
                         is_gallery=val & (frame["domain"] == "photo").to_numpy())
    notes = [] if class_split else ["no --class-split: every class is in validation (no train rows)"]
    return finish(frame, root, name, notes)


def convert_sketchy(root: Path, class_split: Path | None = None) -> Conversion:
    """Sketchy: sketch/tx_000000000000/<class>/ and photo/tx_000000000000/<class>/ (or without the tx_ level)."""
    return convert_sketch(root, SKETCHY, "sketchy", class_split)


def convert_tu_berlin(root: Path, class_split: Path | None = None) -> Conversion:
    """TU-Berlin with its photo extension: png/<class>/ sketches, ImageResized/<class>/ photos (or sketch/ and photo/)."""
    return convert_sketch(root, TU_BERLIN, "tu-berlin", class_split)
