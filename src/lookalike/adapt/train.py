"""Training one adaptation module on pair features with symmetric InfoNCE; the epoch kept is chosen on validation
pairs."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from lookalike.adapt.evaluate import DIRECTIONS, topk_accuracy
from lookalike.adapt.features import PairFeatures
from lookalike.core.errors import LookalikeError
from lookalike.losses.info_nce import symmetric_info_nce
from lookalike.models.adapter import create_adapter


@dataclass(frozen=True)
class TrainSettings:
    """The loop's knobs (adapt.* in the config)."""

    module: str = "linear"
    hidden: int = 1024
    scale: float = 15.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 100
    batch_size: int | None = None  # None: one full-batch step per epoch
    monitor: str = "top1/mean"  # validation metric that picks the epoch (higher is better; 'loss': lower is better)
    top_k: tuple[int, ...] = (1, 3, 5)
    device: str = "cpu"
    mirrors: Literal["random", "both"] = "random"  # with mirror features: each image mirrored with p 1/2, or (the
    # reference's) the loss averaged over the plain and the mirrored pairs


@dataclass
class FitResult:
    """The module at the chosen epoch, that epoch (0 = untrained) and per-epoch curves (loss/train, validation/...)."""

    module: nn.Module
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def tensors(features: PairFeatures, device: str) -> dict[str, torch.Tensor]:
    """The feature arrays of `features` as float32 tensors on `device`."""
    names = ("left", "right", "left_flip", "right_flip") if features.has_flip else ("left", "right")
    return {name: torch.as_tensor(getattr(features, name), dtype=torch.float32, device=device) for name in names}


def augmented(data: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right features with each image independently replaced by its mirror image with probability 1/2."""
    if "left_flip" not in data:
        return data["left"], data["right"]
    sides = []
    for side in ("left", "right"):
        mirror = (torch.rand(len(data[side]), generator=generator) < 0.5).to(data[side].device)[:, None]
        sides.append(torch.where(mirror, data[f"{side}_flip"], data[side]))
    return sides[0], sides[1]


def score(module: nn.Module, data: dict[str, torch.Tensor], scale: float, ks: tuple[int, ...]) -> dict[str, float]:
    """Loss and top-k accuracies of the module on (un-mirrored) pairs."""
    module.eval()
    with torch.no_grad():
        left, right = module(data["left"]), module(data["right"])
        return {"loss": symmetric_info_nce(left, right, scale).item(), **topk_accuracy(left, right, ks)}


def _better(new: dict[str, float], best: dict[str, float] | None, monitor: str) -> bool:
    """Higher monitor wins (lower for 'loss'); equal monitors are broken by the lower loss, then the earlier epoch."""
    if best is None:
        return True
    sign = -1.0 if monitor == "loss" else 1.0
    return (sign * new[monitor], -new["loss"]) > (sign * best[monitor], -best["loss"])


def train_epoch(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: dict[str, torch.Tensor],
    s: TrainSettings,
    generator: torch.Generator,
) -> float:
    """One pass over the training pairs (shuffled mini-batches, or one full batch); the mean loss."""
    module.train()
    both = s.mirrors == "both" and "left_flip" in data
    views = (
        [(data["left"], data["right"]), (data["left_flip"], data["right_flip"])]
        if both
        else [augmented(data, generator)]
    )
    order = torch.randperm(len(data["left"]), generator=generator).to(data["left"].device)
    losses = []
    for chunk in order.split(s.batch_size or len(order)):
        if len(chunk) < 2:  # a lone pair has no negatives
            continue
        loss = sum(
            symmetric_info_nce(module(left[chunk]), module(right[chunk]), s.scale) for left, right in views
        ) / len(views)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def fit_adapter(
    train: PairFeatures,
    validation: PairFeatures | None,
    s: TrainSettings,
    seed: int = 0,
    test: PairFeatures | None = None,
) -> FitResult:
    """Adam on symmetric InfoNCE for `epochs`; keeps the epoch (0 = untrained) with the best validation `monitor`, or
    the
    last epoch when there are no validation pairs. The identity module has nothing to train and stays at epoch 0.
    `test` pairs, when given, are scored after every epoch into the history (test/...) and never choose anything."""
    if s.monitor != "loss" and s.monitor not in {f"top{k}/{d}" for k in s.top_k for d in DIRECTIONS}:
        raise LookalikeError(
            f"adapt.monitor: expected 'loss' or top{{k}}/{{direction}} with k in adapt.top_k, got {s.monitor!r}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = create_adapter(s.module, train.dim, s.hidden).to(s.device)
    train_data = tensors(train, s.device)
    val_data = tensors(validation, s.device) if validation is not None and len(validation) > 1 else None
    test_data = tensors(test, s.device) if test is not None and len(test) > 1 else None
    params = list(module.parameters())
    if not params:
        return FitResult(
            module,
            0,
            [{f"validation/{k}": v for k, v in score(module, val_data, s.scale, s.top_k).items()}] if val_data else [],
        )
    optimizer = torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history, best, best_epoch, best_state = [], None, 0, None
    for epoch in range(s.epochs + 1):
        record = {"loss/train": train_epoch(module, optimizer, train_data, s, generator)} if epoch else {}
        if val_data is not None:
            val = score(module, val_data, s.scale, s.top_k)
            record.update({f"validation/{k}": v for k, v in val.items()})
            if _better(val, best, s.monitor):
                best, best_epoch, best_state = val, epoch, copy.deepcopy(module.state_dict())
        if test_data is not None:
            record.update({f"test/{k}": v for k, v in score(module, test_data, s.scale, s.top_k).items()})
        history.append(record)
    if best_state is not None:
        module.load_state_dict(best_state)
    else:
        best_epoch = s.epochs
    return FitResult(module.eval(), best_epoch, history)
