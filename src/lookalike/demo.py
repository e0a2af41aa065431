"""The embedded demo: the whole pipeline on scikit-learn's bundled digits (or any class-per-folder tree), before and after training."""

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
from lookalike.data.table import DatasetTable
from lookalike.metrics import MetricsReport, cmc_curve
from lookalike.pipeline import Evaluation, run_evaluate, run_extract, run_search
from lookalike.train import TrainResult, run_train
from lookalike.train.pairwise import run_train_reranker
from lookalike.viz import save_cmc_curve

DEMO_OVERRIDES = (
    "model.name=resnet18",
    "model.pretrained=false",
    "data.image_size=64",
    "data.crop_fraction=1.0",
    "data.batch_size=128",
    "search.k=1000",
    "train.epochs=3",
    "train.batches_per_epoch=20",
    "train.p=5",
    "train.k=8",
    "train.lr=1e-3",
    "train.augment=none",
    "train.grid=false",
    "train.validate_before=false",  # the demo evaluates the untrained model itself
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=5",
)
PAIRWISE_OVERRIDES = (  # a short STIR training (50 steps) of the trained extractor's backbone at 16 px (the digits are 8 x 8)
    "pairwise.init_from_extractor=true",
    "pairwise.pretrained=false",
    "pairwise.image_size=16",
    "pairwise.mining=random",
    "pairwise.top_n=5",
    "pairwise.batch_size=256",
    "train.epochs=2",
    "train.batches_per_epoch=25",
    "train.lr=1e-3",
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
    evaluation: Evaluation  # of the trained model (or the untrained one when training is off)
    untrained: MetricsReport
    table_path: Path
    training: TrainResult | None = None
    reranking: TrainResult | None = None  # the pairwise re-ranker's training: metrics_before = the extractor's lists


def demo_config(out_dir: Path, overrides: tuple[str, ...] = ()) -> Config:
    """The demo's config: a small timm model at low resolution trained briefly from scratch, outputs under out_dir."""
    paths = (
        f"data.table={out_dir / 'table.csv'}",
        f"extract.output={out_dir / 'embeddings.npz'}",
        f"search.output={out_dir / 'results.npz'}",
        f"evaluate.output={out_dir / 'metrics.json'}",
        f"evaluate.grid={out_dir / 'grid.png'}",
        f"evaluate.cmc_plot={out_dir / 'cmc.png'}",
        f"train.output={out_dir / 'train'}",
    )
    return load_config(None, DEMO_OVERRIDES + paths + tuple(overrides))


def _untrained_config(cfg: Config) -> Config:
    """The same run without training: outputs renamed *_untrained, no pictures."""
    out = Path(cfg.evaluate.output).parent
    return cfg.model_copy(
        update={
            "extract": cfg.extract.model_copy(update={"output": str(out / "embeddings_untrained.npz")}),
            "search": cfg.search.model_copy(update={"output": str(out / "results_untrained.npz")}),
            "evaluate": cfg.evaluate.model_copy(update={"output": str(out / "metrics_untrained.json"), "grid": None, "cmc_plot": None}),
        }
    )


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    images: str | os.PathLike | None = None,
    overrides: tuple[str, ...] = (),
    seed: int = 0,
    progress: Progress | None = None,
    rerank: bool = True,
) -> DemoRun:
    """Import the images (digits by default); evaluate the untrained model; train it (train.epochs > 0); evaluate again;
    then (rerank) train the STIR pairwise re-ranker briefly and re-rank the trained model's top 5."""
    out_dir = Path(out_dir)
    root = Path(images) if images else write_digits(out_dir / "digits")
    cfg = demo_config(out_dir, overrides + (f"train.seed={seed}",))
    table = import_folder(root, validation_fraction=0.5, seed=seed)
    table.save(cfg.data.table)
    before = _pipeline(_untrained_config(cfg), table, progress, seed)
    training = run_train(cfg) if cfg.train.epochs > 0 else None
    if training is not None:
        cfg.model.weights = str(training.best_checkpoint or training.last_checkpoint)
    after = _pipeline(cfg, table, progress, seed)
    if cfg.evaluate.cmc_plot and training is not None:
        curves = {"untrained": cmc_curve(before.report.relevance, before.report.n_relevant),
                  "trained": cmc_curve(after.report.relevance, after.report.n_relevant)}
        save_cmc_curve(curves, cfg.evaluate.cmc_plot)
    reranking = run_train_reranker(_pairwise_config(cfg, out_dir), progress=progress) if rerank and training is not None else None
    return DemoRun(cfg, after, before.report, Path(cfg.data.table), training, reranking)


def _pairwise_config(cfg: Config, out_dir: Path) -> Config:
    """The demo config with the short pairwise training's settings, its outputs under out_dir/pairwise."""
    return load_config(None, (*PAIRWISE_OVERRIDES, f"pairwise.name={cfg.model.name}", f"train.output={out_dir / 'pairwise'}"), base=cfg)


def _pipeline(cfg: Config, table: DatasetTable, progress: Progress | None, seed: int) -> Evaluation:
    """Extract, search, evaluate with one config (the untrained backbone's random weights seeded, so numbers repeat)."""
    torch.manual_seed(seed)
    embeddings = run_extract(cfg, table, progress)
    return run_evaluate(cfg, table, run_search(cfg, table, embeddings))
