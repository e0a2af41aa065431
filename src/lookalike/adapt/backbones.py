"""Frozen timm backbones read at chosen layers: each layer global-average-pooled and L2-normalised, all concatenated."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

from lookalike.core.errors import LookalikeError
from lookalike.data.decode import read_image
from lookalike.models.extractor import load_weights
from lookalike.models.hub import create_timm_model

Progress = Callable[[Iterable, int], Iterable]


class LayerFeatures(nn.Module):
    """A timm model's intermediate feature maps at `layers` (indices into its `feature_info`), pooled to one vector."""

    def __init__(self, model: nn.Module, layers: list[int], name: str) -> None:
        super().__init__()
        self.model, self.layers, self.name = model.eval().requires_grad_(False), layers, name
        info = model.feature_info
        self.blocks = [
            {"backbone": name, "layer": i, "module": info[i]["module"], "dim": int(info[i]["num_chs"])} for i in layers
        ]
        self.dim = sum(block["dim"] for block in self.blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.model.forward_intermediates(images, indices=self.layers, intermediates_only=True, stop_early=True)
        return torch.cat([nn.functional.normalize(m.float().mean(dim=(2, 3)), dim=1) for m in maps], dim=1)

    def data_config(self) -> dict:
        """timm's preprocessing for this backbone (mean, std)."""
        return timm.data.resolve_model_data_config(self.model)


def resolve_layers(layers: list[int], n_layers: int, field: str) -> list[int]:
    """Layer indices made non-negative (-1 = the deepest), sorted and unique: the order timm returns them in."""
    bad = [i for i in layers if not -n_layers <= i < n_layers]
    if not layers or bad:
        got = f"{bad[0]}" if bad else "no layer"
        raise LookalikeError(
            f"{field}: expected layer indices in [{-n_layers}, {n_layers - 1}] (the model has {n_layers} feature "
            f"layers), got {got}"
        )
    return sorted({i % n_layers for i in layers})


def create_layer_features(
    name: str,
    layers: list[int],
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    field: str = "adapt.backbones[0]",
    seed: int = 0,
) -> LayerFeatures:
    """A frozen timm model (pretrained weights downloaded unless a local `weights` file, e.g. a lookalike checkpoint, is
    given)."""
    if weights and not Path(weights).is_file():
        raise LookalikeError(f"{field}.weights: no such file {weights}")
    with torch.random.fork_rng(devices=[]):  # a random-initialised backbone is the same one every time
        torch.manual_seed(seed)
        model = create_timm_model(name, field, pretrained=pretrained and not weights, num_classes=0)
    if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
        raise LookalikeError(
            f"{field}.name: timm model {name!r} cannot return intermediate layers (no forward_intermediates)"
        )
    if weights:
        load_weights(model, weights, field=f"{field}.weights")
    return LayerFeatures(model, resolve_layers(list(layers), len(model.feature_info), f"{field}.layers"), name)


class ImageListDataset(torch.utils.data.Dataset):
    """Images by path, each read once and passed through every backbone's transform: (tensors per backbone, index)."""

    def __init__(self, paths: list[Path], transforms: list[Callable]) -> None:
        self.paths, self.transforms = [str(p) for p in paths], transforms

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        image = read_image(self.paths[i])
        return [transform(image) for transform in self.transforms], i


def extract_image_features(
    paths: list[Path],
    backbones: list[LayerFeatures],
    transforms: list[Callable],
    flip: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features [N, D] of every image, concatenated across backbones in order, and of its mirror image when `flip`."""
    loader = torch.utils.data.DataLoader(
        ImageListDataset(paths, transforms), batch_size=batch_size, num_workers=num_workers
    )
    dim = sum(b.dim for b in backbones)
    plain = np.empty((len(paths), dim), dtype=np.float32)
    mirrored = np.empty((len(paths), dim), dtype=np.float32) if flip else None
    backbones = [b.to(device) for b in backbones]
    with torch.inference_mode():
        for images, rows in progress(loader, len(loader)) if progress else loader:
            images = [x.to(device) for x in images]
            plain[rows.numpy()] = torch.cat([b(x) for b, x in zip(backbones, images)], dim=1).cpu().numpy()
            if mirrored is not None:
                mirrored[rows.numpy()] = (
                    torch.cat([b(x.flip(-1)) for b, x in zip(backbones, images)], dim=1).cpu().numpy()
                )
    return plain, mirrored
