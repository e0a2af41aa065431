"""Training of the STIR pairwise re-ranker with Lightning: pairs mined from cached extractor embeddings, BCE,
a backbone frozen for the first epochs (Lightning's BaseFinetuning), validation by re-ranking the top_n.

The frozen extractor (model.*, model.weights) embeds the train split once; inside each P x K batch the pairs
are mined from those cached embeddings (lookalike.losses.pairwise). Validation searches the validation split
with the extractor once, then after every validation epoch re-ranks each query's top_n with the pairwise model
and logs the metrics after re-ranking as val/* (the extractor's as val_before/*); the best checkpoint is
chosen on val/{train.monitor}. Under DDP every rank re-ranks the whole validation split (same metrics on all).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch.nn.modules.batchnorm import _BatchNorm

from lookalike.config import Config
from lookalike.core.atomic import write_text_atomic
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import ConfigError, LookalikeError
from lookalike.core.results import RetrievalResults
from lookalike.core.table import DatasetTable
from lookalike.data.sampler import PKSampler, decode_index
from lookalike.extract import Progress
from lookalike.losses.pairwise import mine_pairs, pair_bce
from lookalike.metrics import MetricsReport, evaluate_table
from lookalike.models.pairwise import PairwiseModel, PairwiseSpec, init_from_extractor
from lookalike.models.spec import store_spec
from lookalike.provenance import KEY, flat_config
from lookalike.provenance import record as provenance
from lookalike.rerank.base import merge_head
from lookalike.rerank.chain import Stage
from lookalike.rerank.pairwise import PairBatches, PairwiseReranker
from lookalike.train.data import LabelledImages, train_transform
from lookalike.train.trainer import (
    Throughput,
    TrainResult,
    build_trainer,
    check_monitor,
    fit_result,
    fit_until_sigterm,
    optimization,
    resume_checkpoint,
)


class PairTrainImages(LabelledImages):
    """Train items (image, class index, valid, table row): the row looks up the image's cached embedding."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool, int]:
        return (*super().__getitem__(index), decode_index(index)[0])


@dataclass
class PairValidation:
    """The validation split searched once by the extractor, and the pair batches of its top_n."""

    table: DatasetTable
    results: RetrievalResults  # the extractor's lists
    report: MetricsReport  # their metrics (before re-ranking)
    batches: PairBatches
    metric_kwargs: dict


class FrozenBackbone(BaseFinetuning):
    """Backbone frozen for `epochs` (its weights and batch-norm statistics fixed), then trained in its own parameter
    group (train.backbone_lr), which is in the optimizer and the schedule from the start.

    One process: no gradient (requires_grad False), so the backward pass skips the backbone. Under DDP a parameter that
    does not require grad when DDP wraps the model is never synchronised, even after it is unfrozen; so there the
    backbone keeps requires_grad, its gradients are all-reduced as usual, and they are dropped before every optimizer
    step of the frozen epochs (the optimizer skips parameters without a gradient), on every rank alike.
    """

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs
        self.distributed = False

    def setup(self, trainer: L.Trainer, pl_module: PairwiseModule, stage: str) -> None:
        self.distributed = trainer.world_size > 1
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: PairwiseModule) -> None:
        if self.epochs <= 0:
            return
        if not self.distributed:
            self.freeze(pl_module.model.backbone, train_bn=False)
            return
        for module in self.flatten_modules(pl_module.model.backbone):
            if isinstance(module, _BatchNorm):
                module.track_running_stats = False  # statistics fixed, parameters stay known to DDP

    def finetune_function(self, pl_module: PairwiseModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if self.epochs > 0 and epoch >= self.epochs:  # >=: a run resumed after the frozen epochs unfreezes too
            self.make_trainable(pl_module.model.backbone)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: PairwiseModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Under DDP, drop the backbone's (already all-reduced) gradients while it is frozen."""
        if self.distributed and trainer.current_epoch < self.epochs:
            for param in pl_module.model.backbone.parameters():
                param.grad = None


class PairwiseModule(L.LightningModule):
    """Trains a PairwiseModel on mined pairs with BCE; validates by re-ranking the validation split's top_n."""

    def __init__(
        self, model: PairwiseModel, train_embeddings: torch.Tensor, cfg: Config, validation: PairValidation
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            flat_config(cfg)
        )  # the resolved config: TensorBoard's hparams tab, hparams.yaml, checkpoints
        self.model, self.cfg, self.validation = model, cfg, validation
        self.register_buffer(
            "train_embeddings", train_embeddings, persistent=False
        )  # [N train rows, D], follows the device
        self.last_report: MetricsReport | None = None
        self._scores: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels, valid, rows = batch
        first, second, negative = mine_pairs(
            self.train_embeddings[rows], labels, valid.bool(), rows, self.cfg.pairwise.mining
        )
        out = pair_bce(self.model(images[first], images[second]), negative)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(first))
        for name, value in out.stats.items():
            self.log(f"train/{name}", value.float(), batch_size=len(first))
        return out.loss

    def configure_optimizers(self):
        t = self.cfg.train
        groups = [
            {"params": list(self.model.head.parameters()), "lr": t.lr},
            {"params": list(self.model.backbone.parameters()), "lr": t.backbone_lr or t.lr},
        ]  # skipped while frozen
        return optimization(self.cfg, groups)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the model's spec beside the weights, so load_pairwise rebuilds it from the file alone."""
        store_spec(checkpoint, "pairwise", asdict(self.model.spec))

    # validation: re-rank the extractor's top_n of the validation split

    def on_validation_epoch_start(self) -> None:
        self._scores = []

    def validation_step(self, batch, batch_idx: int) -> None:
        x1, x2, cells = batch
        self._scores.append((cells, self.model.distance(x1, x2).float()))

    def on_validation_epoch_end(self) -> None:
        v = self.validation
        head = torch.full((v.batches.shape[0] * v.batches.shape[1],), torch.inf)
        for cells, distances in self._scores:
            head[cells.cpu()] = distances.cpu()
        self._scores = []
        results = merge_head(v.results, head.view(v.batches.shape).numpy())
        report = evaluate_table(results, v.table, **v.metric_kwargs)
        self.last_report = report
        self.log_dict({f"val/{k}": float(x) for k, x in report.means.items()})
        self.log_dict({f"val_before/{k}": float(x) for k, x in v.report.means.items()})
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._write_validation(report, results)

    def _write_validation(self, report: MetricsReport, results: RetrievalResults) -> None:
        """metrics before/after re-ranking (JSON per epoch and latest) and result grids of the same queries."""
        folder = Path(self.cfg.train.output) / "validation"
        record = {
            "epoch": self.current_epoch,
            "top_n": self.validation.batches.shape[1],
            "before": self.validation.report.to_dict(),
            "after": report.to_dict(),
            KEY: provenance(self.cfg),
        }
        text = json.dumps(record, indent=2) + "\n"
        write_text_atomic(folder / f"metrics_epoch{self.current_epoch:03d}.json", text)
        write_text_atomic(folder / "metrics_last.json", text)
        if self.cfg.train.grid and results.n_queries:
            from lookalike.pipeline import save_stage_grids

            v, e = self.validation, self.cfg.evaluate
            stages = [Stage("extractor", v.results, v.report), Stage(f"epoch{self.current_epoch:03d}", results, report)]
            save_stage_grids(stages, v.table, folder / "grid", e.grid_queries, e.grid_top_k)


def pairwise_spec(cfg: Config) -> PairwiseSpec:
    """The pairwise model a config describes (image size defaults to data.image_size)."""
    p = cfg.pairwise
    size = p.image_size if p.image_size is not None else cfg.data.image_size
    return PairwiseSpec(p.name, size, p.hidden, p.dropout, p.tta, dict(p.model_kwargs), cfg.data.crop_fraction)


def auto_precision(cfg: Config) -> str:
    """pairwise.precision, with "auto" resolved: bf16-mixed (else 16-mixed) when training on CUDA, else 32-true."""
    chosen = cfg.pairwise.precision
    if chosen != "auto":
        return chosen
    cuda = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if not cuda:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


class PairwiseDataModule(L.LightningDataModule):
    """The train split in P x K batches of (image, label, valid, row); validation = the pair batches of the top_n."""

    def __init__(
        self, train_set: PairTrainImages, sampling: dict, validation: PairValidation, num_workers: int
    ) -> None:
        super().__init__()
        self.train_set, self.sampling, self.validation, self.num_workers = train_set, sampling, validation, num_workers
        PKSampler(train_set.labels, num_replicas=1, rank=0, **sampling)  # fail early on too few labels

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        workers = self.num_workers
        sampler = PKSampler(self.train_set.labels, **self.sampling)
        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0
        )

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.validation.batches, batch_size=None)


def build_pairwise_parts(cfg: Config, progress: Progress | None = None) -> tuple[PairwiseModule, PairwiseDataModule]:
    """Embed the train split with the frozen extractor, search the validation split, and build the module and data."""
    from lookalike.pipeline import embed_table, extractor_from_config, table_from_config

    if not cfg.model.weights:
        raise ConfigError(
            "model.weights: expected the trained extractor's checkpoint, e.g. "
            "extractor_weights=runs/omniglot/checkpoints/last.ckpt"
        )
    if cfg.evaluate.centroids != "none":
        raise ConfigError(
            "evaluate.centroids: the pairwise re-ranker compares images, so validation needs evaluate.centroids=none"
        )
    check_monitor(cfg)
    table, extractor, d = table_from_config(cfg), extractor_from_config(cfg), cfg.data
    train_table, val_table = table.split("train"), table.split("validation")
    for name, rows in (("train", train_table), ("validation", val_table)):
        if len(rows) == 0:
            raise LookalikeError(
                f"{table.source}, column 'split': no {name} rows (the pairwise trainer needs both splits)"
            )
    cached = embed_table(cfg, extractor, train_table, progress)
    model = new_pairwise_model(cfg)
    embeddings = embed_table(cfg, extractor, val_table, progress)
    validation = pair_validation(cfg, model, embeddings, val_table)
    t, mc = cfg.train, model.data_config()
    train_set = PairTrainImages(
        train_table, train_transform(t.augment, model.spec.image_size, d.crop_fraction, mc["mean"], mc["std"])
    )
    sampling = {
        "p": t.p,
        "k": t.k,
        "few_images": t.few_images,
        "seed": t.seed,
        "batches_per_epoch": t.batches_per_epoch,
    }
    module = PairwiseModule(model, torch.from_numpy(cached.vectors), cfg, validation)
    return module, PairwiseDataModule(train_set, sampling, validation, d.num_workers)


def new_pairwise_model(cfg: Config) -> PairwiseModel:
    """A pairwise model from pairwise.*: timm weights, or its backbone from the extractor checkpoint
    (init_from_extractor)."""
    p = cfg.pairwise
    model = PairwiseModel(pairwise_spec(cfg), pretrained=p.pretrained and not p.init_from_extractor)
    return init_from_extractor(model, cfg.model.weights) if p.init_from_extractor else model


def pair_validation(
    cfg: Config, model: PairwiseModel, embeddings: Embeddings, val_table: DatasetTable
) -> PairValidation:
    """The extractor's lists of the validation split, their metrics, and the pair batches of their top_n."""
    from lookalike.pipeline import search_and_score

    e = cfg.evaluate
    report, results = search_and_score(cfg, embeddings, val_table)
    reranker = PairwiseReranker(
        model, top_n=cfg.pairwise.top_n, batch_size=cfg.pairwise.batch_size, num_workers=cfg.data.num_workers
    )
    return PairValidation(val_table, results, report, reranker.pair_batches(results, val_table), e.metric_kwargs())


def run_train_reranker(
    cfg: Config, resume: str | None = None, progress: Progress | None = None, callbacks: tuple[L.Callback, ...] = ()
) -> TrainResult:
    """Train the pairwise re-ranker of `cfg` (on several devices with DDP too, frozen epochs included);
    metrics_before are
    the extractor's, metrics those after re-ranking (last validation). `callbacks` are added to the trainer's."""
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module, data = build_pairwise_parts(cfg, progress)
    throughput = Throughput()
    freeze = FrozenBackbone(cfg.pairwise.freeze_epochs)
    run_cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"precision": auto_precision(cfg)})})
    ckpt = resume_checkpoint(cfg, resume, module)  # before the trainer: a bad file leaves no logs behind
    trainer = build_trainer(run_cfg, [throughput, freeze, *callbacks])
    fit_until_sigterm(trainer, module, data, ckpt)
    return fit_result(trainer, cfg, module.last_report, dict(module.validation.report.means), throughput)
