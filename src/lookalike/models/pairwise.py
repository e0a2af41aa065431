"""The STIR pairwise model: two images stacked along the height, one timm backbone, an MLP head, one logit.

sigmoid(logit) is the pair's distance (0 = the same item), so the model is trained with binary cross-entropy
on the logit, target 1 for a negative pair. The head follows the published recipe (Open Metric Learning's
ConcatSiamese): Linear(features, hidden) -> sigmoid -> dropout -> Linear(hidden, 1) without bias. With
`tta` the distance is the mean of both stacking orders' distances.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn
from torchvision.ops import MLP

from lookalike.core.errors import LookalikeError
from lookalike.data.images import transforms_for
from lookalike.models.extractor import load_weights, read_checkpoint
from lookalike.models.hub import create_timm_model
from lookalike.models.spec import SPEC_KEYS, stored_spec

SPEC_KEY = SPEC_KEYS["pairwise"]  # where a checkpoint keeps the PairwiseSpec (lookalike.models.spec)


@dataclass
class PairwiseSpec:
    """Everything needed to rebuild a pairwise model and its input transform from a checkpoint."""

    name: str = "vit_small_patch16_224"  # timm model (STIR: ViT-S/16)
    image_size: int | list[int] = 224  # one image: a square side or [height, width]; the pair is [2h, w]
    hidden: int = 192
    dropout: float = 0.5
    tta: bool = False
    model_kwargs: dict[str, Any] = field(
        default_factory=dict
    )  # extra timm.create_model arguments (patch_size, depth, ...)
    crop_fraction: float = 1.0  # eval transform of each image (lookalike.data.images.transforms_for)

    def __post_init__(self) -> None:
        size = self.image_size if isinstance(self.image_size, int) else list(self.image_size)
        sides = [size] if isinstance(size, int) else size
        if len(sides) not in (1, 2) or min(sides) < 1:
            raise LookalikeError(
                f"pairwise.image_size: expected a positive side or [height, width], got {self.image_size!r}"
            )
        self.image_size = int(sides[0]) if len(sides) == 1 else [int(s) for s in sides]
        if self.hidden < 1 or not 0.0 <= self.dropout < 1.0:
            raise LookalikeError(
                f"pairwise.hidden, pairwise.dropout: expected hidden >= 1 and 0 <= dropout < 1, got {self.hidden} and "
                f"{self.dropout}"
            )

    @property
    def size(self) -> tuple[int, int]:
        """One image's (height, width)."""
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)


class PairwiseModel(nn.Module):
    """Concatenate two images [B, C, h, w] along the height, run the backbone, and give one logit per pair."""

    def __init__(self, spec: PairwiseSpec, pretrained: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = create_backbone(spec, pretrained)
        self.head = mlp_head(self.backbone.num_features, spec.hidden, spec.dropout)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Logits [B] of the pairs (x1 on top of x2)."""
        return self.head(self.backbone(torch.cat([x1, x2], dim=2))).view(-1)

    def distance(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """sigmoid(logit) in [0, 1]; with spec.tta the mean over both stacking orders."""
        d = torch.sigmoid(self(x1, x2))
        return (d + torch.sigmoid(self(x2, x1))) / 2 if self.spec.tta else d

    def data_config(self) -> dict:
        """timm's preprocessing for the backbone (mean, std)."""
        return timm.data.resolve_model_data_config(self.backbone)

    def transform(self) -> Callable:
        """The eval transform of each image, with the backbone's mean and std."""
        return transforms_for(self, self.spec)


def create_backbone(spec: PairwiseSpec, pretrained: bool = False) -> nn.Module:
    """The timm model without classifier, told the doubled input height when it takes an img_size (transformers)."""
    h, w = spec.size
    kwargs = {"pretrained": pretrained, "num_classes": 0, **spec.model_kwargs}
    local = "init_from_extractor=true to start from the extractor's weights"  # the pairwise model has no weights field
    try:
        try:
            return create_timm_model(spec.name, "pairwise", local=local, img_size=(2 * h, w), **kwargs)
        except TypeError as exc:  # a CNN takes any input size and no img_size argument
            if "img_size" not in str(exc):
                raise
            return create_timm_model(spec.name, "pairwise", local=local, **kwargs)
    except TypeError as exc:  # an argument the model does not take
        raise LookalikeError(f"pairwise.name: {exc}") from None


def mlp_head(features: int, hidden: int, dropout: float) -> nn.Sequential:
    """Linear -> sigmoid -> dropout -> Linear(hidden, 1) without bias (the recipe's head, in torchvision's MLP)."""
    head = MLP(features, [hidden, 1], activation_layer=nn.Sigmoid, dropout=dropout)
    head[-2] = nn.Linear(hidden, 1, bias=False)
    head[-1] = nn.Identity()  # no dropout on the logit
    return head


def init_from_extractor(model: PairwiseModel, path: str | os.PathLike) -> PairwiseModel:
    """Start the backbone from an extractor checkpoint of the same timm model (position embeddings resampled to the
    pair)."""
    load_weights(model.backbone, path, adapt=lambda state: _fit_pos_embed(state, model.backbone))
    return model


def _fit_pos_embed(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Resample a ViT's absolute position embeddings from the extractor's grid to the pair's [2 gh, gw] grid."""
    own = backbone.state_dict()
    key = "pos_embed"
    if key not in state or key not in own or state[key].shape == own[key].shape:
        return state
    grid = list(backbone.patch_embed.grid_size)
    prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
    n_old = state[key].shape[1] - prefix
    old = [grid[0] // 2, grid[1]] if n_old == grid[0] // 2 * grid[1] else [int(n_old**0.5)] * 2
    return {**state, key: resample_abs_pos_embed(state[key], grid, old, num_prefix_tokens=prefix)}


def load_pairwise(path: str | os.PathLike, tta: bool | None = None) -> PairwiseModel:
    """A trained pairwise model from a checkpoint written by training; `tta` overrides the stored one."""
    checkpoint = read_checkpoint(path, "pairwise weights")
    stored = stored_spec(checkpoint, "pairwise")
    if stored is None:
        raise LookalikeError(
            f"pairwise weights: {path} is not a pairwise checkpoint (no {SPEC_KEY!r}; train one with lookalike "
            "train-reranker)"
        )
    spec = PairwiseSpec(**stored)
    if tta is not None:
        spec.tta = bool(tta)
    return load_weights(PairwiseModel(spec), path, field="pairwise weights", checkpoint=checkpoint).eval()
