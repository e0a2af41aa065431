"""What the tests import (fixtures live in conftest.py): the real command, shared settings, and writers the library
has no use for."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lookalike.config import Config, load_config
from lookalike.core.atomic import atomic_path
from lookalike.core.embeddings import Embeddings
from lookalike.core.table import DatasetTable, validate_table
from lookalike.models.pairwise import PairwiseModel
from lookalike.models.spec import store_spec

LOOKALIKE = str(Path(sys.executable).parent / "lookalike")  # the real command, installed beside this Python
# seconds of extractor training on the CPU (with a model.name): P x K = 2 x 4 batches of 32 px images, no augmentation
TINY_TRAINING = [
    "model.pretrained=false",
    "data.image_size=32",
    "data.crop_fraction=1.0",
    "data.batch_size=16",
    "train.p=2",
    "train.k=4",
    "train.lr=1e-3",
    "train.augment=none",
    "trainer.accelerator=cpu",
    "trainer.progress=false",
]


def save_pairwise(model: PairwiseModel, path: str | os.PathLike) -> Path:
    """Write an untrained model's spec and weights as training's checkpoint holds them, so load_pairwise reads it back
    without a training run."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(store_spec({"state_dict": model.state_dict()}, "pairwise", asdict(model.spec)), tmp)
    return Path(path)


def index_config(table: Path, folder: Path, *extra: str) -> Config:
    """The settings of the served test index: a tiny untrained model over the validation split of `table`, re-ranked by
    k-reciprocal then query expansion; `extra` overrides come last."""
    return load_config(
        None,
        [
            f"data.table={table}",
            "model.name=test_resnet",
            "model.pretrained=false",
            "data.image_size=32",
            "data.batch_size=64",
            f"serve.index_dir={folder}",
            "serve.gallery=validation",
            "rerank=[kreciprocal, {qe: {n: 3}}]",
            *extra,
        ],
    )


def unfiled_validation(
    folder: Path, labels: np.ndarray, vectors: np.ndarray, sequences: list | None = None
) -> tuple[DatasetTable, Embeddings]:
    """A validation table of images that exist only by name (`i.png`, every row a query and a gallery item), and the
    rows' vectors scaled to unit length as their embeddings."""
    frame = pd.DataFrame(
        {
            "label": labels,
            "path": [f"{i}.png" for i in range(len(labels))],
            "split": "validation",
            "is_query": True,
            "is_gallery": True,
        }
    )
    if sequences is not None:
        frame["sequence"] = sequences
    table = validate_table(frame.astype(str), folder, check_files=False)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return table, Embeddings(unit.astype(np.float32), frame["path"].to_numpy(str))
