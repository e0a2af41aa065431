"""Run an extractor over the images of a dataset table: batched inference into Embeddings."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lookalike.data.images import ImageDataset
from lookalike.data.table import DatasetTable
from lookalike.devices import resolve_device
from lookalike.embeddings import Embeddings
from lookalike.models.extractor import Extractor
from lookalike.progress import Progress


def set_layout(module: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """`module` (in place) in channels-last or contiguous memory layout: the layout picks the convolution kernels and so
    the float bits of the embeddings, so every path that embeds for metrics (training's validation, extract, serve)
    takes it from the same setting (trainer.channels_last)."""
    return module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def embed_batch(extractor: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """float32 embeddings of one batch with autocast off: training's validation (under the Trainer's mixed precision)
    and extract then compute the same numbers for the same checkpoint."""
    with torch.autocast(images.device.type, enabled=False):
        return extractor(images).float()


def extract_embeddings(
    extractor: Extractor,
    table: DatasetTable,
    transform: Callable,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    channels_last: bool = False,
) -> Embeddings:
    """Embed every row of `table` in row order on `device` (auto: the best present), in batches of `batch_size` and the
    memory layout `channels_last` (see set_layout); `progress(batches, total)` may wrap the batch loop."""
    device = resolve_device(device, "extract.device")
    loader = torch.utils.data.DataLoader(
        ImageDataset(table, transform), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    extractor = set_layout(extractor.to(device), channels_last).eval()
    batches = progress(loader, len(loader)) if progress else loader
    out = np.empty((len(table), extractor.dim), dtype=np.float32)
    with torch.inference_mode():
        for images, rows in batches:
            out[rows.numpy()] = embed_batch(extractor, images.to(device)).cpu().numpy()
    meta = {"model": extractor.name, "normalized": extractor.normalize}
    return Embeddings(out, table.frame["path"].to_numpy(str), meta)
