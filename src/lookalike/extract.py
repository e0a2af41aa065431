"""Run an extractor over images (a dataset table, a folder, files or PIL images): batched inference into Embeddings."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.table import DatasetTable
from lookalike.data.folder import list_images
from lookalike.data.images import ImageDataset, ImageListDataset, ImageSource
from lookalike.devices import resolve_device
from lookalike.progress import Progress

if TYPE_CHECKING:  # annotations only: lookalike.models.extractor imports this module (Extractor.embed)
    from lookalike.models.extractor import Extractor
    from lookalike.shards import Manifest


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
    dataset = ImageDataset(table, transform)
    return _embed_dataset(extractor, dataset, table.paths, batch_size, num_workers, device, progress, channels_last)


def embed(
    extractor: Extractor,
    images: DatasetTable | ImageSource | Sequence[ImageSource],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: Progress | None = None,
) -> Embeddings:
    """Embed images with the extractor's own evaluation transform (`Extractor.transform`), in batches.

    Args:
        extractor: the model; its `image_size` and `crop_fraction` and timm's mean and std make the transform.
        images: a dataset table (rows in order, boxes cropped), a folder (its images, recursively, sorted),
            one image file or PIL image, or a sequence of image files and PIL images.
        batch_size: images per forward pass.
        device: torch device, or "auto" (CUDA, else MPS, else CPU).
        num_workers: DataLoader worker processes that decode images.
        progress: optional `progress(batches, total)` wrapper of the batch loop (e.g. a progress bar).

    Returns:
        Embeddings [N, D] float32 in input order; ids are the table's paths, the files' paths, or `image{i}` for
        a PIL image without a file name.

    Example:
        >>> import lookalike
        >>> extractor = lookalike.Extractor("resnet18", image_size=32)
        >>> emb = lookalike.embed(extractor, "data/omniglot/images_background_small1/Latin/character01")
        >>> emb.vectors.shape
        (20, 512)
    """
    if isinstance(images, DatasetTable):
        return extract_embeddings(extractor, images, extractor.transform(), batch_size, num_workers, device, progress)
    items = image_list(images)
    ids = np.array([_image_id(item, i) for i, item in enumerate(items)], dtype=str)
    return _embed_dataset(
        extractor, ImageListDataset(items, extractor.transform()), ids, batch_size, num_workers, device, progress
    )


def image_list(images: ImageSource | Sequence[ImageSource]) -> list[ImageSource]:
    """One image, a folder's images or a sequence of images as a list; an empty folder or list is an error."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        items: list[ImageSource] = list_images(path) if path.is_dir() else [path]
        if not items:
            raise LookalikeError(f"{path}: no images found in this folder")
        return items
    items = list(images)
    if not items:
        raise LookalikeError("embed: expected at least one image, got an empty sequence")
    return items


def _image_id(item: ImageSource, position: int) -> str:
    """The id of an image: its path, a PIL image's file name, or image{position}."""
    if isinstance(item, Image.Image):
        return getattr(item, "filename", "") or f"image{position}"
    return os.fspath(item)


def _embed_dataset(
    extractor: Extractor,
    dataset: torch.utils.data.Dataset,
    ids: np.ndarray,
    batch_size: int,
    num_workers: int,
    device: str | torch.device,
    progress: Progress | None,
    channels_last: bool = False,
) -> Embeddings:
    """Run the extractor over (image tensor, position) items in batches; row i of the result is item i."""
    device = resolve_device(device, "extract.device")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    extractor = set_layout(extractor.to(device), channels_last).eval()
    batches = progress(loader, len(loader)) if progress else loader
    out = np.empty((len(dataset), extractor.dim), dtype=np.float32)
    with torch.inference_mode():
        for images, rows in batches:
            out[rows.numpy()] = embed_batch(extractor, images.to(device)).cpu().numpy()
    meta = {"model": extractor.name, "normalized": extractor.normalize}
    return Embeddings(out, ids, meta)


class RowSampler(torch.utils.data.Sampler[int]):
    """The table rows of some shards, shard after shard, each in table order."""

    def __init__(self, manifest: Manifest, shards: list[int]) -> None:
        self.ranges = [manifest.rows(s) for s in shards]

    def __iter__(self) -> Iterator[int]:
        """The rows, shard by shard."""
        return itertools.chain.from_iterable(range(a, b) for a, b in self.ranges)

    def __len__(self) -> int:
        """How many rows."""
        return sum(b - a for a, b in self.ranges)
