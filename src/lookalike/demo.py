"""The embedded demo: the whole pipeline on scikit-learn's bundled digits (or any class-per-folder tree)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lookalike.config import Config, load_config
from lookalike.data.folder import import_folder
from lookalike.extract import Progress
from lookalike.pipeline import Evaluation, run_evaluate, run_extract, run_search

DEMO_OVERRIDES = (
    "model.name=resnet18",
    "model.pretrained=false",
    "data.image_size=64",
    "data.crop_fraction=1.0",
    "data.batch_size=128",
    "search.k=1000",
)


def write_digits(folder: str | os.PathLike, scale: int = 4) -> Path:
    """Save scikit-learn's 1,797 bundled 8x8 digits as PNGs in folder/<digit>/<n>.png (offline, no download)."""
    from sklearn.datasets import load_digits

    folder = Path(folder)
    digits = load_digits()
    pixels = (255 - digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    for n, (img, label) in enumerate(zip(pixels, digits.target)):
        out = folder / str(label) / f"{n:04d}.png"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).resize((8 * scale, 8 * scale), Image.NEAREST).save(out)
    return folder


@dataclass
class DemoRun:
    config: Config
    evaluation: Evaluation
    table_path: Path


def demo_config(out_dir: Path, overrides: tuple[str, ...] = ()) -> Config:
    """The demo's config: a small untrained timm model at low resolution, outputs under out_dir."""
    paths = (
        f"data.table={out_dir / 'table.csv'}",
        f"extract.output={out_dir / 'embeddings.npz'}",
        f"search.output={out_dir / 'results.npz'}",
        f"evaluate.output={out_dir / 'metrics.json'}",
        f"evaluate.grid={out_dir / 'grid.png'}",
        f"evaluate.cmc_plot={out_dir / 'cmc.png'}",
    )
    return load_config(None, DEMO_OVERRIDES + paths + tuple(overrides))


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    images: str | os.PathLike | None = None,
    overrides: tuple[str, ...] = (),
    seed: int = 0,
    progress: Progress | None = None,
) -> DemoRun:
    """Import the images (digits by default), embed, search, evaluate; everything lands in out_dir."""
    out_dir = Path(out_dir)
    root = Path(images) if images else write_digits(out_dir / "digits")
    cfg = demo_config(out_dir, overrides)
    torch.manual_seed(seed)  # the untrained backbone's random weights, so the demo's numbers repeat
    table = import_folder(root, validation_fraction=0.5, seed=seed)
    table.save(cfg.data.table)
    embeddings = run_extract(cfg, table, progress)
    results = run_search(cfg, table, embeddings)
    return DemoRun(cfg, run_evaluate(cfg, table, results), Path(cfg.data.table))
