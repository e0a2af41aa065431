"""Helpers the tests import (fixtures live in conftest.py): what tests need to write but the library never does."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from lookalike.atomic import atomic_path
from lookalike.models.pairwise import SPEC_KEY, PairwiseModel


def save_pairwise(model: PairwiseModel, path: str | os.PathLike) -> Path:
    """Write an untrained model's spec and weights as training's checkpoint holds them, so load_pairwise reads it back
    without a training run."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({SPEC_KEY: asdict(model.spec), "state_dict": model.state_dict()}, tmp)
    return Path(path)
