"""The Lightning module of extractor training: metric losses in, validation metrics out (the Trainer holds the loop)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import nn

from lookalike.config import Config
from lookalike.core.atomic import write_text_atomic
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeWarning
from lookalike.core.table import DatasetTable
from lookalike.extract import embed_batch
from lookalike.losses import CenterLoss, CentroidTripletLoss, LossOutput, TripletLoss
from lookalike.metrics import MetricsReport
from lookalike.models.extractor import Extractor
from lookalike.models.spec import store_spec
from lookalike.pipeline import search_and_score
from lookalike.provenance import KEY, flat_config, record
from lookalike.train.trainer import optimization

CENTER_SGD_LR = 0.5  # the official CTL code's SOLVER.CENTER_LR
PINNED_EPOCHS = 3  # epochs in a row the triplet loss may sit at its collapsed value before the collapse warning
PINNED_TOLERANCE = 0.01  # "at its collapsed value": within this share of it
SPREAD_ROWS = 4096  # at most this many evenly spaced validation rows give val/neighbour_distance


class ExtractorModule(L.LightningModule):
    """Trains an Extractor with weighted triplet / centroid-triplet / cross-entropy / center losses; validates by
    retrieval."""

    def __init__(
        self, extractor: Extractor, cfg: Config, n_classes: int, val_table: DatasetTable | None = None
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            flat_config(cfg)
        )  # the resolved config: TensorBoard's hparams tab, hparams.yaml, checkpoints
        self.extractor, self.cfg, self.val_table = extractor, cfg, val_table
        loss = cfg.train.loss
        self.triplet = TripletLoss(
            loss.margin, loss.miner, loss.n_positives, loss.n_negatives, loss.memory_size, dim=extractor.dim
        )
        self.centroid = CentroidTripletLoss(loss.centroid_margin, loss.centroid_mode)
        self.classifier = nn.Linear(extractor.dim, n_classes, bias=False) if loss.cross_entropy > 0 else None
        self.center = CenterLoss(n_classes, extractor.dim, loss.center_scale) if loss.center > 0 else None
        self.cross_entropy = nn.CrossEntropyLoss(label_smoothing=loss.label_smoothing)
        self.last_report: MetricsReport | None = None
        self.validation_tag = "validate"  # file tag of a validation outside fit ("before" for the pre-training one)
        self._val_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._epoch_watch: list[tuple[torch.Tensor, torch.Tensor]] = []  # (triplet loss, median neighbour distance)
        self.epoch_triplet_losses: list[float] = []  # mean triplet loss of each training epoch
        self.epoch_neighbour_distances: list[float] = []  # median over each epoch's batches (embedding space)
        self._pinned_epochs, self._warned_collapse = 0, False
        self.last_neighbour_distance = math.nan  # median neighbour distance of the last validation's embeddings

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(images)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the extractor's spec beside the weights (the config is in hyper_parameters), so that
        `Extractor(weights=...)` and model.weights rebuild the model from the file alone."""
        store_spec(checkpoint, "extractor", self.extractor.spec())

    def metric_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features for the metric losses, features for the classifier): with a BNNeck the metric losses see the
        un-normalised features before it (Bag of Tricks); without one, the embeddings themselves."""
        before, after = self.extractor.features(images)
        if isinstance(self.extractor.neck, nn.BatchNorm1d):
            return before, after
        return (nn.functional.normalize(before, dim=1) if self.extractor.normalize else before), after

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels, valid = batch
        metric, logits_in = self.metric_features(images)
        parts = self._losses(metric, logits_in, labels, valid.bool())
        total = sum(weight * out.loss for weight, out in parts.values())
        if "triplet" in parts:
            embedded = nn.functional.normalize(logits_in, dim=1) if self.extractor.normalize else logits_in
            self._epoch_watch.append((parts["triplet"][1].loss.detach(), neighbour_distance(embedded[valid.bool()])))
        self.log("train/loss", total, prog_bar=True, batch_size=len(images))
        for name, (_, out) in parts.items():
            self.log(f"train/{name}", out.loss, batch_size=len(images))
            for stat, value in out.stats.items():
                self.log(f"train/{name}_{stat}", value.float(), batch_size=len(images))
        return total

    def _losses(self, metric, logits_in, labels, valid) -> dict[str, tuple[float, LossOutput]]:
        """Each active loss with its weight."""
        w = self.cfg.train.loss
        parts = {}
        if w.triplet > 0:
            parts["triplet"] = (w.triplet, self.triplet(metric, labels, valid))
        if w.centroid > 0:
            parts["centroid"] = (w.centroid, self.centroid(metric, labels, valid))
        if self.classifier is not None:
            ce = self.cross_entropy(self.classifier(logits_in[valid]), labels[valid])
            parts["cross_entropy"] = (w.cross_entropy, LossOutput(ce, {}))
        if self.center is not None:
            parts["center"] = (w.center, self.center(metric, labels, valid))
        return parts

    def on_train_epoch_end(self) -> None:
        """Record the epoch's mean triplet loss and neighbour distance; warn once when the loss stays pinned."""
        if not self._epoch_watch:
            return
        losses, distances = (torch.stack(column).float() for column in zip(*self._epoch_watch))
        self._epoch_watch = []
        loss, distance = float(losses.mean()), float(distances.median())
        self.epoch_triplet_losses.append(loss)
        self.epoch_neighbour_distances.append(distance)
        self.log("train/neighbour_distance", distance)
        collapsed = collapsed_loss(self.cfg.train.loss.margin)
        pinned = collapsed > 0 and abs(loss - collapsed) <= PINNED_TOLERANCE * collapsed
        self._pinned_epochs = self._pinned_epochs + 1 if pinned else 0
        if self._pinned_epochs >= PINNED_EPOCHS and not self._warned_collapse and self.trainer.is_global_zero:
            self._warned_collapse = True
            warnings.warn(
                collapse_message(self.cfg.train.loss.margin, self._pinned_epochs, distance),
                LookalikeWarning,
                stacklevel=2,
            )

    def configure_optimizers(self):
        t = self.cfg.train
        backbone = list(self.extractor.backbone.parameters())
        ids = {id(p) for p in backbone}
        head = [
            p
            for n, p in self.named_parameters()
            if id(p) not in ids and p.requires_grad and not n.startswith("center.")
        ]
        groups = [{"params": backbone, "lr": t.backbone_lr or t.lr}, {"params": head, "lr": t.lr}]
        if self.center is not None and t.loss.center_optimizer == "shared":
            groups.append(
                {"params": list(self.center.parameters()), "lr": t.loss.center_lr or t.lr, "weight_decay": 0.0}
            )
        return optimization(self.cfg, groups)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """center_optimizer=sgd: step the class centres by their own plain SGD (no momentum, no weight decay) on the
        gradient of the UNWEIGHTED center loss, as the official CTL code does (its centre gradient is divided by the
        loss weight, lr 0.5); AMP's loss scale is taken out the same way, and a step with inf/NaN gradients is
        skipped."""
        loss = self.cfg.train.loss
        if self.center is None or loss.center_optimizer != "sgd" or self.center.centers.grad is None:
            return
        grad = self.center.centers.grad / (loss.center * _loss_scale(self.trainer))
        if torch.isfinite(grad).all():
            with torch.no_grad():
                self.center.centers.sub_(grad, alpha=loss.center_lr or CENTER_SGD_LR)
        self.center.centers.grad = None

    # validation: embed the validation split on every rank, gather in table order, search, evaluate

    def on_validation_epoch_start(self) -> None:
        self._val_parts = []
        self._broadcast_buffers()

    def _broadcast_buffers(self) -> None:
        """Give every rank rank 0's buffers (batch-norm running statistics drift per rank after the last training step),
        so all ranks validate the very model that rank 0 checkpoints."""
        if self.trainer.world_size > 1:
            for buffer in self.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, rows = batch
        self._val_parts.append((rows, embed_batch(self.extractor, images)))  # as extract embeds: fp32, autocast off

    def on_validation_epoch_end(self) -> None:
        rows = (
            torch.cat([r for r, _ in self._val_parts])
            if self._val_parts
            else torch.empty(0, dtype=torch.int64, device=self.device)
        )
        emb = (
            torch.cat([e for _, e in self._val_parts])
            if self._val_parts
            else torch.empty(0, self.extractor.dim, device=self.device)
        )
        self._val_parts = []
        vectors = self._gather_in_order(rows.to(self.device), emb, len(self.val_table))
        embeddings = Embeddings(vectors.cpu().numpy(), self.val_table.paths, {"model": self.extractor.name})
        picks = torch.linspace(0, max(len(vectors) - 1, 0), min(len(vectors), SPREAD_ROWS), device=vectors.device)
        self.last_neighbour_distance = float(neighbour_distance(vectors[picks.long()]))
        self.log("val/neighbour_distance", self.last_neighbour_distance, sync_dist=False)
        report, results = search_and_score(self.cfg, embeddings, self.val_table)
        self.last_report = report
        self.log_dict({f"val/{k}": float(v) for k, v in report.means.items()}, sync_dist=False)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._write_validation(report, results)

    def _gather_in_order(self, rows: torch.Tensor, emb: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's embeddings placed at their table rows: uneven shards padded for all_gather, padding dropped."""
        world = self.trainer.world_size
        if world > 1:
            size = -(-n // world)
            pad = size - len(rows)
            rows = torch.nn.functional.pad(rows, (0, pad), value=-1)
            emb = torch.nn.functional.pad(emb, (0, 0, 0, pad))
            rows, emb = self.all_gather(rows).reshape(-1), self.all_gather(emb).reshape(-1, emb.shape[1])
            keep = rows >= 0
            rows, emb = rows[keep], emb[keep]
        if len(rows) != n or len(torch.unique(rows)) != n:
            raise RuntimeError(f"validation gathered {len(rows)} embeddings for {n} rows")
        out = torch.empty_like(emb)
        out[rows] = emb
        return out

    def _write_validation(self, report: MetricsReport, results) -> None:
        """metrics JSON (latest and per epoch) and a result grid in the log dir."""
        from lookalike.viz import save_result_grid, spread_queries, table_labels

        folder = Path(self.cfg.train.output) / "validation"
        metrics = {
            "epoch": self.current_epoch,
            "step": self.global_step,
            "trained": self.trainer.state.fn == "fit",
            **report.to_dict(),
        }
        text = json.dumps({**metrics, KEY: record(self.cfg)}, indent=2) + "\n"
        tag = f"epoch{self.current_epoch:03d}" if self.trainer.state.fn == "fit" else self.validation_tag
        write_text_atomic(folder / f"metrics_{tag}.json", text)
        write_text_atomic(folder / "metrics_last.json", text)
        if self.cfg.train.grid and results.n_queries and self.cfg.evaluate.centroids == "none":
            e = self.cfg.evaluate
            queries = spread_queries(results.n_queries, e.grid_queries)
            labels = table_labels(self.val_table, results)
            save_result_grid(
                results,
                folder / f"grid_{tag}.png",
                self.val_table.root,
                report.relevance,
                queries,
                e.grid_top_k,
                labels=labels,
            )


def neighbour_distance(embeddings: torch.Tensor) -> torch.Tensor:
    """Median euclidean distance from each row of [B, D] to its nearest other row (NaN for fewer than 2 rows): the
    scale of the space that search and re-ranking read, ~1e-3 when it has collapsed."""
    with torch.no_grad():
        if len(embeddings) < 2:
            return torch.full((), math.nan, device=embeddings.device)
        dist = torch.cdist(embeddings.float(), embeddings.float())
        dist.fill_diagonal_(math.inf)
        return dist.min(1).values.median()


def collapsed_loss(margin: float | None) -> float:
    """The triplet loss of a collapsed space (d_ap = d_an): the margin, or ln 2 for the soft margin."""
    return math.log(2) if margin is None else margin


def collapse_message(margin: float | None, epochs: int, distance: float) -> str:
    """One line: the triplet loss sat at its collapsed value, the space's scale, and what to try."""
    value = (
        f"the margin ({margin:g})"
        if margin is not None
        else f"ln 2 ({math.log(2):.3f}, the soft margin at d_ap = d_an)"
    )
    return (
        f"train.loss: the triplet loss stayed within {PINNED_TOLERANCE:.0%} of {value} for {epochs} epochs: the "
        f"embedding may have collapsed (median neighbour distance {distance:.2g} in the last epoch's batches); "
        "try model.bnneck=true with train.loss.cross_entropy=1, or a lower train.lr (docs/benchmarks.md, issue 20: "
        "with Adam, train.loss.margin=null alone did not help)"
    )


def _loss_scale(trainer: L.Trainer) -> float:
    """The factor AMP's gradient scaler multiplied the loss by (1 without one)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0
