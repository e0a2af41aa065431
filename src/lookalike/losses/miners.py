"""Distances, batch checks and triplet mining: which (anchor, positive, negative) triples a batch trains on."""

from __future__ import annotations

import torch

from lookalike.core.errors import LookalikeError

STRATEGIES = ("all", "batch_hard", "n_hard")
_EPS = 1e-12  # squared distances at or below this count as zero


def safe_sqrt(squared: torch.Tensor) -> torch.Tensor:
    """sqrt of squared distances: round-off negatives give 0, and the gradient at 0 is 0 instead of inf/NaN."""
    return torch.where(squared > _EPS, squared.clamp_min(_EPS).sqrt(), torch.zeros_like(squared))


def pairwise_euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [N, M] by one matrix product (no [N, M, D] difference tensor), safe to backpropagate at 0."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise LookalikeError(
            f"pairwise_euclidean: x {tuple(x.shape)} and y {tuple(y.shape)} must be [N, D] and [M, D] with equal D"
        )
    squared = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return safe_sqrt(squared)


def check_batch(embeddings: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The batch's validity mask [B] (all True when None), after checking that the three inputs fit together."""
    if embeddings.ndim != 2 or not embeddings.dtype.is_floating_point:
        raise LookalikeError(
            f"embeddings: expected a float tensor [B, D], got {embeddings.dtype} of shape {tuple(embeddings.shape)}"
        )
    b = embeddings.shape[0]
    if labels.shape != (b,) or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise LookalikeError(
            f"labels: expected an integer tensor of shape ({b},), got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if valid is None:
        return torch.ones(b, dtype=torch.bool, device=embeddings.device)
    if valid.shape != (b,):
        raise LookalikeError(f"valid: expected shape ({b},), got {tuple(valid.shape)}")
    return valid.to(device=embeddings.device, dtype=torch.bool)


def check_strategy(strategy: str) -> None:
    """Raise LookalikeError naming the known strategies when `strategy` is not one of them."""
    if strategy not in STRATEGIES:
        raise LookalikeError(f"miner: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")


def mine_triplets(
    dist: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    strategy: str = "batch_hard",
    n_positives: int = 1,
    n_negatives: int = 1,
    same_item: torch.Tensor | None = None,
    candidate_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index triples (anchor rows, positive columns, negative columns) of `dist` [N, M] chosen by `strategy`.

    'all': every (a, p, n) with label(p) == label(a) != label(n); builds an [N, M, M] mask, meant for
    batches of a few hundred (not for a large memory bank). 'batch_hard': per anchor the farthest positive
    and the closest negative. 'n_hard': the n_positives farthest positives x n_negatives closest negatives
    per anchor, all combinations (fewer where fewer exist). `same_item[i, j]` marks column j as anchor i
    itself (never its positive); columns with `candidate_valid` False are never mined; anchors lacking a
    positive or a negative give no triple. No gradient flows through mining.
    """
    check_strategy(strategy)
    if n_positives < 1 or n_negatives < 1:
        raise LookalikeError(
            f"n_positives, n_negatives: expected positive integers, got {n_positives} and {n_negatives}"
        )
    positive, negative = _pair_masks(dist, anchor_labels, candidate_labels, same_item, candidate_valid)
    if strategy == "all":
        return (positive[:, :, None] & negative[:, None, :]).nonzero(as_tuple=True)
    if strategy == "batch_hard":
        n_positives = n_negatives = 1
    return _hardest(dist.detach(), positive, negative, n_positives, n_negatives)


def _pair_masks(dist, anchor_labels, candidate_labels, same_item, candidate_valid) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks [N, M] of the columns each anchor may take as a positive and as a negative."""
    if dist.ndim != 2:
        raise LookalikeError(f"dist: expected a matrix [N, M], got shape {tuple(dist.shape)}")
    n, m = dist.shape
    for name, value, shape in (
        ("anchor_labels", anchor_labels, (n,)),
        ("candidate_labels", candidate_labels, (m,)),
        ("same_item", same_item, (n, m)),
        ("candidate_valid", candidate_valid, (m,)),
    ):
        if value is not None and value.shape != shape:
            raise LookalikeError(
                f"{name}: expected shape {shape} to fit dist {tuple(dist.shape)}, got {tuple(value.shape)}"
            )
    same_label = anchor_labels[:, None] == candidate_labels[None, :]
    allowed = torch.ones_like(same_label)
    if candidate_valid is not None:
        allowed = allowed & candidate_valid.bool()[None, :]
    if same_item is not None:
        allowed = allowed & ~same_item.bool()
    return same_label & allowed, ~same_label & allowed


def _hardest(
    dist, positive, negative, n_positives: int, n_negatives: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The farthest positives x closest negatives of every anchor, by topk on masked distance matrices."""
    m = dist.shape[1]
    pos = dist.masked_fill(~positive, -torch.inf).topk(min(n_positives, m), dim=1).indices
    neg = dist.masked_fill(~negative, torch.inf).topk(min(n_negatives, m), dim=1, largest=False).indices
    pairs = positive.gather(1, pos)[:, :, None] & negative.gather(1, neg)[:, None, :]  # [N, kp, kn]: both slots real
    a, i, j = pairs.nonzero(as_tuple=True)
    return a, pos[a, i], neg[a, j]
