"""Centroid triplet loss (Wieczorek et al. 2021, "On the Unreasonable Effectiveness of Centroids in Image Retrieval")."""

from __future__ import annotations

import torch
from torch import nn

from lookalike.errors import LookalikeError
from lookalike.losses.miners import check_batch, pairwise_euclidean, safe_sqrt
from lookalike.losses.triplet import LossOutput, empty_output, margin_output


class CentroidTripletLoss(nn.Module):
    """Each valid instance against class centroids: relu(d(q, c_pos) - min d(q, c_neg) + margin), mean over anchors.

    c_pos is the leave-one-out centroid (mean of the OTHER valid instances of q's label), so an instance
    alone in its label is not an anchor; c_neg are the centroids of all valid instances of each other label.
    Euclidean distance; gradients flow through the centroids. Rows with `valid` False (mock instances) are
    left out of every centroid and are never anchors.
    """

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        if margin < 0:
            raise LookalikeError(f"margin: expected a non-negative number, got {margin}")
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> LossOutput:
        """Loss of a P x K batch [B, D]; stats: active (fraction of anchors with positive loss), pos_dist, neg_dist, anchors."""
        valid = check_batch(embeddings, labels, valid)
        x, y = embeddings[valid], labels.to(embeddings.device)[valid]
        classes, own = torch.unique(y, return_inverse=True)
        counts = torch.bincount(own, minlength=len(classes))
        sums = x.new_zeros(len(classes), x.shape[1]).index_add(0, own, x)
        centroids = sums / counts[:, None].to(x.dtype)
        others = (counts[own] - 1).clamp_min(1)[:, None].to(x.dtype)
        d_pos = safe_sqrt(((x - (sums[own] - x) / others) ** 2).sum(1))
        is_own = own[:, None] == torch.arange(len(classes), device=x.device)[None, :]
        d_neg = pairwise_euclidean(x, centroids).masked_fill(is_own, torch.inf).min(1).values if len(classes) else d_pos
        anchor = (counts[own] > 1) & torch.isfinite(d_neg)
        if not anchor.any():
            return empty_output(embeddings, ("active", "pos_dist", "neg_dist", "anchors"))
        out = margin_output(d_pos[anchor], d_neg[anchor], self.margin, embeddings)
        out.stats["anchors"] = out.stats.pop("triplets")
        return out
