"""Sketchy and TU-Berlin for zero-shot sketch-to-photo retrieval: class folders of sketches and of photos, or the
layout ICFRR (and SAKE before it) distributes: `*_ready` image folders with file lists per zero-shot split."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from lookalike.core.errors import LookalikeError
from lookalike.data.convert.base import Conversion, find_file, finish, list_images, relative
from lookalike.data.decode import display_path

# candidate folders (relative to ROOT) holding one sub-folder per class; the first that exists is used
SKETCHY = {
    "sketch": (
        "sketch/tx_000000000000",
        "256x256/sketch/tx_000000000000",
        "sketch",
        "256x256/sketch/tx_000000000000_ready",
        "sketch/tx_000000000000_ready",
    ),
    "photo": (
        "photo/tx_000000000000",
        "256x256/photo/tx_000000000000",
        "photo",
        "256x256/photo/tx_000000000000_ready",
        "photo/tx_000000000000_ready",
    ),
}
TU_BERLIN = {
    "sketch": ("png", "sketch", "sketches", "png_ready"),
    "photo": ("ImageResized", "photo", "images", "ImageResized_ready"),
}
# ICFRR's layout: ROOT/<split folder>/<prefix>_filelist_{train,zero}.txt, lines "<image path relative to ROOT> <class
# number>"
FILE_LISTS = {
    "sketchy": {"sketch": "sketch_tx_000000000000_ready", "photo": "all_photo"},
    "tu-berlin": {"sketch": "png_ready", "photo": "ImageResized_ready"},
}
ZERO_SHOT = {
    "sketchy": {"zs1": "zeroshot1", "zs2": "zeroshot2", "zeroshot1": "zeroshot1", "zeroshot2": "zeroshot2"},
    "tu-berlin": {"zs": "zeroshot", "zeroshot": "zeroshot"},
}
LIST_SPLITS = {
    "train": "train",
    "zero": "validation",
}  # the lists ICFRR reads; *_filelist_test.txt (seen classes) is not used


def _domain(root: Path, domain: str, candidates: tuple[str, ...]) -> pd.DataFrame:
    """The images of one domain: label = class folder name."""
    folder = find_file(root, candidates, f"the {domain} folder")
    paths = list_images(folder)
    if not paths:
        raise LookalikeError(f"{display_path(folder)}: no {domain} images found")
    return pd.DataFrame(
        {"label": [p.relative_to(folder).parts[0] for p in paths], "path": relative(paths, root), "domain": domain}
    )


def read_class_list(path: Path, known: set[str]) -> set[str]:
    """Class names, one per line ('#' comments and blank lines ignored); a name not in the dataset is named with its
    line."""
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


def convert_sketch(
    root: Path, folders: dict[str, tuple[str, ...]], name: str, class_split: Path | None = None
) -> Conversion:
    """Sketch and photo rows; the classes of `class_split` (the zero-shot test classes) are validation, the others
    train.

    In validation, sketches query the photo gallery. Without `class_split` every class is validation. In ICFRR's
    layout `class_split` may name its zero-shot split instead (zs1, zs2: the folder of file lists; TU-Berlin's one
    split is read without it): the train list's images are train, the zero list's validation.
    """
    lists = _list_folder(root, name, class_split)
    if lists is not None:
        return _convert_lists(root, lists, name)
    frame = pd.concat([_domain(root, d, c) for d, c in folders.items()], ignore_index=True)
    per_domain = _check_both_domains(frame, root)
    test = read_class_list(class_split, per_domain["sketch"]) if class_split else per_domain["sketch"]
    val = frame["label"].isin(test).to_numpy()
    frame = frame.assign(
        split=np.where(val, "validation", "train"),
        is_query=val & (frame["domain"] == "sketch").to_numpy(),
        is_gallery=val & (frame["domain"] == "photo").to_numpy(),
    )
    notes = [] if class_split else ["no --class-split: every class is in validation (no train rows)"]
    return finish(frame, root, name, notes)


def _check_both_domains(frame: pd.DataFrame, where: Path) -> pd.Series:
    """The classes of each domain; a class with only sketches or only photos is an error naming it."""
    per_domain = frame.groupby("domain")["label"].agg(set)
    lonely = sorted(per_domain["sketch"] ^ per_domain["photo"])
    if lonely:
        has = "sketches" if lonely[0] in per_domain["sketch"] else "photos"
        raise LookalikeError(
            f"{display_path(where)}: class {lonely[0]!r} has only {has} ({len(lonely)} classes lack one of the domains)"
        )
    return per_domain


def _has_lists(folder: Path, name: str) -> bool:
    """Whether `folder` holds ICFRR's zero-split file lists of both domains."""
    return all((folder / f"{prefix}_filelist_zero.txt").is_file() for prefix in FILE_LISTS[name].values())


def _list_folder(root: Path, name: str, class_split: Path | None) -> Path | None:
    """The folder of ICFRR's file lists to read, or None for class folders (a class-list file, or no such lists).

    Without class_split: the dataset's one zero-shot split when it has exactly one (several: choose, an error).
    With it: a class-list file as before, or a split name (zs1, zs2, zeroshot1, ...) or folder holding the lists.
    """
    aliases = ZERO_SHOT[name]
    if class_split is None:
        found = [f for f in dict.fromkeys(aliases.values()) if _has_lists(root / f, name)]
        if len(found) > 1:
            names = ", ".join(k for k, v in aliases.items() if v in found and k != v)
            raise LookalikeError(
                f"{display_path(root)}: ICFRR's zero-shot splits {', '.join(found)} are here; choose one with "
                f"--class-split ({names})"
            )
        return root / found[0] if found else None
    if class_split.is_file():
        return None
    for folder in (root / aliases.get(str(class_split), str(class_split)), class_split):
        if folder.is_dir():
            if not _has_lists(folder, name):
                wanted = ", ".join(f"{p}_filelist_zero.txt" for p in FILE_LISTS[name].values())
                raise LookalikeError(f"{display_path(folder)}: expected ICFRR's file lists ({wanted})")
            return folder
    if str(class_split) in aliases:
        raise LookalikeError(
            f"{display_path(root)}: --class-split {class_split}: no {aliases[str(class_split)]}/ folder of ICFRR's "
            "file lists"
        )
    return None


def read_file_list(path: Path) -> pd.DataFrame:
    """ICFRR's file list: one '<image path> <class number>' per line (the path may hold spaces) -> path, number,
    line."""
    try:
        lines = path.read_bytes().decode("utf-8", "surrogateescape").splitlines()
    except OSError as exc:
        raise LookalikeError(f"{display_path(path)}: cannot read the file list ({exc.strerror or exc})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdecimal():
            raise LookalikeError(
                f"{display_path(path)}, line {n}: expected '<image path> <class number>', got {line.strip()!r}"
            )
        rows.append((parts[0], int(parts[1]), n))
    return pd.DataFrame(rows, columns=["path", "number", "line"])


def _convert_lists(root: Path, folder: Path, name: str) -> Conversion:
    """Rows from ICFRR's file lists in `folder`: label = the image's class folder (its number when it has none)."""
    frames, notes = (
        [],
        [
            f"read ICFRR's file lists in {display_path(folder)}: *_filelist_train.txt train, *_filelist_zero.txt "
            "validation"
        ],
    )
    for domain, prefix in FILE_LISTS[name].items():
        for list_split, split in LIST_SPLITS.items():
            path = folder / f"{prefix}_filelist_{list_split}.txt"
            if not path.is_file():
                notes.append(f"{display_path(path)} not found: no {split} {domain}s")
                continue
            rows = read_file_list(path)
            parents = [PurePosixPath(p.replace("\\", "/")).parent.name for p in rows["path"]]
            labels = [parent or str(number) for parent, number in zip(parents, rows["number"])]
            frames.append(pd.DataFrame({"label": labels, "path": rows["path"], "domain": domain, "split": split}))
    frame = pd.concat(frames, ignore_index=True)
    _check_both_domains(frame[frame["split"] == "validation"], folder)
    val = (frame["split"] == "validation").to_numpy()
    frame = frame.assign(
        is_query=val & (frame["domain"] == "sketch").to_numpy(),
        is_gallery=val & (frame["domain"] == "photo").to_numpy(),
    )
    return finish(frame, root, name, notes)


def convert_sketchy(root: Path, class_split: Path | None = None) -> Conversion:
    """Sketchy: sketch/tx_000000000000/<class>/ and photo/tx_000000000000/<class>/ (or without the tx_ level), or
    ICFRR's 256x256/{sketch,photo}/tx_000000000000_ready/ with zeroshot1/ and zeroshot2/ file lists (--class-split
    zs1|zs2)."""
    return convert_sketch(root, SKETCHY, "sketchy", class_split)


def convert_tu_berlin(root: Path, class_split: Path | None = None) -> Conversion:
    """TU-Berlin with its photo extension: png/<class>/ sketches, ImageResized/<class>/ photos (or sketch/ and photo/),
    or ICFRR's png_ready/ and ImageResized_ready/ with the zeroshot/ file lists (read without --class-split)."""
    return convert_sketch(root, TU_BERLIN, "tu-berlin", class_split)
