"""Triplet loss over mined triplets, with an optional cross-batch memory (XBM) of past embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lookalike.core.errors import LookalikeError
from lookalike.losses.miners import check_batch, check_strategy, mine_triplets, pairwise_euclidean

TRIPLET_STATS = ("active", "pos_dist", "neg_dist", "triplets")


@dataclass
class LossOutput:
    """A scalar differentiable loss and detached scalar statistics to log."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


def empty_output(embeddings: torch.Tensor, keys: tuple[str, ...], *params: torch.Tensor) -> LossOutput:
    """Loss 0 still connected to the graph (so backward and DDP work) and zero stats, for a batch with nothing to
    learn."""
    loss = embeddings.sum() * 0
    for p in params:
        loss = loss + p.sum() * 0
    return LossOutput(loss, {k: torch.zeros((), device=embeddings.device) for k in keys})


def margin_output(
    d_pos: torch.Tensor, d_neg: torch.Tensor, margin: float | None, embeddings: torch.Tensor
) -> LossOutput:
    """Mean of relu(d_pos - d_neg + margin), or softplus(d_pos - d_neg) when margin is None, with its stats."""
    if len(d_pos) == 0:
        return empty_output(embeddings, TRIPLET_STATS)
    gap = d_pos - d_neg
    losses = nn.functional.softplus(gap) if margin is None else nn.functional.relu(gap + margin)
    active = gap > 0 if margin is None else losses > 0
    stats = {
        "active": active.float().mean(),
        "pos_dist": d_pos.detach().mean(),
        "neg_dist": d_neg.detach().mean(),
        "triplets": torch.tensor(float(len(gap)), device=gap.device),
    }
    return LossOutput(losses.mean(), stats)


class TripletLoss(nn.Module):
    """Triplet loss relu(d_ap - d_an + margin) (soft margin softplus(d_ap - d_an) when margin is None), mean over mined
    triplets.

    memory_size > 0 adds a cross-batch memory (XBM, Wang et al. 2020): a FIFO ring of the last memory_size
    detached valid embeddings and their labels, kept in registered buffers (they follow .to(device) and the
    state dict). Anchors are the current batch; candidates are the batch plus the memory. The memory is read
    and then filled only in training mode, after mining; in eval mode the loss is the plain in-batch loss.
    `dim` sizes the memory up front; without it the first batch does. Pass it under DDP, which broadcasts
    rank 0's buffers as registered when wrapping, so a buffer replaced later would fall out of that sync.
    """

    def __init__(
        self,
        margin: float | None = 0.2,
        miner: str = "batch_hard",
        n_positives: int = 1,
        n_negatives: int = 1,
        memory_size: int = 0,
        dim: int | None = None,
    ) -> None:
        super().__init__()
        check_strategy(miner)
        if margin is not None and margin < 0:
            raise LookalikeError(f"margin: expected a non-negative number or None (soft margin), got {margin}")
        if n_positives < 1 or n_negatives < 1:
            raise LookalikeError(
                f"n_positives, n_negatives: expected positive integers, got {n_positives} and {n_negatives}"
            )
        if memory_size < 0:
            raise LookalikeError(f"memory_size: expected 0 (no memory) or a positive integer, got {memory_size}")
        self.margin, self.miner, self.memory_size = margin, miner, memory_size
        self.n_positives, self.n_negatives, self.dim = n_positives, n_negatives, dim
        if memory_size:
            self.register_buffer(
                "memory_embeddings", torch.zeros(memory_size, dim or 0)
            )  # width 0: set by the first batch
            self.register_buffer("memory_labels", torch.zeros(memory_size, dtype=torch.long))
            self.register_buffer("memory_filled", torch.zeros(memory_size, dtype=torch.bool))
            self.register_buffer("memory_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> LossOutput:
        """Loss of the batch [B, D]; rows with `valid` False (mock/padding) are never anchors, candidates or stored."""
        valid = check_batch(embeddings, labels, valid)
        labels = labels.to(device=embeddings.device, dtype=torch.long)
        use_memory = self.memory_size > 0 and self.training
        candidates, candidate_labels, candidate_valid = self._candidates(embeddings, labels, valid, use_memory)
        anchors = valid.nonzero().squeeze(1)
        dist = pairwise_euclidean(embeddings[anchors], candidates)
        same_item = anchors[:, None] == torch.arange(len(candidates), device=dist.device)[None, :]
        a, p, n = mine_triplets(
            dist.detach(),
            labels[anchors],
            candidate_labels,
            self.miner,
            self.n_positives,
            self.n_negatives,
            same_item,
            candidate_valid,
        )
        out = margin_output(dist[a, p], dist[a, n], self.margin, embeddings)
        if use_memory:
            self._enqueue(embeddings.detach(), labels, valid)
        return out

    def _candidates(
        self, embeddings, labels, valid, use_memory: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidate embeddings, labels and validity: the batch, then the memory slots when the memory is in use."""
        if not use_memory:
            return embeddings, labels, valid
        self._fit_memory(embeddings)
        memory = self.memory_embeddings.to(embeddings.dtype)
        return (
            torch.cat([embeddings, memory]),
            torch.cat([labels, self.memory_labels]),
            torch.cat([valid, self.memory_filled]),
        )

    def _fit_memory(self, embeddings: torch.Tensor) -> None:
        """Give the memory the batch's width on first use; a width other than `dim` or than the stored one is an
        error."""
        dim = embeddings.shape[1]
        if self.memory_embeddings.shape[1] == dim:
            return
        if self.dim is not None or self.memory_filled.any():
            raise LookalikeError(
                f"embeddings: width {dim} differs from the {self.memory_embeddings.shape[1]} stored in the memory"
            )
        self.memory_embeddings = torch.zeros(self.memory_size, dim, device=embeddings.device, dtype=embeddings.dtype)

    @torch.no_grad()
    def _enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> None:
        """Write the valid rows into the ring after the pointer, overwriting the oldest; keep the last memory_size if
        more."""
        x, y = embeddings[valid][-self.memory_size :], labels[valid][-self.memory_size :]
        slots = (self.memory_ptr + torch.arange(len(x), device=x.device)) % self.memory_size
        self.memory_embeddings[slots] = x.to(self.memory_embeddings.dtype)
        self.memory_labels[slots] = y
        self.memory_filled[slots] = True
        self.memory_ptr.copy_((self.memory_ptr + len(x)) % self.memory_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Resize the lazily sized memory to the stored one before loading it."""
        stored = state_dict.get(prefix + "memory_embeddings")
        if self.memory_size and stored is not None and stored.shape != self.memory_embeddings.shape:
            self.memory_embeddings = torch.zeros_like(stored, device=self.memory_embeddings.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
