"""ResNet50-IBN-a (Pan et al., "Two at Once", ECCV 2018), the backbone of the best published CTL results, as a timm
model.

Registered with timm as `resnet50_ibn_a`, so `model.name=resnet50_ibn_a` works wherever a timm name does. It is timm's
ResNet-50 whose first normalisation (bn1) in every bottleneck of stages 1-3 is an IBN layer: InstanceNorm (affine) over
the first half of the channels, BatchNorm over the rest; stage 4 and the stem keep BatchNorm. Parameter names follow the
IBN-Net / centroids-reid checkpoints (`layer1.0.bn1.IN.weight`, `layer1.0.bn1.BN.running_mean`, ...). There are no
weights to download: pretrained=True is an error that says to pass a local file as model.weights.
"""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from lookalike.core.errors import LookalikeError

IBN_STAGES = ("layer1", "layer2", "layer3")
PRETRAINED_CFG = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "num_classes": 1000,
    "first_conv": "conv1",
    "classifier": "fc",
}


class IBN(nn.Module):
    """Instance-batch normalisation: InstanceNorm2d (affine) on the first channels // 2 channels, BatchNorm2d on the
    rest."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)  # the checkpoints' key names
        self.BN = nn.BatchNorm2d(channels - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, rest = x[:, : self.half], x[:, self.half :]
        normed = self.BN(rest)
        return torch.cat(
            [self.IN(first.float()).to(normed.dtype), normed], 1
        )  # instance statistics in float32 under AMP


def resnet_ibn_a(layers: tuple[int, ...], **kwargs) -> ResNet:
    """timm's ResNet with bottleneck blocks whose bn1 is IBN in stages 1-3 (IBN-a), initialised as the reference code
    does."""
    model = ResNet(block=Bottleneck, layers=layers, zero_init_last=False, **kwargs)
    for stage in IBN_STAGES:
        for block in getattr(model, stage):
            ibn = IBN(block.bn1.num_features)
            block.bn1 = ibn.to(device=block.conv1.weight.device, dtype=block.conv1.weight.dtype)
    model.pretrained_cfg = model.default_cfg = dict(PRETRAINED_CFG)
    return model


@register_model
def resnet50_ibn_a(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet50-IBN-a; weights come from a local file (model.weights), there is none to download."""
    if pretrained:
        raise LookalikeError(
            "model.pretrained: resnet50_ibn_a has no weights to download; pass a local file, e.g. "
            "model.weights=r50_ibn_a.pth"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm.create_model's, for its own loader
        kwargs.pop(key, None)
    return resnet_ibn_a((3, 4, 6, 3), **kwargs)
