"""The embedded demo: the whole pipeline on the bundled Omniglot subset (or scikit-learn's digits, or any
class-per-folder
tree), every stage scored on the same validation queries so each one's gain shows: untrained -> trained extractor ->
k-reciprocal re-ranking -> the STIR pairwise re-ranker trained briefly."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lookalike.config import Config, load_config
from lookalike.core.embeddings import Embeddings
from lookalike.core.results import RetrievalResults
from lookalike.core.table import DatasetTable
from lookalike.data.bundled import unpack_omniglot
from lookalike.data.folder import import_folder
from lookalike.extract import Progress
from lookalike.metrics import MetricsReport, cmc_curve
from lookalike.pipeline import (
    Evaluation,
    rerank_context,
    run_evaluate,
    run_extract,
    run_search,
    validation_k,
    write_stage_metrics,
)
from lookalike.rerank import Stage, build_chain, run_chain
from lookalike.rerank.chain import stage_reports
from lookalike.train import TrainResult, run_train
from lookalike.train.pairwise import run_train_reranker
from lookalike.viz import save_cmc_curve

# configs/omniglot.yaml's recipe (ResNet-18 from scratch, 64 px, 16 x 4 batch-hard triplets) cut to 8 epochs, with the
# library's default loss (STIR's margin-0.2 triplet, not the config's BNNeck + cross-entropy: the figures below), and
# configs/omniglot_pairwise.yaml's STIR recipe (ResNet-18 from scratch on two stacked 32 px characters, random pairs)
# cut to 195 steps. Timed by benchmarks/bench_demo.py on 2 idle cores (2026-11-30): 261 s in all, each stage gaining
# (docs/benchmarks.md); at 450 STIR steps the demo took 434 s.
DEMO_OVERRIDES = (
    "model.name=resnet18",
    "model.pretrained=false",
    "model.embedding_dim=128",
    "data.image_size=64",
    "data.crop_fraction=1.0",
    "data.batch_size=128",
    "search.k=1000",  # every gallery item: mAP@all over the whole list
    "train.epochs=8",
    "train.batches_per_epoch=30",
    "train.p=16",
    "train.k=4",
    "train.lr=1e-3",
    "train.scheduler=cosine",
    "train.augment=none",
    "train.grid=false",
    "train.val_every=8",  # validate once, at the end
    "train.validate_before=false",  # the demo evaluates the untrained model itself
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=10",
)
PAIRWISE_OVERRIDES = (  # pairwise.name is model.name
    "pairwise.pretrained=false",
    "pairwise.image_size=32",
    "pairwise.mining=random",
    "pairwise.top_n=5",
    "pairwise.batch_size=256",
    "train.epochs=3",
    "train.batches_per_epoch=65",
    "train.val_every=3",
    "train.p=30",
    "train.k=4",
    "train.lr=1e-3",
    "train.scheduler=none",
)
DIGITS_OVERRIDES = (  # the 8 x 8 digits: 3 short epochs, a 50-step STIR of the extractor's backbone at 16 px
    "model.embedding_dim=null",
    "train.epochs=3",
    "train.batches_per_epoch=20",
    "train.p=5",
    "train.k=8",
    "train.scheduler=none",
    "train.val_every=1",
)
DIGITS_PAIRWISE = (
    "pairwise.init_from_extractor=true",
    "pairwise.image_size=16",
    "train.epochs=2",
    "train.batches_per_epoch=25",
    "train.p=5",
    "train.val_every=1",
)
# k-reciprocal re-ranking with its defaults: on Omniglot it lifts mAP@all the most (docs/benchmarks.md)
TRAINING_FREE = "kreciprocal"
METRIC_NAMES = {"cmc@1": "CMC@1", "map@all": "mAP@all"}


@dataclass
class StageGain:
    """One stage of the demo and the change of its headline metric over the stage before it."""

    name: str
    metric: str  # a key of MetricsReport.means
    before: float
    after: float

    @property
    def points(self) -> float:
        """The gain in percentage points."""
        return 100 * (self.after - self.before)

    def line(self) -> str:
        """E.g. 'stage trained extractor: CMC@1 0.412 -> 0.731 (+31.9 points)'."""
        label = METRIC_NAMES.get(self.metric, self.metric)
        return f"stage {self.name}: {label} {self.before:.3f} -> {self.after:.3f} ({self.points:+.1f} points)"


@dataclass
class DemoRun:
    config: Config
    evaluation: Evaluation  # of the trained model (or the untrained one when training is off)
    untrained: MetricsReport
    table_path: Path
    training: TrainResult | None = None
    reranking: TrainResult | None = None  # the pairwise re-ranker's training
    stages: list[Stage] = field(default_factory=list)  # the trained list, then each re-ranker's (run_chain)
    gains: list[StageGain] = field(default_factory=list)


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


def demo_config(out_dir: Path, overrides: tuple[str, ...] = ()) -> Config:
    """The demo's config: a small timm model at low resolution trained briefly from scratch, outputs under out_dir."""
    paths = (
        f"data.table={out_dir / 'table.csv'}",
        f"extract.output={out_dir / 'embeddings.npz'}",
        f"search.output={out_dir / 'results.npz'}",
        f"search.reranked_output={out_dir / 'results_reranked.npz'}",
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
            "evaluate": cfg.evaluate.model_copy(
                update={"output": str(out / "metrics_untrained.json"), "grid": None, "cmc_plot": None}
            ),
        }
    )


def demo_images(
    out_dir: Path, dataset: str, images: str | os.PathLike | None
) -> tuple[Path, tuple[str, ...], tuple[str, ...]]:
    """The image tree and its extra extractor and pairwise settings: a given folder, the digits, or the bundled
    Omniglot."""
    if images:
        return Path(images), (), ()
    if dataset == "digits":
        return write_digits(out_dir / "digits"), DIGITS_OVERRIDES, DIGITS_PAIRWISE
    return unpack_omniglot(out_dir), (), ()


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    images: str | os.PathLike | None = None,
    overrides: tuple[str, ...] = (),
    seed: int = 0,
    progress: Progress | None = None,
    rerank: bool = True,
    dataset: str = "omniglot",
    validation_fraction: float = 0.3,
    pairwise_overrides: tuple[str, ...] = (),
) -> DemoRun:
    """Import the images (the bundled Omniglot by default; `images` or dataset="digits" instead), evaluate the untrained
    model, train it (train.epochs > 0) and evaluate again; then (rerank) re-rank the trained list with k-reciprocal and
    with a briefly trained STIR pairwise model (`pairwise_overrides` change its training), each stage scored on the same
    queries: `gains` has one line per stage."""
    out_dir = Path(out_dir)
    root, extra, pairwise_extra = demo_images(out_dir, dataset, images)
    cfg = demo_config(out_dir, extra + overrides + (f"train.seed={seed}",))
    table = import_folder(root, validation_fraction=validation_fraction, seed=seed)
    table.save(cfg.data.table)
    cfg.search.k = validation_k(cfg.search.k, table)  # every gallery item a query may see, without the clamp's warning
    before = _pipeline(_untrained_config(cfg), table, progress, seed)
    if cfg.train.epochs <= 0:
        return DemoRun(cfg, before.evaluation, before.evaluation.report, Path(cfg.data.table))
    training = run_train(cfg)
    cfg.model.weights = str(training.last_checkpoint or training.best_checkpoint)
    after = _pipeline(cfg, table, progress, seed)
    gains = [
        StageGain(
            "trained extractor",
            "cmc@1",
            before.evaluation.report.means["cmc@1"],
            after.evaluation.report.means["cmc@1"],
        )
    ]
    run = DemoRun(cfg, after.evaluation, before.evaluation.report, Path(cfg.data.table), training, gains=gains)
    if rerank:
        run.reranking = run_train_reranker(
            _pairwise_config(cfg, out_dir, pairwise_extra + pairwise_overrides), progress=progress
        )
        run.stages = _rerank_stages(cfg, table, after, str(run.reranking.last_checkpoint))
        run.gains += stage_gains(run.stages)
    _save_curves(cfg, before.evaluation.report, after.evaluation.report, run.stages)
    return run


@dataclass
class _Pass:
    """One extract -> search -> evaluate pass: its embeddings, list and evaluation."""

    embeddings: Embeddings
    results: RetrievalResults
    evaluation: Evaluation


def _pipeline(cfg: Config, table: DatasetTable, progress: Progress | None, seed: int) -> _Pass:
    """Extract, search, evaluate with one config (the untrained backbone's random weights seeded, so numbers repeat)."""
    torch.manual_seed(seed)
    embeddings = run_extract(cfg, table, progress)
    results = run_search(cfg, table, embeddings)
    return _Pass(embeddings, results, run_evaluate(cfg, table, results))


def _pairwise_config(cfg: Config, out_dir: Path, extra: tuple[str, ...] = ()) -> Config:
    """The demo config with the short pairwise training's settings, its outputs under out_dir/pairwise."""
    paths = (f"pairwise.name={cfg.model.name}", f"train.output={out_dir / 'pairwise'}")
    return load_config(None, (*PAIRWISE_OVERRIDES, *paths, *extra), base=cfg)


def _rerank_stages(cfg: Config, table: DatasetTable, trained: _Pass, pairwise_weights: str) -> list[Stage]:
    """The trained list re-ranked by k-reciprocal, then its top 5 by the pairwise model; every stage scored and saved
    (metrics_rerank.json, the final list in search.reranked_output)."""
    p = load_config(None, PAIRWISE_OVERRIDES).pairwise
    chain = [
        TRAINING_FREE,
        {"pairwise": {"weights": pairwise_weights, "top_n": p.top_n, "batch_size": p.batch_size, "progress": False}},
    ]
    context = rerank_context(cfg, table, trained.results, trained.embeddings)
    stages = run_chain(trained.results, context, build_chain(chain), **cfg.evaluate.metric_kwargs())
    stages[-1].results.save(cfg.search.reranked_output)
    write_stage_metrics(stages, Path(cfg.evaluate.output).with_name("metrics_rerank.json"))
    return stages


STAGE_TITLES = {
    "kreciprocal": ("k-reciprocal re-ranking", "map@all"),
    "pairwise": ("STIR pairwise re-ranker (top 5)", "cmc@1"),
}


def stage_gains(stages: list[Stage]) -> list[StageGain]:
    """Each re-ranking stage's headline metric against the stage before it: mAP@all for k-reciprocal (it re-orders the
    whole list), CMC@1 for the pairwise model (it re-orders the top 5)."""
    gains = []
    for previous, stage in itertools.pairwise(stages):
        title, metric = STAGE_TITLES.get(stage.name, (stage.name, "cmc@1"))
        gains.append(StageGain(title, metric, previous.report.means[metric], stage.report.means[metric]))
    return gains


def _save_curves(cfg: Config, untrained: MetricsReport, trained: MetricsReport, stages: list[Stage]) -> None:
    """CMC curves of every stage in evaluate.cmc_plot (the trained list's own curve is replaced by this comparison)."""
    if not cfg.evaluate.cmc_plot:
        return
    reports = {"untrained": untrained, "trained extractor": trained}
    reports |= {
        STAGE_TITLES.get(k.split(":")[-1], (k,))[0]: r for k, r in stage_reports(stages).items() if k != "original"
    }
    save_cmc_curve({name: cmc_curve(r.relevance, r.n_relevant) for name, r in reports.items()}, cfg.evaluate.cmc_plot)
