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


def extract_embeddings(
    extractor: Extractor,
    table: DatasetTable,
    transform: Callable,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> Embeddings:
    """Embed every row of `table` in row order on `device` (auto: the best present); `progress(batches, total)` may wrap the batch loop."""
    device = resolve_device(device, "extract.device")
    loader = torch.utils.data.DataLoader(
        ImageDataset(table, transform), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    extractor = extractor.to(device).eval()
    batches = progress(loader, len(loader)) if progress else loader
    out = np.empty((len(table), extractor.dim), dtype=np.float32)
    with torch.inference_mode():
        for images, rows in batches:
            out[rows.numpy()] = extractor(images.to(device)).float().cpu().numpy()
    meta = {"model": extractor.name, "normalized": extractor.normalize}
    return Embeddings(out, table.frame["path"].to_numpy(str), meta)
