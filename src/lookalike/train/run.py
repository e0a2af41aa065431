"""Build the Lightning Trainer from the config and run training or validation of an extractor."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lookalike.config import Config
from lookalike.core.atomic import atomic_path, write_text_atomic
from lookalike.core.errors import ConfigError, LookalikeError
from lookalike.data.images import eval_transform
from lookalike.extract import set_layout
from lookalike.models.extractor import check_state, read_checkpoint
from lookalike.signals import Terminated, deferred_sigterm, sigterm_pending
from lookalike.train.data import RetrievalDataModule, train_transform
from lookalike.train.module import ExtractorModule

BEST_PREFIX = "best-"


@dataclass
class TrainResult:
    """What a training run left behind; `metrics` are the last validation's means."""

    log_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    metrics: dict[str, float]
    metrics_before: dict[str, float] = field(default_factory=dict)
    images_per_second: float = 0.0
    is_global_zero: bool = True
    triplet_losses: list[float] = field(default_factory=list)  # mean triplet loss of each epoch (empty without one)
    neighbour_distance: float = math.nan  # median distance of a validation embedding to its nearest other one


class Throughput(Callback):
    """Training images per second, timed over the training batches only (validation excluded)."""

    def __init__(self) -> None:
        self.images, self.seconds, self._started = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._started
        self.images += len(batch[0]) * trainer.world_size

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def build_parts(cfg: Config) -> tuple[ExtractorModule, RetrievalDataModule]:
    """The Lightning module and data module a config describes."""
    from lookalike.pipeline import extractor_from_config, table_from_config

    _check_monitor(cfg)
    table = table_from_config(cfg)
    extractor = extractor_from_config(cfg)
    dc, d, t = extractor.data_config(), cfg.data, cfg.train
    eval_tf = eval_transform(d.image_size, d.crop_fraction, dc["mean"], dc["std"])
    train_tf = train_transform(t.augment, d.image_size, d.crop_fraction, dc["mean"], dc["std"])
    data = RetrievalDataModule(
        table, train_tf, eval_tf, t.p, t.k, t.few_images, t.seed, d.batch_size, d.num_workers, t.batches_per_epoch
    )
    return ExtractorModule(extractor, cfg, data.n_classes, data.val_table), data


class NewBatchesEachEpoch(Callback):
    """New P x K batches every epoch: Lightning calls set_epoch on samplers, not on a batch sampler. A data module with
    start_epoch also re-seeds the augmentation there (RetrievalDataModule)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if hasattr(trainer.datamodule, "start_epoch"):
            trainer.datamodule.start_epoch(trainer.current_epoch)
            return
        batch_sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if hasattr(batch_sampler, "set_epoch"):
            batch_sampler.set_epoch(trainer.current_epoch)


class ChannelsLast(Callback):
    """The model in channels-last memory layout (trainer.channels_last): convolutions then run oneDNN's NHWC kernels on
    CPU and tensor cores on GPU; 8-10% more images/s for a ResNet-18 at 64 px on this CPU. Input batches need no
    conversion: a channels-last weight makes the convolution take that layout, with bitwise the same results. The
    layout changes the embeddings' float bits, so extract and serve embed in it too (pipeline.embed_table)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        set_layout(pl_module, channels_last=True)


class BestCheckpoint(ModelCheckpoint):
    """The best checkpoint by train.monitor, kept as one file across --resume: a killed run can leave a best-*.ckpt
    written after the checkpoint it resumes from, which the restored state does not know and would never remove."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path is not None:
            self.drop_untracked(trainer.is_global_zero)

    def drop_untracked(self, remove_files: bool = True) -> None:
        """Remove best-*.ckpt files the restored state does not track; forget a tracked one that is gone, so that the
        next validation writes a new best instead of comparing with a file that no longer exists."""
        tracked = {Path(p).resolve() for p in self.best_k_models if Path(p).is_file()}
        if remove_files:
            for path in Path(self.dirpath).glob(f"{BEST_PREFIX}*{self.FILE_EXTENSION}"):
                if path.resolve() not in tracked:
                    path.unlink(missing_ok=True)
        if not tracked:
            self.best_k_models, self.best_model_path, self.best_model_score = {}, "", None
            self.kth_best_model_path = ""
            self.kth_value = torch.tensor(-torch.inf if self.mode == "max" else torch.inf)


class SaveOnSigterm(Callback):
    """On SIGTERM (Lightning stops after the current batch) save `path` (last.ckpt), which `--resume last` continues."""

    def __init__(self, path: Path) -> None:
        self.path, self.saved = Path(path), None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            sigterm_pending()
        ):  # arrived before fit (e.g. in the validation before training), which resets Lightning's flag
            raise Terminated()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if (
            isinstance(exception, (SIGTERMException, Terminated))
            and trainer.state.fn == "fit"
            and trainer.global_step > 0
        ):
            with atomic_path(
                self.path, suffix=".ckpt"
            ) as tmp:  # a second kill while saving keeps the previous last.ckpt
                trainer.save_checkpoint(tmp, weights_only=False)
            self.saved = self.path


def fit_until_sigterm(trainer: L.Trainer, module: L.LightningModule, data, ckpt: str | None, before=None) -> None:
    """`before()` (a validation) then trainer.fit; SIGTERM stops them after the current batch, raising Terminated
    with the
    checkpoint SaveOnSigterm kept (Lightning alone would end the process with exit code 0)."""
    stop = next(c for c in trainer.callbacks if isinstance(c, SaveOnSigterm))
    try:
        with deferred_sigterm():
            if before is not None:
                before()
            trainer.fit(
                module, datamodule=data, ckpt_path=ckpt, weights_only=True
            )  # a resumed checkpoint may come from anyone
    except (SIGTERMException, Terminated):
        raise Terminated(stop.saved) from None


def build_trainer(cfg: Config, callbacks: list[Callback] = (), validate_only: bool = False) -> L.Trainer:
    """A Trainer with checkpoints (best by train.monitor, and last), TensorBoard + CSV logs and a progress bar."""
    t, tr = cfg.train, cfg.trainer
    out = Path(t.output)
    best = BestCheckpoint(
        dirpath=out / "checkpoints",
        filename=BEST_PREFIX + "epoch{epoch:03d}",
        monitor=f"val/{t.monitor}",
        mode="max",
        auto_insert_metric_name=False,
    )
    # Lightning 2.6 writes save_last only at steps where a best checkpoint was written: keep "last" with a checkpoint of
    # its own
    last = ModelCheckpoint(
        dirpath=out / "checkpoints", filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )
    stop = SaveOnSigterm(out / "checkpoints" / "last.ckpt")
    cbs = [NewBatchesEachEpoch(), *callbacks, best, last, stop] if not validate_only else list(callbacks)
    if tr.channels_last:
        cbs.insert(0, ChannelsLast())
    if tr.progress:
        cbs.append(TQDMProgressBar())
    return L.Trainer(
        default_root_dir=out,
        max_epochs=t.epochs,
        accelerator=tr.accelerator,
        devices=tr.devices,
        strategy=tr.strategy,
        num_nodes=tr.num_nodes,
        precision=tr.precision,
        limit_train_batches=tr.limit_train_batches,
        log_every_n_steps=tr.log_every_n_steps,
        check_val_every_n_epoch=t.val_every,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the P x K and shard samplers split the data across ranks themselves
        enable_progress_bar=tr.progress,
        enable_model_summary=False,
        logger=[TensorBoardLogger(out, name="tensorboard"), CSVLogger(out, name="csv")]
        if not validate_only
        else False,  # version_N per run
        callbacks=cbs,
    )


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


def fit_result(
    trainer: L.Trainer, cfg: Config, report, before: dict[str, float], throughput: Throughput
) -> TrainResult:
    """What a finished fit left: the best and last checkpoints, the last validation's means (`report`), the speed."""
    best, last = trainer.checkpoint_callbacks
    return TrainResult(
        log_dir=Path(cfg.train.output),
        best_checkpoint=Path(best.best_model_path) if best.best_model_path else None,
        last_checkpoint=Path(last.best_model_path) if last.best_model_path else None,
        metrics=dict(report.means) if report else {},
        metrics_before=before,
        images_per_second=throughput.rate,
        is_global_zero=trainer.is_global_zero,
        triplet_losses=list(getattr(trainer.lightning_module, "epoch_triplet_losses", [])),
        neighbour_distance=getattr(trainer.lightning_module, "last_neighbour_distance", math.nan),
    )


def run_validate(cfg: Config) -> dict[str, float]:
    """Validate the extractor of `cfg` (model.weights: a checkpoint) with the same sharded, gathered validation as
    training."""
    module, data = build_parts(cfg)
    trainer = build_trainer(cfg, validate_only=True)
    trainer.validate(module, datamodule=data, verbose=False)
    return dict(module.last_report.means)


RESUME_KEYS = (
    "state_dict",
    "optimizer_states",
    "lr_schedulers",
    "loops",
    "epoch",
    "global_step",
)  # what Lightning restores


def resume_checkpoint(cfg: Config, resume: str | None, module: L.LightningModule) -> str | None:
    """The checkpoint to resume from (a path, or 'last' for train.output/checkpoints/last.ckpt), checked to be a
    Lightning
    training checkpoint of this very module, so that a wrong file fails in one line before any log folder exists."""
    if resume is None:
        return None
    path = Path(cfg.train.output) / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise LookalikeError(f"--resume: no checkpoint at {path}")
    checkpoint = read_checkpoint(path, "--resume")
    lacking = (
        [key for key in RESUME_KEYS if key not in checkpoint] if isinstance(checkpoint, dict) else list(RESUME_KEYS)
    )
    if lacking:
        raise LookalikeError(
            f"--resume: {path} is not a Lightning training checkpoint (no {', '.join(map(repr, lacking[:3]))}); "
            "resume from a checkpoints/*.ckpt file that training wrote"
        )
    check_state(checkpoint["state_dict"], module.state_dict(), f"--resume: {path}")
    return str(path)


def _check_monitor(cfg: Config) -> None:
    """train.monitor must name a metric validation reports."""
    e, m = cfg.evaluate, cfg.train.monitor
    names = (
        [f"cmc@{k}" for k in e.cmc_k]
        + [f"precision@{k}" for k in e.precision_k]
        + [f"map@{k}" for k in e.map_k]
        + ["map@all", "r_precision"]
    )
    if m not in names:
        raise ConfigError(f"train.monitor: expected one of {', '.join(names)}, got {m!r}")
