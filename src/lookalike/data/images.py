"""Image loading for a dataset table: rows to tensors through `decode.read_image` (RGB, upright, cropped) and v2
transforms."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from PIL import Image
from torchvision.transforms import v2

from lookalike.core.table import DatasetTable
from lookalike.data.decode import read_image, upright_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_side(image_size: int | list[int], crop_fraction: float) -> int | None:
    """The side eval_transform resizes an image's shorter side to (None: resized to exactly [height, width])."""
    return int(round(image_size / crop_fraction)) if isinstance(image_size, int) else None


def eval_transform(
    image_size: int | list[int] = 224,
    crop_fraction: float = 0.875,
    mean: tuple = IMAGENET_MEAN,
    std: tuple = IMAGENET_STD,
) -> v2.Compose:
    """Square size: resize the short side to size / crop_fraction and centre-crop. [height, width] (re-ID's 256 x 128):
    resize to exactly that. Then scale to float and normalise."""
    if isinstance(image_size, int):
        resize = [v2.Resize(resize_side(image_size, crop_fraction), antialias=True), v2.CenterCrop(image_size)]
    else:
        resize = [v2.Resize(tuple(image_size), antialias=True)]
    return v2.Compose([v2.ToImage(), *resize, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class ImageSettings(Protocol):
    """What an evaluation transform reads from the data settings: DataConfig, an Extractor, a PairwiseSpec, an index
    manifest's transform section."""

    image_size: int | list[int]
    crop_fraction: float


def normalisation(model: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) images are normalised with: a model's own (its `data_config()`, else timm's data config of the
    module), a mapping's `mean` and `std` (a recorded data config), or ImageNet's for None."""
    if model is None:
        return IMAGENET_MEAN, IMAGENET_STD
    if isinstance(model, Mapping):
        config = model
    elif hasattr(model, "mean") and hasattr(model, "std"):  # recorded settings (an index manifest's transform)
        config = {"mean": model.mean, "std": model.std}
    elif hasattr(model, "data_config"):
        config = model.data_config()
    else:
        import timm  # a plain timm module

        config = timm.data.resolve_model_data_config(model)
    return tuple(config["mean"]), tuple(config["std"])


def transforms_for(model: Any, data: ImageSettings) -> v2.Compose:
    """The evaluation transform of `model` at `data`'s size: the one place extraction, indexing, serving, training's
    validation, pairwise re-ranking and adapt's backbones build it, so equal settings give equal tensors.

    Args:
        model: an Extractor, PairwiseModel, adapt backbone or timm module (its pretrained mean and std), recorded
            `mean` and `std` (a mapping or attributes), or None (ImageNet's).
        data: anything with `image_size` and `crop_fraction` (DataConfig, Extractor, PairwiseSpec, ...).

    Returns:
        The transform: resize (and centre-crop for a square size), scale to float, normalise.

    Example:
        >>> from lookalike.config import DataConfig
        >>> transforms_for(None, DataConfig(image_size=32, crop_fraction=1.0))(Image.new("RGB", (64, 48))).shape
        torch.Size([3, 32, 32])
    """
    mean, std = normalisation(model)
    return eval_transform(data.image_size, data.crop_fraction, mean, std)


class ImageDataset(torch.utils.data.Dataset):
    """Items of a dataset table as (image tensor, row index) pairs."""

    def __init__(self, table: DatasetTable, transform: Callable | None = None) -> None:
        self.paths = [str(p) for p in table.image_paths()]
        self.boxes = table.boxes
        self.transform = transform or eval_transform()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = read_image(self.paths[i], None if self.boxes is None else self.boxes[i])
        return self.transform(img), i


ImageSource = str | os.PathLike | Image.Image  # an image file, or an image already in memory


class ImageListDataset(torch.utils.data.Dataset):
    """Image files or PIL images (decoded as table rows are: upright 8-bit RGB) as (image tensor, position) pairs."""

    def __init__(self, images: Sequence[ImageSource], transform: Callable | None = None) -> None:
        self.images = list(images)
        self.transform = transform or eval_transform()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.images[i]
        img = upright_rgb(item) if isinstance(item, Image.Image) else read_image(item)
        return self.transform(img), i
