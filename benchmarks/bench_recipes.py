"""Screen training recipes on the bundled Omniglot subset: CMC@1, mAP@all and the spread of the embedding space.

Run from the repository root with the project's python:

    .venv/bin/python benchmarks/bench_recipes.py [--epochs N] [--batches N] [--seed S] [--only NAME,NAME]

Each recipe is configs/omniglot.yaml plus a few overrides (RECIPES below), trained once with the same seed,
validated once at the end (every validation image a query against all the others). Printed per recipe: CMC@1,
mAP@all, the median distance from each validation embedding to its nearest other one (a collapsed space has
~1e-3 there; a spread unit-sphere space ~0.5-1), and the last epoch's mean triplet loss next to the loss of a
collapsed space (the margin; ln 2 for the soft margin).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-cache" / "bench_recipes"
RECIPES: dict[str, list[str]] = {
    "margin 0.2 (old default)": ["train.loss.margin=0.2"],
    "soft margin": ["train.loss.margin=null"],
    "margin 0.2 + lr 1e-4": ["train.loss.margin=0.2", "train.lr=1e-4"],
    "soft margin + bnneck + ce": ["train.loss.margin=null", "model.bnneck=true", "train.loss.cross_entropy=1"],
    "soft margin + lr 1e-4": ["train.loss.margin=null", "train.lr=1e-4"],
    "margin 0.2 + bnneck + ce": ["train.loss.margin=0.2", "model.bnneck=true", "train.loss.cross_entropy=1"],
}


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    parser.add_argument("--batches", type=int, default=15, help="batches per epoch (default 15)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    return parser.parse_args()


def log(message: str) -> None:
    """One line on stdout, flushed (the benchmark's output)."""
    print(message, flush=True)


def median_nn_distance(vectors: np.ndarray) -> float:
    """Median euclidean distance from each row to its nearest other row."""
    x = vectors.astype(np.float64)
    squared = (x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * x @ x.T
    np.fill_diagonal(squared, np.inf)
    return float(np.median(np.sqrt(np.clip(squared.min(1), 0, None))))


def last_epoch_triplet(output: Path) -> float:
    """Mean of the logged train/triplet values of the last epoch (CSV logger)."""
    frame = pd.read_csv(next((output / "csv").glob("version_*/metrics.csv")))
    steps = frame.dropna(subset=["train/triplet"])
    return float(steps[steps["epoch"] == steps["epoch"].max()]["train/triplet"].mean())


def run_recipe(name: str, overrides: list[str], args: argparse.Namespace, table: Path) -> dict:
    """Train one recipe; its metrics, spread and last-epoch loss."""
    from lookalike.config import load_config
    from lookalike.core.table import load_table
    from lookalike.extract import embed
    from lookalike.models.extractor import Extractor
    from lookalike.train import run_train

    output = CACHE / "".join(c if c.isalnum() else "_" for c in name)
    shutil.rmtree(output, ignore_errors=True)
    base = [
        f"data.table={table}",
        "data.num_workers=0",
        f"train.output={output}",
        f"train.seed={args.seed}",
        f"train.epochs={args.epochs}",
        f"train.batches_per_epoch={args.batches}",
        f"train.val_every={args.epochs}",
        "train.validate_before=false",
        "train.grid=false",
        "trainer.progress=false",
        "trainer.log_every_n_steps=1",
    ]
    cfg = load_config(ROOT / "configs" / "omniglot.yaml", [*base, *overrides])
    started = time.perf_counter()
    result = run_train(cfg)
    seconds = time.perf_counter() - started
    extractor = Extractor.from_config(cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": None})}))
    from lookalike.models.extractor import load_weights

    load_weights(extractor, result.last_checkpoint)
    vectors = embed(extractor, load_table(cfg.data.table).split("validation")).vectors
    margin = cfg.train.loss.margin
    return {
        "cmc@1": result.metrics["cmc@1"],
        "map@all": result.metrics["map@all"],
        "nn": median_nn_distance(vectors),
        "loss": last_epoch_triplet(output),
        "collapsed_loss": math.log(2) if margin is None else margin,
        "seconds": seconds,
    }


def main() -> int:
    """Prepare the table once, train every recipe, print one line each."""
    import torch

    from lookalike.data.bundled import prepare_omniglot

    args = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    table = prepare_omniglot(CACHE / "data").table_path
    names = [n for n in RECIPES if not args.only or n in args.only.split(",")]
    log(f"[settings] configs/omniglot.yaml, {args.epochs} epochs x {args.batches} batches, seed {args.seed}")
    for name in names:
        r = run_recipe(name, RECIPES[name], args, table)
        log(
            f"{name:<26} CMC@1 {r['cmc@1']:.4f}  mAP@all {r['map@all']:.4f}  median NN distance {r['nn']:.4f}  "
            f"last-epoch triplet loss {r['loss']:.4f} (collapsed: {r['collapsed_loss']:.4f})  {r['seconds']:.0f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
