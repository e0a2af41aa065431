"""The CTL recipes (configs/market.yaml, duke.yaml) carry the official centroids-reid values and their header commands
run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lookalike.config import load_config
from lookalike.data.convert import CONVERTERS

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("name, precision", [("market", "32-true"), ("duke", "16-mixed")])
def test_recipe_has_the_official_values(name, precision):
    cfg = load_config(CONFIGS / f"{name}.yaml", [])
    t, loss = cfg.train, cfg.train.loss
    assert (t.optimizer, t.lr, t.weight_decay, t.epochs, t.warmup_epochs, t.step_epochs) == (
        "adam",
        3.5e-4,
        5e-4,
        120,
        10,
        [40, 70],
    )
    assert (t.p, t.k, t.few_images, t.runs, t.val_every) == (16, 4, "pad", 3, 40)
    assert (loss.margin, loss.centroid_margin, loss.centroid_mode) == (0.5, 0.5, "official")
    assert (loss.center, loss.center_scale, loss.center_optimizer, loss.center_lr) == (5e-4, 1.0, "sgd", 0.5)
    assert (loss.cross_entropy, loss.label_smoothing) == (1.0, 0.1)
    assert cfg.trainer.precision == precision  # Market's script turns mixed precision off, Duke's keeps the yml's True
    assert (
        cfg.model.bnneck
        and cfg.model.last_stride == 1
        and cfg.data.image_size == [256, 128]
        and cfg.evaluate.centroids == "label_sequence"
    )


@pytest.mark.parametrize("name", ["market", "duke"])
def test_header_commands_name_real_converters_and_valid_overrides(name):
    path = CONFIGS / f"{name}.yaml"
    commands = [
        shlex.split(line.lstrip("#").split("#")[0])
        for line in path.read_text().splitlines()
        if re.match(r"#\s+lookalike ", line)
    ]
    converts = [c for c in commands if c[1] == "convert"]
    trains = [c for c in commands if c[1] == "train"]
    assert converts and trains
    for command in converts:
        assert command[2] in CONVERTERS
        assert command[4] == load_config(path, []).data.table  # the table the recipe reads
    for command in trains:
        assert Path(command[2]).name == path.name
        load_config(path, command[3:])  # every override is a valid key and value
