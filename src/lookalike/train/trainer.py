"""The Lightning Trainer and the pieces every trainer shares (the extractor's, train/run.py, and the STIR re-ranker's,
train/pairwise.py): checkpoints, loggers, devices and precision, optimizer and schedule, the monitor check, resuming,
stopping on SIGTERM, throughput and the result of a fit."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lookalike.config import Config
from lookalike.core.atomic import atomic_path
from lookalike.core.errors import ConfigError, LookalikeError
from lookalike.extract import set_layout
from lookalike.models.extractor import check_state, read_checkpoint
from lookalike.signals import Terminated, deferred_sigterm, sigterm_pending

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


def fit_until_sigterm(
    trainer: L.Trainer,
    module: L.LightningModule,
    data: L.LightningDataModule,
    ckpt: str | None,
    before: Callable[[], None] | None = None,
) -> None:
    """`before()` (a validation) then trainer.fit; SIGTERM stops them after the current batch, raising Terminated with
    the checkpoint SaveOnSigterm kept (Lightning alone would end the process with exit code 0).

    Args:
        trainer: a Trainer from build_trainer (it holds a SaveOnSigterm).
        module: the LightningModule to fit.
        data: its data module.
        ckpt: the checkpoint to resume from (resume_checkpoint), or None.
        before: run inside the SIGTERM guard before fitting, e.g. the validation before training.

    Raises:
        Terminated: on SIGTERM, naming the last.ckpt saved (None when nothing was trained yet).
    """
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


def build_trainer(cfg: Config, callbacks: Sequence[Callback] = (), validate_only: bool = False) -> L.Trainer:
    """A Trainer with checkpoints (best by train.monitor, and last), TensorBoard + CSV logs and a progress bar.

    Args:
        cfg: the config: train.output, epochs, monitor, val_every; trainer.* (devices, strategy, precision, ...).
        callbacks: extra callbacks (e.g. Throughput, FrozenBackbone).
        validate_only: no checkpoints, loggers or SIGTERM saving (run_validate).

    Returns:
        The Trainer.
    """
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


def fit_result(
    trainer: L.Trainer, cfg: Config, report, before: dict[str, float], throughput: Throughput
) -> TrainResult:
    """What a finished fit left: the best and last checkpoints, the last validation's means (`report`), the speed.

    Args:
        trainer: the Trainer after fit (from build_trainer: its checkpoint callbacks are best, then last).
        cfg: the config (train.output).
        report: the last validation's MetricsReport, or None.
        before: the metrics before training.
        throughput: the Throughput callback of the fit.

    Returns:
        The TrainResult.
    """
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


RESUME_KEYS = (
    "state_dict",
    "optimizer_states",
    "lr_schedulers",
    "loops",
    "epoch",
    "global_step",
)  # what Lightning restores


def resume_checkpoint(cfg: Config, resume: str | None, module: L.LightningModule) -> str | None:
    """The checkpoint to resume from, checked to be a Lightning training checkpoint of this very module, so that a
    wrong file fails in one line before any log folder exists.

    Args:
        cfg: the config (train.output).
        resume: a checkpoint path, 'last' for train.output/checkpoints/last.ckpt, or None.
        module: the module the checkpoint must fit.

    Returns:
        The checkpoint's path for trainer.fit, or None without `resume`.
    """
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


def check_monitor(cfg: Config) -> None:
    """Refuse a train.monitor that validation does not report, before any training starts.

    Args:
        cfg: the training config (train.monitor and evaluate's cut-offs).

    Raises:
        ConfigError: one line listing the metrics validation reports.
    """
    e, m = cfg.evaluate, cfg.train.monitor
    names = (
        [f"cmc@{k}" for k in e.cmc_k]
        + [f"precision@{k}" for k in e.precision_k]
        + [f"map@{k}" for k in e.map_k]
        + ["map@all", "r_precision"]
    )
    if m not in names:
        raise ConfigError(f"train.monitor: expected one of {', '.join(names)}, got {m!r}")


def build_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer train.optimizer names over parameter groups.

    Args:
        name: "adam", "adamw", or anything else for SGD (momentum 0.9, Nesterov).
        groups: torch parameter groups (each may set its own lr / weight_decay).
        lr: the default learning rate.
        weight_decay: the default weight decay.

    Returns:
        The optimizer.
    """
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup: int, epochs: int, steps: list[int], gamma: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """Per-epoch learning-rate schedule with an optional linear warm-up.

    Args:
        optimizer: the optimizer to schedule.
        name: "none", "cosine" or "step".
        warmup: epochs of linear warm-up (0: none).
        epochs: the training's epochs (the cosine's period).
        steps: the epochs where "step" multiplies the rate by `gamma`.
        gamma: the factor of each step.

    Returns:
        A LambdaLR, or None without schedule and warm-up.
    """
    if name == "none" and warmup == 0:
        return None

    def factor(epoch: int) -> float:
        warm = min(1.0, (epoch + 1) / warmup) if warmup else 1.0
        if name == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))  # a float: numpy scalars break loading
        if name == "step":
            return warm * gamma ** sum(epoch >= s for s in steps)
        return warm

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimization(cfg: Config, groups: list[dict]) -> torch.optim.Optimizer | dict:
    """What a LightningModule's configure_optimizers returns for train.*: the optimizer, with its per-epoch schedule.

    Args:
        cfg: the config (train.optimizer, lr, weight_decay, scheduler, warmup_epochs, epochs, step_epochs, step_gamma).
        groups: the module's parameter groups.

    Returns:
        The optimizer alone, or Lightning's {"optimizer", "lr_scheduler"} dict.
    """
    t = cfg.train
    optimizer = build_optimizer(t.optimizer, groups, t.lr, t.weight_decay)
    scheduler = build_scheduler(optimizer, t.scheduler, t.warmup_epochs, t.epochs, t.step_epochs, t.step_gamma)
    if scheduler is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
