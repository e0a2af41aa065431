"""Market-1501 and DukeMTMC-reID: bounding_box_train / query / bounding_box_test, names PID_cCAM...; the re-ID
protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lookalike.core.errors import LookalikeError
from lookalike.data.convert.base import Conversion, find_file, finish, list_images, relative
from lookalike.data.decode import display_path

FOLDERS = {
    "bounding_box_train": ("train", False, False),
    "query": ("validation", True, False),
    "bounding_box_test": ("validation", False, True),
}
NAME = r"^(?P<pid>-?\d+)_c(?P<camera>\d+)"  # Market 0002_c1s1_000451_03.jpg, Duke 0005_c2_f0046985.jpg
JUNK_PID = -1


def _folder(root: Path, folder: str) -> pd.DataFrame:
    """The images of one folder with pid and camera parsed from their names; a name that does not parse is an error."""
    paths = relative(list_images(find_file(root, (folder,), f"the {folder}/ folder")), root)
    names = pd.Series([p.rsplit("/", 1)[-1] for p in paths], dtype=str)
    parts = names.str.extract(NAME)
    bad = parts["pid"].isna().to_numpy()
    if bad.any():
        raise LookalikeError(
            f"{display_path(root / paths[int(np.flatnonzero(bad)[0])])}: expected a name PID_cCAM... (e.g. "
            "0002_c1s1_000451_03.jpg)"
        )
    split, is_query, is_gallery = FOLDERS[folder]
    return pd.DataFrame(
        {
            "pid": parts["pid"].astype(np.int64),
            "camera": parts["camera"].astype(np.int64),
            "path": paths,
            "split": split,
            "is_query": is_query,
            "is_gallery": is_gallery,
        }
    )


def convert_reid(root: Path, name: str = "reid") -> Conversion:
    """Label = pid; pid -1 (junk) dropped, pid 0 (distractors) kept; sequence = pid + camera, so that a query never
    counts gallery images of its own person from its own camera (the Market/Duke evaluation protocol)."""
    frame = pd.concat([_folder(root, f) for f in FOLDERS], ignore_index=True)
    junk = (frame["pid"] == JUNK_PID).to_numpy()
    frame = frame[~junk]
    sequence = frame["pid"].astype(str) + "_c" + frame["camera"].astype(str)
    notes = [f"dropped {int(junk.sum())} junk images (pid -1)"] if junk.any() else []
    distractors = int(((frame["pid"] == 0) & frame["is_gallery"]).sum())
    notes += [f"kept {distractors} distractor images (pid 0) in the gallery"] if distractors else []
    return finish(
        frame.assign(label=frame["pid"], sequence=sequence).drop(columns=["pid", "camera"]), root, name, notes
    )


def convert_market(root: Path) -> Conversion:
    """Market-1501 (Market-1501-v15.09.15/)."""
    return convert_reid(root, "market1501")


def convert_duke(root: Path) -> Conversion:
    """DukeMTMC-reID (DukeMTMC-reID/)."""
    return convert_reid(root, "dukemtmc")
