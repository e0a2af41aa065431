"""Center loss (Wen et al. 2016): pull each embedding towards a learnt centre of its class."""

from __future__ import annotations

import torch
from torch import nn

from lookalike.core.errors import LookalikeError
from lookalike.losses.miners import check_batch
from lookalike.losses.triplet import LossOutput


class CenterLoss(nn.Module):
    """Mean over valid samples of scale * ||x_i - c_{y_i}||^2, with learnable centres c [num_classes, dim].

    scale 0.5 is the paper's 1/2, so d loss / d x_i = (x_i - c_{y_i}) / n_valid; the official CTL code uses 1 (no 1/2).
    The paper sums over the mini-batch, here (as in the CTL code) it is the mean so the scale does not depend on the
    batch size. The centres are an nn.Parameter, meant for their own optimizer (the paper's centre learning rate alpha).
    """

    def __init__(self, num_classes: int, dim: int, scale: float = 0.5) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise LookalikeError(f"num_classes, dim: expected positive integers, got {num_classes} and {dim}")
        if scale <= 0:
            raise LookalikeError(f"center scale: expected a positive number, got {scale}")
        self.num_classes, self.dim, self.scale = num_classes, dim, scale
        self.centers = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> LossOutput:
        """Loss of the batch [B, dim]; rows with `valid` False count for nothing (their labels are not looked up)."""
        valid = check_batch(embeddings, labels, valid)
        if embeddings.shape[1] != self.dim:
            raise LookalikeError(f"embeddings: expected width {self.dim} (CenterLoss dim), got {embeddings.shape[1]}")
        labels = labels.to(device=embeddings.device, dtype=torch.long).masked_fill(~valid, 0)
        if ((labels < 0) | (labels >= self.num_classes)).any():
            raise LookalikeError(f"labels: expected class indices in [0, {self.num_classes - 1}] for the valid rows")
        squared = ((embeddings - self.centers[labels].to(embeddings.dtype)) ** 2).sum(1)
        weight = valid.to(embeddings.dtype)
        return LossOutput(self.scale * (squared * weight).sum() / weight.sum().clamp_min(1), {})
