"""Lightning's side of multi-process embedding: the predict module and the shard-writing callback."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lookalike.core.errors import LookalikeError
from lookalike.data.images import ImageDataset
from lookalike.extract import RowSampler, embed_batch, set_layout
from lookalike.models.extractor import Extractor
from lookalike.progress import ImageMeter, Progress
from lookalike.shards import ShardSink, missing_shards, read_manifest


class EmbedModule(L.LightningModule):
    """Embeds the rows of the shards this rank owns (shard s: rank s % world size) that are not yet complete."""

    def __init__(
        self,
        extractor: Extractor,
        dataset: ImageDataset,
        folder: Path,
        batch_size: int,
        num_workers: int,
        channels_last: bool,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.dataset, self.folder, self.channels_last = dataset, folder, channels_last
        self.batch_size, self.num_workers = batch_size, num_workers
        self.n_images = 0

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        """This rank's missing rows; read after the process group is up, so rank 0 has written the manifest."""
        manifest = read_manifest(self.folder)
        sampler = RowSampler(manifest, missing_shards(self.folder, manifest, self.global_rank, self.trainer.world_size))
        self.n_images = len(sampler)
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers
        )

    def on_predict_start(self) -> None:
        """Every rank computes with rank 0's weights (a random init differs per process) in the configured layout."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for tensor in self.extractor.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        set_layout(self.extractor, self.channels_last)

    def predict_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 embeddings of one batch (autocast off, as validation and extract compute them) and their rows."""
        images, rows = batch
        return embed_batch(self.extractor, images), rows


class ShardWriter(BasePredictionWriter):
    """Writes every shard of this rank as soon as its rows are embedded (lookalike.shards), not the predictions at the
    end; rank 0 counts its images into `progress`."""

    def __init__(self, folder: Path, ids: np.ndarray, progress: Progress | None = None) -> None:
        super().__init__(write_interval="batch")
        self.folder, self.ids, self.progress = folder, ids, progress
        self.sink: ShardSink | None = None
        self.meter: ImageMeter | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A sink for this rank's shards; rank 0's progress counts its images."""
        self.sink = ShardSink(self.folder, read_manifest(self.folder), self.ids)
        self.meter = ImageMeter(self.progress if trainer.global_rank == 0 else None, pl_module.n_images)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        """Hand the batch's rows to the sink, which writes every shard they complete."""
        vectors, rows = prediction
        self.sink.add(rows.cpu().numpy(), vectors.cpu().numpy())
        self.meter.add(len(rows))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The final progress line; a shard left half-filled is an error (rows were lost)."""
        self.meter.close()
        if self.sink.pending:
            raise LookalikeError(f"{self.folder}: shards {sorted(self.sink.pending)} were left incomplete")
