"""`lookalike tune-rerank` (issue 20 item 3): candidates scored on the training split alone, the best written as a
config snippet, then reported once on the validation split."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from helpers import LOOKALIKE
from lookalike.config import load_config
from lookalike.core.errors import LookalikeError
from lookalike.data.folder import import_folder
from lookalike.tune import Candidate, choose, tune_rerank, validate_choice

FAST_MODEL = ["model.name=test_resnet", "model.pretrained=false", "data.image_size=32", "data.batch_size=64"]
STEPS = [["qe"], [{"qe": {"n": 1}}], ["kreciprocal"], ["dba", "qe"]]


def make_table(images: Path, folder: Path) -> Path:
    """The eight test characters under `folder`, half validating, as a table CSV there."""
    root = folder / "images"
    shutil.copytree(images, root)
    path = folder / "table.csv"
    import_folder(root, validation_fraction=0.5, seed=0).save(path)
    return path


def poison_validation(table_path: Path) -> None:
    """Every validation image replaced by bytes no decoder reads, and the validation labels permuted: any read of the
    validation split fails, any use of its labels changes the metrics."""
    frame = pd.read_csv(table_path)
    val = frame["split"] == "validation"
    for path in frame.loc[val, "path"]:
        target = Path(path) if Path(path).is_absolute() else table_path.parent / "images" / path
        if not target.is_file():
            target = table_path.parent / path
        target.write_bytes(b"not an image")
    frame.loc[val, "label"] = frame.loc[val, "label"].to_numpy()[::-1]
    frame.to_csv(table_path, index=False)


def tuned(table: Path):
    torch.manual_seed(0)  # the same untrained weights for both tables
    return tune_rerank(load_config(None, [f"data.table={table}", *FAST_MODEL]), steps=STEPS)


def test_tuner_never_reads_the_validation_split(omniglot_small: Path, tmp_path: Path) -> None:
    """The same candidates, metrics and choice whether the validation split is intact or poisoned; and the poison is
    real: reading that split (the report after the choice) fails."""
    clean, poisoned = make_table(omniglot_small, tmp_path / "a"), make_table(omniglot_small, tmp_path / "b")
    poison_validation(poisoned)
    a, b = tuned(clean), tuned(poisoned)
    assert [(c.label, c.cmc1, c.map_all) for c in a.candidates] == [(c.label, c.cmc1, c.map_all) for c in b.candidates]
    assert a.best.steps == b.best.steps
    assert len(a.candidates) == len(STEPS) + 1 and a.candidates[0].label == "none"
    with pytest.raises(LookalikeError):
        validate_choice(load_config(None, [f"data.table={poisoned}", *FAST_MODEL]), a.best.steps)


def test_choice_keeps_cmc1_within_a_point() -> None:
    """The best mAP@all among candidates whose CMC@1 is at most one point below the original list's."""
    original = Candidate([], 0.70, 0.40, 0.0)
    worse_cmc = Candidate(["icfrr"], 0.68, 0.60, 0.1)
    fine = Candidate(["kreciprocal"], 0.695, 0.50, 0.1)
    assert choose([original, worse_cmc, fine]) is fine
    assert choose([original, worse_cmc]) is original


def test_tune_rerank_command(omniglot_small: Path, tmp_path: Path) -> None:
    """The real command: a table of candidates with their metrics and time, the snippet written, the validation line."""
    table = make_table(omniglot_small, tmp_path)
    out = tmp_path / "tuned.yaml"
    done = subprocess.run(
        [LOOKALIKE, "tune-rerank", "--no-chains", "--output", str(out), f"data.table={table}", *FAST_MODEL],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "CMC@1" in done.stdout and "mAP@all" in done.stdout and "time (s)" in done.stdout
    chain = yaml.safe_load(out.read_text())["rerank"]
    assert isinstance(chain, list)
    assert f"wrote {out}" in done.stdout.replace("\n", "")
    assert "validation split: CMC@1" in done.stdout
