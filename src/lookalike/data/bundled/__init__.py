"""Data shipped inside the package, so the demo, the tests and the Omniglot configs work offline from any clone.

`omniglot_background_small1.zip` is the "images_background_small1" subset of Omniglot (Lake et al., 2015;
5 alphabets, 136 characters x 20 drawers, 105 x 105 PNG), MIT licence: see `OMNIGLOT_LICENSE` beside it.
`prepare_omniglot` (the CLI's `lookalike data omniglot DIR`) unpacks it and writes the tables the Omniglot configs read.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lookalike.core.errors import LookalikeError
from lookalike.core.table import DatasetTable
from lookalike.data.folder import import_folder
from lookalike.data.pairs import PairsTable, validate_pairs

OMNIGLOT_ZIP = Path(__file__).with_name("omniglot_background_small1.zip")
OMNIGLOT_ROOT = "images_background_small1"  # the top folder inside the zip
OMNIGLOT_TABLE = "omniglot.csv"  # data.table of configs/omniglot.yaml and omniglot_pairwise.yaml (under data/omniglot)
OMNIGLOT_PAIRS = "pairs.csv"  # adapt.pairs of configs/omniglot_adapt.yaml
DRAWING = re.compile(r"(\d+)_(\d+)\.png")  # CHARACTER_DRAWER.png


def unpack_omniglot(target: str | os.PathLike) -> Path:
    """Unzip the bundled Omniglot subset under `target` (idempotent, all or nothing); return its
    `alphabet/characterNN/*.png` root."""
    target = Path(target)
    root = target / OMNIGLOT_ROOT
    if not root.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(prefix=f".{OMNIGLOT_ROOT}.", dir=target) as tmp,
            zipfile.ZipFile(OMNIGLOT_ZIP) as zipped,
        ):
            zipped.extractall(tmp)
            os.replace(Path(tmp) / OMNIGLOT_ROOT, root)  # an interrupted unzip never looks like a finished one
    return root


def omniglot_drawer_pairs(images: str | os.PathLike, left: int = 1, right: int = 2) -> PairsTable:
    """One pair per character folder of `images` (alphabet/character/): the drawing of drawer `left` and of drawer
    `right`."""
    images = Path(images)
    rows = []
    for folder in sorted(p for p in images.glob("*/*") if p.is_dir()):
        drawers = {int(m.group(2)): f for f in folder.iterdir() if (m := DRAWING.fullmatch(f.name))}
        if left not in drawers or right not in drawers:
            raise LookalikeError(f"{folder}: expected drawings CHARACTER_{left:02d}.png and CHARACTER_{right:02d}.png")
        rows.append(
            {
                "left": drawers[left].relative_to(images).as_posix(),
                "right": drawers[right].relative_to(images).as_posix(),
            }
        )
    return validate_pairs(pd.DataFrame(rows, columns=["left", "right"]), images, str(images))


@dataclass(frozen=True)
class PreparedOmniglot:
    """What `prepare_omniglot` wrote: the image root, the dataset table and the pairs table."""

    images: Path
    table_path: Path
    table: DatasetTable
    pairs_path: Path
    pairs: PairsTable


def prepare_omniglot(target: str | os.PathLike, validation_fraction: float = 0.3, seed: int = 0) -> PreparedOmniglot:
    """Unpack the subset under `target` and write `omniglot.csv` (split by character) and `pairs.csv` beside it."""
    target = Path(target)
    images = unpack_omniglot(target)
    table = import_folder(images, validation_fraction, seed)
    pairs = omniglot_drawer_pairs(images)
    table_path, pairs_path = target / OMNIGLOT_TABLE, target / OMNIGLOT_PAIRS
    table.save(table_path)
    pairs.save(pairs_path)
    return PreparedOmniglot(images, table_path, table, pairs_path, pairs)
