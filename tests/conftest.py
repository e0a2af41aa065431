"""Shared fixtures: a small real dataset (the Omniglot subset bundled with the package) unpacked once per session."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from lookalike.data.bundled import OMNIGLOT_ZIP


@pytest.fixture(scope="session")
def omniglot_small(tmp_path_factory) -> Path:
    """Eight characters of one alphabet (8 x 20 drawings), as alphabet/characterNN/*.png."""
    root = tmp_path_factory.mktemp("omniglot")
    with zipfile.ZipFile(OMNIGLOT_ZIP) as zf:
        names = [n for n in zf.namelist() if n.endswith(".png") and "/Balinese/character0" in n and int(n.split("character")[1][:2]) <= 8]
        for name in names:
            target = root / Path(name).relative_to("images_background_small1")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    return root
