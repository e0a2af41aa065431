"""Centroid triplet loss (Wieczorek et al. 2021, "On the Unreasonable Effectiveness of Centroids in Image
Retrieval")."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lookalike.core.errors import LookalikeError
from lookalike.losses.miners import check_batch, pairwise_euclidean, safe_sqrt
from lookalike.losses.triplet import LossOutput, empty_output, margin_output

CENTROID_MODES = ("official", "equation")
CTL_STATS = ("active", "pos_dist", "neg_dist", "anchors")


class CentroidTripletLoss(nn.Module):
    """The centroid triplet loss, as the official centroids-reid code computes it ('official') or as the paper writes
    it.

    'official' (the default): the batch is cut into rounds; round s takes the s-th valid instance of every label as
    the query and the mean of the label's OTHER valid instances as its (leave-one-out) centroid. Queries and centroids
    of a round are stacked into one set and batch-hard mining runs over it: every query AND every centroid is an anchor,
    its positive is its partner (query <-> own centroid), its negative the closest query or centroid of another label.
    relu(d_pos - d_neg + margin) (softplus(d_pos - d_neg) when margin is None), mean over a round's anchors, then over
    the rounds that hold at least two labels. 'equation': each instance against centroids only, relu(d(q, c_pos) -
    min d(q, c_neg) + margin) with c_pos leave-one-out and c_neg the full centroids of the other labels, mean over
    anchors. Euclidean distance (not squared) in both; gradients flow through the centroids. A label with one valid
    instance has no anchor; rows with `valid` False (mock instances) are in no centroid and never anchors.
    """

    def __init__(self, margin: float | None = 0.5, mode: Literal["official", "equation"] = "official") -> None:
        super().__init__()
        if margin is not None and margin < 0:
            raise LookalikeError(f"margin: expected a non-negative number or None (soft margin), got {margin}")
        if mode not in CENTROID_MODES:
            raise LookalikeError(f"centroid mode: expected one of {', '.join(CENTROID_MODES)}, got {mode!r}")
        self.margin, self.mode = margin, mode

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> LossOutput:
        """Loss of a P x K batch [B, D]; stats: active (fraction of anchors with positive loss), pos_dist, neg_dist,
        anchors."""
        valid = check_batch(embeddings, labels, valid)
        x, y = embeddings[valid], labels.to(embeddings.device)[valid]
        _, own = torch.unique(y, return_inverse=True)
        counts = torch.bincount(own)
        sums = x.new_zeros(len(counts), x.shape[1]).index_add(0, own, x)
        anchor = counts[own] > 1 if len(x) else torch.zeros(0, dtype=torch.bool, device=x.device)
        if not anchor.any():
            return empty_output(embeddings, CTL_STATS)
        left_out = (sums[own] - x) / (counts[own] - 1).clamp_min(1)[:, None].to(x.dtype)
        if self.mode == "official":
            return self._official(x[anchor], left_out[anchor], own[anchor], embeddings)
        return self._equation(x, left_out, own, anchor, sums / counts[:, None].to(x.dtype), embeddings)

    def _equation(self, x, left_out, own, anchor, centroids, embeddings) -> LossOutput:
        """The paper's equation: each anchor's leave-one-out centroid against the closest full centroid of another
        label."""
        d_pos = safe_sqrt(((x - left_out) ** 2).sum(1))
        is_own = own[:, None] == torch.arange(len(centroids), device=x.device)[None, :]
        d_neg = pairwise_euclidean(x, centroids).masked_fill(is_own, torch.inf).min(1).values
        anchor = anchor & torch.isfinite(d_neg)
        return _renamed(margin_output(d_pos[anchor], d_neg[anchor], self.margin, embeddings))

    def _official(self, queries, centroids, own, embeddings) -> LossOutput:
        """Rounds of (query, leave-one-out centroid) sets with batch-hard mining over queries and centroids together."""
        n = len(queries)
        order = torch.argsort(own, stable=True)
        rank = torch.empty_like(own)
        starts = torch.searchsorted(own[order], own[order], side="left")
        rank[order] = torch.arange(n, device=own.device) - starts  # s: position of the instance among its label's
        points = torch.cat([queries, centroids])
        points = points.to(
            torch.promote_types(points.dtype, torch.float32)
        )  # distances in float32 at least, as the official code
        label, round_ = own.repeat(2), rank.repeat(2)
        dist = pairwise_euclidean(points, points)
        d_pos = dist[torch.arange(2 * n, device=dist.device), torch.arange(2 * n, device=dist.device).roll(n)]
        negative = (round_[:, None] == round_[None, :]) & (label[:, None] != label[None, :])
        d_neg = dist.masked_fill(~negative, torch.inf).min(1).values
        keep = torch.isfinite(d_neg)  # rounds with a single label are skipped, as the official code does
        if not keep.any():
            return empty_output(embeddings, CTL_STATS)
        out = _renamed(margin_output(d_pos[keep], d_neg[keep], self.margin, embeddings))
        out.loss = _mean_of_round_means(_per_anchor(d_pos[keep], d_neg[keep], self.margin), round_[keep])
        return out


def _per_anchor(d_pos: torch.Tensor, d_neg: torch.Tensor, margin: float | None) -> torch.Tensor:
    """relu(d_pos - d_neg + margin) per anchor, or softplus(d_pos - d_neg) for the soft margin."""
    gap = d_pos - d_neg
    return nn.functional.softplus(gap) if margin is None else nn.functional.relu(gap + margin)


def _mean_of_round_means(losses: torch.Tensor, rounds: torch.Tensor) -> torch.Tensor:
    """The mean over rounds of each round's mean loss (the official code averages per round, then over rounds)."""
    _, idx = torch.unique(rounds, return_inverse=True)
    sizes = torch.bincount(idx).to(losses.dtype)
    sums = losses.new_zeros(len(sizes)).index_add(0, idx, losses)
    return (sums / sizes).mean()


def _renamed(out: LossOutput) -> LossOutput:
    """margin_output's stats with 'triplets' called 'anchors'."""
    out.stats["anchors"] = out.stats.pop("triplets")
    return out
