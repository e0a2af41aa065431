"""Symmetric InfoNCE over a batch of matched pairs: row i of `left` matches row i of `right` and no other."""

from __future__ import annotations

import torch
from torch import nn

from lookalike.core.errors import LookalikeError


def cosine_matrix(left: torch.Tensor, right: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of every left row with every right row, [N, M]; a zero vector has similarity 0 with all."""
    return nn.functional.normalize(left, dim=1, eps=eps) @ nn.functional.normalize(right, dim=1, eps=eps).T


def symmetric_info_nce(left: torch.Tensor, right: torch.Tensor, scale: float = 15.0) -> torch.Tensor:
    """Mean of the cross-entropies of left->right and right->left over the pair-similarity matrix (cosine x `scale`,
    the inverse temperature): each image must pick its own partner among the other side of the batch."""
    if left.ndim != 2 or left.shape != right.shape or len(left) == 0:
        raise LookalikeError(
            f"info_nce: expected two [N, D] batches of the same shape, got {tuple(left.shape)} and {tuple(right.shape)}"
        )
    logits = scale * cosine_matrix(left, right)
    target = torch.arange(len(left), device=left.device)
    return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))
