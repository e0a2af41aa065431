"""`lookalike adapt` and `extract-pairs`: features (cached), repeated random splits, training, raw vs adapted top-k.

Two protocols (adapt.protocol). `lookalike` (the default, deliberately sounder): each of adapt.runs seeds draws train /
validation / test pairs, the PCA is fitted on that run's training pairs only and the epoch kept is the best on the
validation pairs. `reference`: the published command of Risser-Maroix et al.'s repository,
`train.py --model original -e 150 -r 1 -t 15 --test-split 0.25 -k 1 3 5` on features reduced by a PCA fitted on every
image before the split (`extract.py --processor adapt-pca 256`): one run, floor(0.25 n) test pairs and the rest for
training (no validation), Linear(-> 1024) (or adapt.module), Adam 1e-3 full batch, the loss averaged over the plain and
the mirrored pairs when there are mirrors (`--data-aug`), test pairs scored after every epoch and the last epoch
reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lookalike.adapt.backbones import Progress, create_layer_features
from lookalike.adapt.evaluate import topk_accuracy
from lookalike.adapt.features import PairFeatures, extract_pair_features, with_table_pca
from lookalike.adapt.pca import PCAProjection, fit_pca
from lookalike.adapt.train import FitResult, TrainSettings, fit_adapter
from lookalike.config import Config
from lookalike.core.atomic import atomic_path, write_text_atomic
from lookalike.core.errors import ConfigError, LookalikeError
from lookalike.data.pairs import PairsTable, load_pairs, read_name_list, subset_pairs
from lookalike.devices import resolve_device
from lookalike.provenance import record as provenance

SPLIT_NAMES = ("train", "validation", "test")
# what the reference protocol fixes: the published command's flags and train.py's hard-coded choices
REFERENCE = {
    "epochs": 150,
    "runs": 1,
    "test_fraction": 0.25,
    "validation_fraction": 0.0,
    "top_k": [1, 3, 5],
    "scale": 15.0,
    "hidden": 1024,
    "lr": 1.0e-3,
    "weight_decay": 0.0,
    "batch_size": None,
    "split": "random",
}


@dataclass
class RunResult:
    """One split of the pairs: its seed, sizes, the epoch kept and the test accuracies of raw and adapted features."""

    seed: int
    sizes: dict[str, int]
    best_epoch: int
    raw: dict[str, float]
    adapted: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list, repr=False)


@dataclass
class AdaptResult:
    """Every run, and where the features, metrics and logs are."""

    runs: list[RunResult]
    features: Path
    features_reused: bool
    output: Path
    n_pairs: int
    dim: int

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """Mean and std over runs (std with ddof=1; 0 for one run) of every test metric, raw and adapted."""
        return {kind: mean_std([getattr(r, kind) for r in self.runs]) for kind in ("raw", "adapted")}

    def to_dict(self) -> dict:
        runs = [{k: v for k, v in asdict(r).items() if k != "history"} for r in self.runs]
        return {
            "n_pairs": self.n_pairs,
            "feature_dim": self.dim,
            "features": str(self.features),
            "summary": self.summary(),
            "runs": runs,
        }


def mean_std(records: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per key: mean and sample standard deviation over the records."""
    values = {k: np.array([r[k] for r in records], dtype=float) for k in records[0]}
    return {k: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0} for k, v in values.items()}


def protocol_config(cfg: Config) -> Config:
    """The config that runs: unchanged for the lookalike protocol, the reference command's settings for `reference`."""
    a = cfg.adapt
    if a.protocol != "reference":
        return cfg
    if a.split == "table":
        raise ConfigError(
            "adapt.split: the reference protocol draws its own test split (25 % of all pairs); use adapt.split=random "
            "or adapt.protocol=lookalike"
        )
    return cfg.model_copy(update={"adapt": a.model_copy(update=REFERENCE)})


def protocol_summary(cfg: Config) -> str:
    """One line saying which protocol runs with `cfg` (after protocol_config) and what it does."""
    a = cfg.adapt
    if a.protocol == "reference":
        return (
            f"protocol: reference (the published train.py -e {a.epochs} -r {a.runs} -t {a.scale:g} --test-split "
            f"{a.test_fraction} "
            f"-k {' '.join(map(str, a.top_k))}; PCA fitted on all pairs before the split; last epoch reported)"
        )
    pca = "PCA fitted on each run's training pairs" if a.pca_dim is not None else "no PCA"
    return (
        f"protocol: lookalike ({pca}; epoch chosen on validation pairs by {a.monitor}; {a.runs} runs; "
        "adapt.protocol=reference for the published one)"
    )


def pairs_from_config(cfg: Config) -> PairsTable:
    """adapt.pairs as a pairs table: a CSV, or a folder of left/ and right/ images paired by file name; then
    adapt.subset."""
    a = cfg.adapt
    if not a.pairs:
        raise ConfigError(
            "adapt.pairs: expected a pairs CSV (left, right[, split]) or a folder with left/ and right/, e.g. "
            "adapt.pairs=pairs.csv"
        )
    if Path(a.pairs).is_dir():
        from lookalike.data.convert import convert

        pairs = convert("tll", a.pairs).table
    else:
        pairs = load_pairs(a.pairs, a.root)
    return subset_pairs(pairs, read_name_list(a.subset, a.subset_column), a.subset) if a.subset else pairs


def extraction_settings(cfg: Config) -> dict:
    """What the features depend on besides the pairs; a cache with other settings is extracted again."""
    d = cfg.data
    backbones = []
    for b in cfg.adapt.backbones:
        spec = b.model_dump()
        if b.weights:  # a retrained checkpoint at the same path must not reuse old features
            stat = Path(b.weights).stat() if Path(b.weights).is_file() else None
            spec["weights_stamp"] = [stat.st_size, stat.st_mtime_ns] if stat else None
        spec["image_size"] = b.image_size or d.image_size
        backbones.append(spec)
    return json.loads(json.dumps({"backbones": backbones, "crop_fraction": d.crop_fraction, "flip": cfg.adapt.flip}))


def extract_from_config(cfg: Config, pairs: PairsTable, progress: Progress | None = None) -> PairFeatures:
    """Extract features of every pair with adapt.backbones, fit the PCA on the table's train pairs, save to
    adapt.features."""
    a, d = cfg.adapt, cfg.data
    if not a.backbones:
        raise ConfigError("adapt.backbones: expected at least one backbone, e.g. [{name: resnet50, layers: [-1]}]")
    backbones = [
        create_layer_features(b.name, b.layers, b.pretrained, b.weights, f"adapt.backbones[{i}]")
        for i, b in enumerate(a.backbones)
    ]
    sizes = [b.image_size or d.image_size for b in a.backbones]
    features = extract_pair_features(
        pairs,
        backbones,
        sizes,
        d.crop_fraction,
        a.flip,
        d.batch_size,
        d.num_workers,
        resolve_device(a.device, "adapt.device"),
        progress,
    )
    features.meta["settings"] = extraction_settings(cfg)
    features = with_table_pca(features, a.pca_dim, a.seed)
    features.save(a.features)
    return features


def cached_features(cfg: Config, pairs: PairsTable, progress: Progress | None = None) -> tuple[PairFeatures, bool]:
    """adapt.features when it holds these pairs extracted with these settings (reused: True), else a fresh
    extraction."""
    path = Path(cfg.adapt.features)
    if path.is_file():
        cached = PairFeatures.load(path)
        same_pairs = (
            list(cached.left_ids) == pairs.column("left").tolist()
            and list(cached.right_ids) == pairs.column("right").tolist()
        )
        if same_pairs and cached.meta.get("settings") == extraction_settings(cfg):
            return cached, True
    return extract_from_config(cfg, pairs, progress), False


def draw_split(table_split: np.ndarray, cfg: Config, seed: int) -> np.ndarray:
    """'train' / 'validation' / 'test' per pair: random shares of all pairs, or (adapt.split=table) the table's
    validation
    pairs as test and a random share of its train pairs as validation."""
    a, n = cfg.adapt, len(table_split)
    rng = np.random.default_rng(seed)
    split = np.full(n, "train", dtype=object)
    if a.split == "table":
        split[table_split == "validation"] = "test"
        train = rng.permutation(np.flatnonzero(table_split != "validation"))
        split[train[: int(round(a.validation_fraction * len(train)))]] = "validation"
    else:
        order = rng.permutation(n)
        n_test, n_val = int(round(a.test_fraction * n)), int(round(a.validation_fraction * n))
        split[order[:n_test]] = "test"
        split[order[n_test : n_test + n_val]] = "validation"
    sizes = {name: int((split == name).sum()) for name in SPLIT_NAMES}
    if sizes["train"] < 2 or sizes["test"] < 2:
        raise LookalikeError(
            f"adapt: {n} pairs split into {sizes}; expected at least 2 train and 2 test pairs (adapt.split, "
            "test_fraction, validation_fraction)"
        )
    return split.astype(str)


def reference_split(n: int, test_fraction: float, seed: int) -> np.ndarray:
    """The reference's split: shuffle the pairs, the first floor(test_fraction * n) are test, the rest train."""
    order = np.random.default_rng(seed).permutation(n)
    split = np.full(n, "train", dtype=object)
    split[order[: int(np.floor(test_fraction * n))]] = "test"
    if (split == "test").sum() < 2 or (split == "train").sum() < 2:
        raise LookalikeError(
            f"adapt: {n} pairs split into {int((split == 'train').sum())} train and {int((split == 'test').sum())} "
            "test pairs; expected at least 2 of each"
        )
    return split.astype(str)


def pairs_at(features: PairFeatures, rows: np.ndarray) -> PairFeatures:
    """The pairs at `rows`."""
    flips = (
        {"left_flip": features.left_flip[rows], "right_flip": features.right_flip[rows]} if features.has_flip else {}
    )
    return PairFeatures(
        features.left[rows],
        features.right[rows],
        features.left_ids[rows],
        features.right_ids[rows],
        features.split[rows],
        **flips,
    )


def run_pca(features: PairFeatures, split: np.ndarray, dim: int | None, seed: int) -> PCAProjection | None:
    """The PCA of one run, fitted on the images of its training pairs only (never validation or test pairs)."""
    return fit_pca(features.images(np.flatnonzero(split == "train")), dim, seed) if dim is not None else None


def settings_from_config(cfg: Config) -> TrainSettings:
    a = cfg.adapt
    device = str(resolve_device(a.device, "adapt.device"))
    mirrors = "both" if a.protocol == "reference" else "random"
    return TrainSettings(
        a.module,
        a.hidden,
        a.scale,
        a.lr,
        a.weight_decay,
        a.epochs,
        a.batch_size,
        a.monitor,
        tuple(a.top_k),
        device,
        mirrors,
    )


def score_test(module: nn.Module, test: PairFeatures, ks: tuple[int, ...], device: str) -> dict[str, float]:
    """Top-k accuracies of the module's outputs on the test pairs (gallery: the test pairs' other side)."""
    with torch.no_grad():
        left, right = (module(torch.as_tensor(x, device=device)) for x in (test.left, test.right))
    return topk_accuracy(left, right, ks)


def run_once(
    features: PairFeatures, cfg: Config, seed: int
) -> tuple[RunResult, FitResult, PCAProjection | None, np.ndarray]:
    """One split: PCA on its train pairs, the identity (raw) and the trained module, both scored on its test pairs.
    The reference protocol (cfg after protocol_config): its split, PCA on all pairs, test curves, the last epoch."""
    a = cfg.adapt
    if a.protocol == "reference":
        split = reference_split(len(features), a.test_fraction, seed)
        pca = (
            fit_pca(features.images(np.arange(len(features))), a.pca_dim, seed) if a.pca_dim is not None else None
        )  # all, before the split
    else:
        split = draw_split(features.split, cfg, seed)
        pca = run_pca(features, split, a.pca_dim, seed)
    reduced = features.project(pca)
    parts = {name: pairs_at(reduced, np.flatnonzero(split == name)) for name in SPLIT_NAMES}
    s = settings_from_config(cfg)
    if a.protocol == "reference":
        fit = fit_adapter(parts["train"], None, s, seed, test=parts["test"])
    else:
        fit = fit_adapter(parts["train"], parts["validation"], s, seed)
    raw = score_test(nn.Identity(), parts["test"], s.top_k, s.device)
    adapted = score_test(fit.module, parts["test"], s.top_k, s.device)
    sizes = {name: len(part) for name, part in parts.items()}
    return RunResult(seed, sizes, fit.best_epoch, raw, adapted, fit.history), fit, pca, split


def save_run(folder: Path, fit: FitResult, pca: PCAProjection | None, split: np.ndarray) -> None:
    """The kept module's weights, the run's PCA arrays and its split per pair."""
    with atomic_path(folder / "adapter.pt") as tmp:
        torch.save(fit.module.state_dict(), tmp)
    with atomic_path(folder / "run.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, split=split, **(pca.arrays() if pca is not None else {}))


def fresh_writer(folder: Path) -> SummaryWriter:
    """A TensorBoard writer whose folder holds only this run's curves (a rerun replaces them, as it replaces
    metrics.json)."""
    for stale in folder.glob("events.out.tfevents.*"):
        stale.unlink()
    return SummaryWriter(str(folder))


def log_curves(
    writer: SummaryWriter, history: list[dict[str, float]], test: dict[str, dict[str, float]], step: int
) -> None:
    """Per-epoch curves, then the test numbers (raw, adapted) at the epoch kept."""
    for epoch, record in enumerate(history):
        for key, value in record.items():
            writer.add_scalar(key, value, epoch)
    for kind, metrics in test.items():
        for key, value in metrics.items():
            writer.add_scalar(f"test_{kind}/{key}", value, step)
    writer.close()


def log_average(folder: Path, runs: list[RunResult]) -> None:
    """Curves averaged over runs, epoch by epoch, and the mean test numbers."""
    history = [
        {k: float(np.mean([r.history[e][k] for r in runs])) for k in record} for e, record in enumerate(runs[0].history)
    ]
    means = {
        kind: {k: v["mean"] for k, v in mean_std([getattr(r, kind) for r in runs]).items()}
        for kind in ("raw", "adapted")
    }
    log_curves(fresh_writer(folder), history, means, int(np.mean([r.best_epoch for r in runs])))


def run_adapt(
    cfg: Config, progress: Progress | None = None, runs_progress: Callable[[Iterable, int], Iterable] | None = None
) -> AdaptResult:
    """Features (cached), then adapt.runs random splits: train on each, score raw vs adapted on its test pairs; writes
    metrics.json, TensorBoard curves per run and averaged, and each run's module, PCA and split under adapt.output.
    adapt.protocol=reference runs the published command instead (protocol_config)."""
    cfg = protocol_config(cfg)
    a = cfg.adapt
    if a.runs < 1:
        raise ConfigError(f"adapt.runs: expected at least 1, got {a.runs}")
    pairs = pairs_from_config(cfg)
    features, reused = cached_features(cfg, pairs, progress)
    out, results = Path(a.output), []
    seeds = range(a.seed, a.seed + a.runs)
    for r, seed in enumerate(runs_progress(seeds, a.runs) if runs_progress else seeds):
        result, fit, pca, split = run_once(features, cfg, seed)
        save_run(out / f"run{r}", fit, pca, split)
        log_curves(
            fresh_writer(out / "tensorboard" / f"run{r}"),
            result.history,
            {"raw": result.raw, "adapted": result.adapted},
            result.best_epoch,
        )
        results.append(result)
    log_average(out / "tensorboard" / "average", results)
    adapt = AdaptResult(results, Path(a.features), reused, out, len(features), features.dim)
    record = {**adapt.to_dict(), "adapt": a.model_dump(), "provenance": provenance(cfg)}
    write_text_atomic(out / "metrics.json", json.dumps(record, indent=2) + "\n")
    return adapt
