"""Image loading for a dataset table: rows to tensors through `decode.read_image` (RGB, upright, cropped) and v2
transforms."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

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
