"""Train the same model on the same data with lookalike and with Open Metric Learning 4.0.0: CMC@1 and speed.

Run from the repository root with the project's python:

    .venv/bin/python benchmarks/bench_train.py [--epochs N] [--seeds 0,1,2] [--model NAME] [--only oml|lookalike]

Both sides train a timm backbone (pretrained=False, num_classes=0: global pooled features, no
projection, L2-normalised) on the Omniglot subset with P x K batches, Adam, no augmentation, on CPU
with every core and images loaded in the main process (num_workers=0 on both sides: no loader
processes competing with the training threads for the cores, and the same loading on both sides),
then validate once at the end with every validation image a query against all the others.
OML trains with its own recipe, batch-hard triplet loss with margin 0.2 (euclidean); lookalike with
its default loss (train.loss of config.py; --recipe oml gives it OML's, --recipe soft-bnneck-ce the
screening's winner: soft margin + BNNeck + cross-entropy). Printed per side and seed:
CMC@1, mAP@all, the median distance of a validation embedding to its nearest other one (a collapsed
space: ~1e-3) and the last epoch's mean loss; then the seed-paired differences with 95% intervals.
OML runs in .bench-venvs/oml (built as in bench_metrics.py, plus timm) through
_oml_train_worker.py; lookalike runs here through lookalike.train.run_train.

images/s = training images processed / wall seconds of training (no validation, no data preparation).
lookalike's TrainResult.images_per_second times each batch from Lightning's on_train_batch_start to
on_train_batch_end, so batch loading is left out; the OML worker times its steps (forward, loss,
backward, optimiser step) the same way for the ratio, and also reports its whole-loop rate with
loading included. Exits non-zero when a side fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import zipfile
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np

from bench_metrics import ROOT, VENV, ensure_oml_venv, log, run_step
from lookalike.data.bundled import OMNIGLOT_ZIP

DATA_ZIP = OMNIGLOT_ZIP
CACHE = ROOT / ".bench-cache" / "bench_train"
WORKER = Path(__file__).resolve().with_name("_oml_train_worker.py")
MARGIN = 0.2
RECIPES = {  # lookalike's loss overrides per --recipe
    "default": [],  # train.loss as config.py sets it
    "oml": [f"train.loss.margin={MARGIN}", "train.loss.miner=batch_hard"],
    # the winner of bench_recipes.py's screening (docs/benchmarks.md, issue 20)
    "soft-bnneck-ce": ["train.loss.margin=null", "model.bnneck=true", "train.loss.cross_entropy=1"],
}
VALIDATION_FRACTION = 0.3


@dataclass(frozen=True)
class SideResult:
    """What one side reports."""

    cmc1: float
    images_per_second: float  # batch loading excluded, as lookalike's Throughput callback times it
    detail: str
    map_all: float = float("nan")
    neighbour_distance: float = float("nan")  # median distance of a validation embedding to its nearest other one
    last_loss: float = float("nan")  # mean triplet loss of the last epoch
    seed: int = -1  # the training seed (set by main)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs on both sides (default 3)")
    parser.add_argument("--model", default="resnet18", help="timm model name (default resnet18)")
    parser.add_argument("--image-size", type=int, default=64, help="input side in pixels (default 64)")
    parser.add_argument(
        "--crop-fraction",
        type=float,
        default=1.0,
        help="eval resize = size / fraction, then centre crop (default 1.0: plain resize)",
    )
    parser.add_argument("--p", type=int, default=16, help="labels per batch (default 16)")
    parser.add_argument("--k", type=int, default=4, help="images per label (default 4)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument(
        "--seeds", default="0", help="training seeds, comma-separated (default 0); each side trains once per seed"
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of the class split into train / validation (default 0)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="validation batch size (default 128)")
    parser.add_argument(
        "--data", type=Path, default=DATA_ZIP, help="zip of images_background_small1/<alphabet>/<character>/*.png"
    )
    parser.add_argument("--only", choices=("oml", "lookalike"), help="run one side only")
    parser.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="default",
        help="lookalike's loss: its default (train.loss of config.py), OML's (margin 0.2) or soft margin + BNNeck + "
        "cross-entropy; default: default",
    )
    return parser.parse_args()


def unpack(archive: Path) -> Path:
    """Unzip the archive once into .bench-cache/bench_train/images; return the folder of class folders."""
    target = CACHE / "images"
    stamp = target / f".unzipped-{archive.name}"
    if not stamp.exists():
        log(f"[data] unzipping {archive} into {target.relative_to(ROOT)}")
        shutil.rmtree(target, ignore_errors=True)
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(target)
        stamp.touch()
    folders = [p for p in target.iterdir() if p.is_dir()]
    if len(folders) != 1:
        sys.exit(f"bench_train: expected one top folder in {archive}, found {len(folders)}")
    return folders[0]


def build_table(images: Path, seed: int) -> tuple[Path, int, int, int]:
    """Write the dataset table both sides read; return its path, train images, train labels, validation images."""
    from lookalike.data.folder import import_folder

    table = import_folder(images, validation_fraction=VALIDATION_FRACTION, seed=seed)
    path = CACHE / "table.csv"
    table.save(path)
    train, validation = table.split("train"), table.split("validation")
    return path, len(train), train.counts()["labels"], len(validation)


def ensure_timm(python: Path) -> None:
    """Install into the OML venv the timm version this project uses (OML 4.0.0 does not depend on timm)."""
    wanted = version("timm")
    check = f"import importlib.metadata as m, sys; sys.exit(m.version('timm') != {wanted!r})"
    if subprocess.run([str(python), "-c", check], check=False, capture_output=True).returncode == 0:
        return
    pip = [str(python), "-m", "pip", "install", "--quiet", "--progress-bar", "off"]
    run_step(f"installing timm=={wanted} into {VENV.relative_to(ROOT)}", [*pip, f"timm=={wanted}"])


def worker_args(args: argparse.Namespace, table: Path) -> list[str]:
    """Command-line options for _oml_train_worker.py."""
    pairs = {
        "--table": table,
        "--model": args.model,
        "--image-size": args.image_size,
        "--crop-fraction": args.crop_fraction,
        "--p": args.p,
        "--k": args.k,
        "--epochs": args.epochs,
        "--lr": args.lr,
        "--margin": MARGIN,
        "--seed": args.seed,
        "--batch-size": args.batch_size,
        "--threads": os.cpu_count(),
    }
    return [str(item) for pair in pairs.items() for item in pair]


def run_oml(python: Path, args: argparse.Namespace, table: Path) -> SideResult | None:
    """Run the OML worker in its venv; None when it fails."""
    log(f"[OML] training in {VENV.relative_to(ROOT)} ...")
    completed = subprocess.run(
        [str(python), str(WORKER), *worker_args(args, table)], check=False, stdout=subprocess.PIPE, text=True
    )
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        log(f"[OML] FAILED: worker exit code {completed.returncode}")
        return None
    out = json.loads(lines[-1])
    detail = (
        f"OML {out['oml_version']}, {out['epochs']} epochs x {out['batches_per_epoch']} batches, "
        f"{out['images']} images; steps {out['step_seconds']:.1f} s, whole loop {out['train_seconds']:.1f} s "
        f"= {out['images_per_second']:.1f} images/s with batch loading; {out['threads']} threads"
    )
    return SideResult(
        out["cmc@1"],
        out["images_per_second_steps"],
        detail,
        out["map@all"],
        out["neighbour_distance"],
        out["last_epoch_loss"],
    )


def lookalike_overrides(args: argparse.Namespace, table: Path, batches_per_epoch: int, output: Path) -> list[str]:
    """Config overrides that match the OML side setting for setting."""
    return [
        f"data.table={table}",
        f"data.image_size={args.image_size}",
        f"data.crop_fraction={args.crop_fraction}",
        f"data.batch_size={args.batch_size}",
        "data.num_workers=0",
        f"model.name={args.model}",
        "model.pretrained=false",
        "model.embedding_dim=null",
        "model.normalize=true",
        f"train.output={output}",
        f"train.seed={args.seed}",
        f"train.epochs={args.epochs}",
        "train.optimizer=adam",
        f"train.lr={args.lr}",
        f"train.p={args.p}",
        f"train.k={args.k}",
        "train.augment=none",
        f"train.val_every={args.epochs}",
        "train.loss.triplet=1",
        *RECIPES[args.recipe],
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.progress=false",
        f"trainer.limit_train_batches={batches_per_epoch}",
        *optional_overrides(),
    ]


def optional_overrides() -> list[str]:
    """Settings that only save time (no validation before training, no result grids), where the config has them."""
    from lookalike.config import valid_keys

    wanted = {"train.validate_before": "false", "train.grid": "false"}
    return [f"{key}={value}" for key, value in wanted.items() if key in valid_keys()]


def lookalike_batches(table: Path, p: int, k: int) -> str:
    """Batches per epoch of lookalike's own P x K sampler on the train split, or why it is unknown."""
    try:
        from lookalike.core.table import load_table
        from lookalike.data.sampler import PKSampler

        labels = load_table(table, check_files=False).split("train").labels
        return str(len(PKSampler(labels, p, k, num_replicas=1, rank=0)))
    except Exception as exc:  # noqa: BLE001 - the sampler count is only reported
        return f"unknown ({exc.__class__.__name__}: {exc})"


def run_lookalike(args: argparse.Namespace, table: Path, batches_per_epoch: int) -> SideResult | None:
    """Train in this process with lookalike.train.run_train; None when it fails."""
    import torch

    output = CACHE / "lookalike-train"
    shutil.rmtree(output, ignore_errors=True)
    torch.set_num_threads(os.cpu_count() or 1)
    log("[lookalike] training ...")
    try:
        from lookalike.config import load_config
        from lookalike.train import run_train

        result = run_train(load_config(None, lookalike_overrides(args, table, batches_per_epoch, output)))
    except Exception as exc:  # noqa: BLE001 - any failure of this side is reported, the run goes on
        traceback.print_exc()
        log(f"[lookalike] FAILED: {exc.__class__.__name__}: {exc}")
        return None
    natural = lookalike_batches(table, args.p, args.k)
    detail = (
        f"lookalike, {args.epochs} epochs x min({natural} PKSampler batches, limit_train_batches={batches_per_epoch}), "
        f"{torch.get_num_threads()} threads, logs in {result.log_dir}"
    )
    losses = result.triplet_losses or [float("nan")]
    return SideResult(
        result.metrics["cmc@1"],
        result.images_per_second,
        detail,
        result.metrics["map@all"],
        result.neighbour_distance,
        losses[-1],
    )


def print_header(args: argparse.Namespace, sizes: tuple[int, int, int], batches_per_epoch: int) -> None:
    """The settings both sides share, and the epoch length."""
    n_train, n_labels, n_val = sizes
    log(
        f"[settings] model={args.model} (timm, pretrained=False, num_classes=0, L2-normalised) "
        f"image_size={args.image_size} "
        f"crop_fraction={args.crop_fraction} no augmentation"
    )
    log(
        f"[settings] P={args.p} K={args.k} OML: batch-hard triplet margin={MARGIN}; lookalike: {recipe(args)}; "
        f"euclidean, Adam lr={args.lr}, "
        f"epochs={args.epochs}, seeds={args.seeds}, split seed={args.split_seed}, val batch={args.batch_size}, "
        f"num_workers=0, threads={os.cpu_count()}, CPU"
    )
    log(f"[data] train: {n_train} images, {n_labels} labels; validation: {n_val} images (each a query vs all others)")
    log(
        f"[epoch] OML BalanceSampler: {n_labels} labels // P={args.p} = {batches_per_epoch} batches of "
        f"{args.p * args.k} "
        f"= {batches_per_epoch * args.p * args.k} images per epoch; lookalike capped to the same batch count"
    )


def recipe(args: argparse.Namespace) -> str:
    """lookalike's loss in words."""
    if args.recipe != "default":
        return f"{args.recipe}: {' '.join(RECIPES[args.recipe])}"
    from lookalike.config import LossConfig

    loss = LossConfig()
    margin = "soft margin" if loss.margin is None else f"margin={loss.margin}"
    return f"its default loss: {loss.miner} triplet {margin}"


def print_results(runs: dict[str, list[SideResult]], failed: bool) -> None:
    """One line per side and seed, then mean +- std per side and the ratios of the means."""
    for name, sides in runs.items():
        for side in sides:
            log(
                f"{name:<10} seed {side.seed}: CMC@1 {side.cmc1:.4f}  mAP@all {side.map_all:.4f}  median neighbour "
                f"distance {side.neighbour_distance:.4f}  last-epoch loss {side.last_loss:.4f}  images/s "
                f"{side.images_per_second:8.1f}  ({side.detail})"
            )
    means = {}
    for name, sides in runs.items():
        if sides:
            cmc, speed = np.array([s.cmc1 for s in sides]), np.array([s.images_per_second for s in sides])
            mean_ap, spread = np.array([s.map_all for s in sides]), np.array([s.neighbour_distance for s in sides])
            means[name] = (cmc.mean(), speed.mean())
            log(
                f"{name:<10} over {len(sides)} seed(s): CMC@1 {cmc.mean():.4f} +- {cmc.std():.4f}  mAP@all "
                f"{mean_ap.mean():.4f} +- {mean_ap.std():.4f}  median neighbour distance {spread.mean():.4f}  images/s "
                f"{speed.mean():.1f} +- {speed.std():.1f}"
            )
    if not failed and len(means) == 2:
        (ours_cmc, ours_speed), (oml_cmc, oml_speed) = means["lookalike"], means["OML"]
        log(
            f"ratio lookalike/OML (means): CMC@1 {ratio(ours_cmc, oml_cmc):.2f}, images/s "
            f"{ratio(ours_speed, oml_speed):.2f}"
        )
        ours, theirs = paired(runs["lookalike"], runs["OML"])
        log_paired("CMC@1", [s.cmc1 for s in ours], [s.cmc1 for s in theirs], ".4f")
        log_paired("mAP@all", [s.map_all for s in ours], [s.map_all for s in theirs], ".4f")
        log_paired("images/s", [s.images_per_second for s in ours], [s.images_per_second for s in theirs], ".1f")
    log("(images/s above: per-batch step time, batch loading excluded, as lookalike's Throughput callback times it)")


def paired(ours: list[SideResult], theirs: list[SideResult]) -> tuple[list[SideResult], list[SideResult]]:
    """The two sides' results of the seeds both completed, in seed order (a side that failed on a seed drops it)."""
    common = sorted({s.seed for s in ours} & {s.seed for s in theirs})
    return [next(s for s in ours if s.seed == seed) for seed in common], [
        next(s for s in theirs if s.seed == seed) for seed in common
    ]


def log_paired(name: str, ours: list[float], theirs: list[float], fmt: str) -> None:
    """Seed-paired difference lookalike - OML: mean, standard error, a Student-t 95% interval, seeds ahead."""
    from scipy.stats import t

    diff = np.array(ours) - np.array(theirs)
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    half = float(t.ppf(0.975, len(diff) - 1)) * se if len(diff) > 1 else float("nan")
    log(
        f"paired lookalike - OML, {name}: {diff.mean():+{fmt}} (standard error {se:{fmt}}, 95% t interval "
        f"{diff.mean() - half:+{fmt}} .. {diff.mean() + half:+{fmt}}); lookalike ahead on "
        f"{int((diff > 0).sum())} of {len(diff)} seeds"
    )


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs, NaN when theirs is 0."""
    return ours / theirs if theirs else float("nan")


def main() -> int:
    """Prepare data, train both sides once per seed, print the comparison; non-zero when a side fails."""
    args = parse_args()
    started = time.perf_counter()
    table, *sizes = build_table(unpack(args.data), args.split_seed)
    batches_per_epoch = sizes[1] // args.p
    print_header(args, tuple(sizes), batches_per_epoch)
    sides = [name for name in ("lookalike", "OML") if args.only != ("oml" if name == "lookalike" else "lookalike")]
    python = None
    if "OML" in sides:
        python = ensure_oml_venv()
        ensure_timm(python)
    runs: dict[str, list[SideResult]] = {name: [] for name in sides}
    failed = False
    for seed in (int(s) for s in args.seeds.split(",")):
        args.seed = seed
        for name in sides:
            side = run_oml(python, args, table) if name == "OML" else run_lookalike(args, table, batches_per_epoch)
            failed |= side is None
            if side is not None:
                runs[name].append(replace(side, seed=seed))
    print_results(runs, failed)
    log(f"total {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
