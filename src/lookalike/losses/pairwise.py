"""Pairs for the pairwise (STIR) model, mined from a frozen extractor's embeddings, and their binary cross-entropy."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lookalike.core.errors import LookalikeError
from lookalike.losses.miners import check_batch, mine_triplets, pairwise_euclidean
from lookalike.losses.triplet import LossOutput, empty_output

PAIR_MINING = ("hard", "random")
PAIR_STATS = ("accuracy", "pairs", "negatives")


def mine_pairs(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None = None,
    items: torch.Tensor | None = None,
    mining: Literal["hard", "random"] = "hard",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch positions (first, second) and is_negative [P] of the pairs to train on.

    Every valid anchor gives (anchor, its farthest positive) and (anchor, its closest negative) by the euclidean
    distance of `embeddings` ("hard"), or a uniformly random positive and negative ("random"). `items` (e.g. table
    rows) identify images: an item is never its own positive, and pairs of the same two items, in either order,
    are kept once (the first mined). Anchors without a positive or a negative give no pair; invalid (padding)
    positions are never used. No gradient flows through mining.
    """
    if mining not in PAIR_MINING:
        raise LookalikeError(f"pairwise.mining: expected one of {', '.join(PAIR_MINING)}, got {mining!r}")
    valid = check_batch(embeddings, labels, valid)
    items = torch.arange(len(labels), device=labels.device) if items is None else items.to(labels.device)
    x = embeddings.detach().float()
    dist = (
        pairwise_euclidean(x, x) if mining == "hard" else torch.rand(len(x), len(x), generator=generator).to(x.device)
    )
    a, p, n = mine_triplets(
        dist, labels, labels, "batch_hard", same_item=items[:, None] == items[None, :], candidate_valid=valid
    )
    a, p, n = a[valid[a]], p[valid[a]], n[valid[a]]
    first, second = torch.cat([a, a]), torch.cat([p, n])
    is_negative = torch.cat([torch.zeros_like(a, dtype=torch.bool), torch.ones_like(a, dtype=torch.bool)])
    keep = _first_of_each(items[first], items[second])
    return first[keep], second[keep], is_negative[keep]


def _first_of_each(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of every unordered pair {u, v}, in order."""
    if len(u) == 0:
        return torch.zeros(0, dtype=torch.long, device=u.device)
    low, high = torch.minimum(u, v), torch.maximum(u, v)
    _, inverse = torch.unique(torch.stack([low, high], 1), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(u), dtype=torch.long, device=u.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(u), device=u.device), "amin")
    return first.sort().values


def pair_bce(logits: torch.Tensor, is_negative: torch.Tensor) -> LossOutput:
    """Binary cross-entropy of the pair logits with target 1 for a negative pair (so sigmoid(logit) is a distance)."""
    if logits.shape != is_negative.shape:
        raise LookalikeError(
            f"logits {tuple(logits.shape)} and is_negative {tuple(is_negative.shape)} must have the same shape"
        )
    if len(logits) == 0:
        return empty_output(logits, PAIR_STATS)
    target = is_negative.float()
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
    stats = {
        "accuracy": ((logits.detach() > 0) == is_negative).float().mean(),
        "pairs": torch.tensor(float(len(logits)), device=logits.device),
        "negatives": target.mean(),
    }
    return LossOutput(loss, stats)
