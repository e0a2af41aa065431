"""Training and validation of an extractor (the Trainer and its shared pieces: lookalike.train.trainer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from lookalike.config import Config
from lookalike.core.atomic import write_text_atomic
from lookalike.core.errors import ConfigError
from lookalike.data.images import transforms_for
from lookalike.train.data import RetrievalDataModule, train_transform
from lookalike.train.module import ExtractorModule
from lookalike.train.trainer import (
    Throughput,
    TrainResult,
    build_trainer,
    check_monitor,
    fit_result,
    fit_until_sigterm,
    resume_checkpoint,
)

__all__ = [  # TrainResult and build_trainer live in lookalike.train.trainer; kept importable from here
    "RepeatedTrainResult",
    "TrainResult",
    "build_parts",
    "build_trainer",
    "run_train",
    "run_train_repeated",
    "run_validate",
]


def build_parts(cfg: Config) -> tuple[ExtractorModule, RetrievalDataModule]:
    """The Lightning module and data module a config describes."""
    from lookalike.pipeline import extractor_from_config, table_from_config

    check_monitor(cfg)
    table = table_from_config(cfg)
    extractor = extractor_from_config(cfg)
    dc, d, t = extractor.data_config(), cfg.data, cfg.train
    eval_tf = transforms_for(extractor, d)
    train_tf = train_transform(t.augment, d.image_size, d.crop_fraction, dc["mean"], dc["std"])
    data = RetrievalDataModule(
        table, train_tf, eval_tf, t.p, t.k, t.few_images, t.seed, d.batch_size, d.num_workers, t.batches_per_epoch
    )
    return ExtractorModule(extractor, cfg, data.n_classes, data.val_table), data


def run_train(cfg: Config, resume: str | None = None) -> TrainResult:
    """Train the extractor of `cfg` (validating before training and every train.val_every epochs); `resume` a checkpoint
    or 'last'."""
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module, data = build_parts(cfg)
    throughput = Throughput()
    ckpt = resume_checkpoint(cfg, resume, module)  # before the trainer: a bad file leaves no logs behind
    trainer = build_trainer(cfg, [throughput])
    before = {}

    def validate_before() -> None:
        if cfg.train.validate_before and ckpt is None:
            module.validation_tag = "before"
            trainer.validate(module, datamodule=data, verbose=False)
            before.update(module.last_report.means if module.last_report else {})

    fit_until_sigterm(trainer, module, data, ckpt, validate_before)
    return fit_result(trainer, cfg, module.last_report, before, throughput)


@dataclass
class RepeatedTrainResult:
    """train.runs trainings of one config with seeds seed, seed+1, ...; `summary` holds mean and std of the final
    metrics."""

    runs: list[TrainResult]
    seeds: list[int]
    summary: dict[str, dict[str, float]]
    path: Path  # runs.json

    def to_dict(self) -> dict:
        runs = [
            {"seed": s, "output": str(r.log_dir), "best_checkpoint": str(r.best_checkpoint), "metrics": r.metrics}
            for s, r in zip(self.seeds, self.runs)
        ]
        return {"summary": self.summary, "runs": runs}


def run_train_repeated(cfg: Config) -> RepeatedTrainResult:
    """train.runs trainings (seed + r, output/run{r}), as the official CTL scripts repeat each experiment; writes
    output/runs.json with every run's final metrics and their mean and std (ddof=1, the adapt command's definition)."""
    from lookalike.adapt.run import mean_std

    t = cfg.train
    if t.runs < 1:
        raise ConfigError(f"train.runs: expected at least 1, got {t.runs}")
    seeds = list(range(t.seed, t.seed + t.runs))
    runs = [run_train(_run_config(cfg, seed, Path(t.output) / f"run{r}")) for r, seed in enumerate(seeds)]
    summary = mean_std([r.metrics for r in runs]) if all(r.metrics for r in runs) else {}
    result = RepeatedTrainResult(runs, seeds, summary, Path(t.output) / "runs.json")
    if runs[-1].is_global_zero:
        write_text_atomic(result.path, json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _run_config(cfg: Config, seed: int, output: Path) -> Config:
    """The config of one repeated run: its seed and output folder."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed, "output": str(output)})})


def run_validate(cfg: Config) -> dict[str, float]:
    """Validate the extractor of `cfg` (model.weights: a checkpoint) with the same sharded, gathered validation as
    training."""
    module, data = build_parts(cfg)
    trainer = build_trainer(cfg, validate_only=True)
    trainer.validate(module, datamodule=data, verbose=False)
    return dict(module.last_report.means)
