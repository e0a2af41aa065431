"""Data shipped inside the package, so the demo, the tests and the Omniglot configs work offline from any clone.

`omniglot_background_small1.zip` is the "images_background_small1" subset of Omniglot (Lake et al., 2015;
5 alphabets, 136 characters x 20 drawers, 105 x 105 PNG), MIT licence: see `OMNIGLOT_LICENSE` beside it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

OMNIGLOT_ZIP = Path(__file__).with_name("omniglot_background_small1.zip")
OMNIGLOT_LICENSE = Path(__file__).with_name("OMNIGLOT_LICENSE")
OMNIGLOT_ROOT = "images_background_small1"  # the top folder inside the zip


def unpack_omniglot(target: str | Path) -> Path:
    """Unzip the bundled Omniglot subset under `target` (idempotent); return its `alphabet/characterNN/*.png` root."""
    target = Path(target)
    root = target / OMNIGLOT_ROOT
    if not root.is_dir():
        with zipfile.ZipFile(OMNIGLOT_ZIP) as zipped:
            zipped.extractall(target)
    return root
