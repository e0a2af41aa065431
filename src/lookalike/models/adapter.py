"""Adaptation modules applied to frozen features of both images of a pair (Risser-Maroix et al., ICIP 2021)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lookalike.core.errors import LookalikeError

ADAPTERS = ("linear", "diagonal", "identity")


class LinearAdapter(nn.Module):
    """The published module: one shared Linear(in -> out, no bias) followed by ReLU."""

    def __init__(self, dim: int, out_dim: int = 1024) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


class DiagonalAdapter(nn.Module):
    """One weight per feature, starting at 1 (the identity), through a ReLU as in the reference's AdaptationPeterson:
    a non-negative re-weighting of the frozen features (a feature whose weight turns negative is switched off)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.relu(self.weight)


def create_adapter(kind: Literal["linear", "diagonal", "identity"], dim: int, out_dim: int = 1024) -> nn.Module:
    """The adaptation module by name; `identity` is the raw-feature baseline through the same code path."""
    if kind == "linear":
        return LinearAdapter(dim, out_dim)
    if kind == "diagonal":
        return DiagonalAdapter(dim)
    if kind == "identity":
        return nn.Identity()
    raise LookalikeError(f"adapt.module: expected one of {', '.join(ADAPTERS)}, got {kind!r}")
