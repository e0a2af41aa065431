"""P x K balanced batches for metric learning: p labels per batch, k images per label, deterministic and DDP-aware.

An epoch is one shuffled pass over the labels (each label once, as in Open Metric Learning), or
`batches_per_epoch` batches made of as many passes as needed (for datasets with few labels).

Labels with fewer than k images are handled by `few_images`:
- "repeat": the missing images are drawn again, with repetition, from the label's own images;
- "pad": the same, but the filled-in slots are yielded as negative indices -(i + 1) ("mock" instances):
  the training dataset loads image i and flags it invalid, so losses never use it as an anchor or mine it
  (`decode_index` turns such an index back into (row, valid));
- "drop": the label is never sampled.
A label with a single image still works with "repeat" and "pad" (k - 1 repeats or mock instances): with
"repeat" it only yields positive pairs of an image with itself, so prefer "pad" or "drop" for such data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Sampler

from lookalike.core.errors import LookalikeError

FEW_IMAGES = ("repeat", "pad", "drop")


def decode_index(i: int) -> tuple[int, bool]:
    """The dataset row of a sampled index and whether it is a real instance (False for a "pad" mock)."""
    return (int(i), True) if i >= 0 else (-int(i) - 1, False)


class PKSampler(Sampler[list[int]]):
    """Batches of p labels x k images each, for metric learning; deterministic under (seed, epoch); DDP-aware.

    Use it as `DataLoader(dataset, batch_sampler=PKSampler(...))`, and call `set_epoch` before each epoch.
    Every rank builds the same global batch list and takes batches rank, rank + R, ...; with Lightning,
    pass `use_distributed_sampler=False` to the Trainer so that it does not wrap this sampler again.
    """

    def __init__(
        self,
        labels: Sequence | np.ndarray,
        p: int,
        k: int,
        few_images: str = "repeat",
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        batches_per_epoch: int | None = None,
    ) -> None:
        _check_positive(p, "p")
        _check_positive(k, "k")
        if few_images not in FEW_IMAGES:
            raise LookalikeError(f"few_images: expected one of {', '.join(FEW_IMAGES)}, got {few_images!r}")
        self.p, self.k, self.few_images, self.seed, self.epoch = p, k, few_images, seed, 0
        if batches_per_epoch is not None:
            _check_positive(batches_per_epoch, "batches_per_epoch")
        self.batches_per_epoch = batches_per_epoch
        self.num_replicas, self.rank = _replicas(num_replicas, rank)
        codes = _label_codes(labels)
        self.order = np.argsort(codes, kind="stable")  # rows grouped by label
        self.counts = np.bincount(codes)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        full = self.counts >= k
        self.eligible = np.flatnonzero(full if few_images == "drop" else self.counts > 0)
        if len(self.eligible) < p:
            raise LookalikeError(
                f"p: only {int(full.sum())} labels have >= k={k} images ({len(self.eligible)} usable with "
                f"few_images={few_images!r}), fewer than p={p} labels per batch"
            )

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle `__iter__` yields (same seed and epoch give the same batches)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (equal on every rank)."""
        return self._n_batches() // self.num_replicas

    def _n_batches(self) -> int:
        """Global batches per epoch: one pass over the labels, or batches_per_epoch when set (small label sets)."""
        return self.batches_per_epoch or len(self.eligible) // self.p

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()[: len(self) * self.num_replicas]
        return iter(batches[self.rank :: self.num_replicas].tolist())

    def global_batches(self) -> np.ndarray:
        """All batches of the epoch before the split over ranks, [n_batches, p * k] (same on every rank)."""
        rng = np.random.default_rng((self.seed, self.epoch))
        n_batches, per_pass = self._n_batches(), len(self.eligible) // self.p
        passes = [self._one_pass(rng, per_pass) for _ in range(-(-n_batches // per_pass))]
        return np.concatenate(passes)[:n_batches]

    def _one_pass(self, rng: np.random.Generator, n_batches: int) -> np.ndarray:
        """One shuffled pass over the labels: n_batches batches of p distinct labels, k images each."""
        chosen = rng.permutation(self.eligible)[: n_batches * self.p]
        order = self._shuffled_rows(rng)
        count = self.counts[chosen][:, None]
        slot = np.arange(self.k)[None, :]
        missing = slot >= count  # slots beyond the label's own images
        extra = (rng.random((len(chosen), self.k)) * count).astype(np.int64)
        within = np.where(missing, extra, slot)
        rows = order[self.starts[chosen][:, None] + within]
        if self.few_images == "pad":
            rows = np.where(missing, -rows - 1, rows)
        return rows.reshape(n_batches, self.p * self.k)

    def _shuffled_rows(self, rng: np.random.Generator) -> np.ndarray:
        """Rows grouped by label (same label blocks as `self.order`), shuffled within each label."""
        label_of = np.repeat(np.arange(len(self.counts)), self.counts)
        within = np.lexsort((rng.random(len(self.order)), label_of))
        return self.order[within]


def _check_positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise LookalikeError(f"{name}: expected a positive integer, got {value!r}")


def _label_codes(labels: Sequence | np.ndarray) -> np.ndarray:
    """Integer code per item; a missing label is an error naming its position."""
    codes, _ = pd.factorize(np.asarray(labels, dtype=object).ravel())
    if len(codes) == 0:
        raise LookalikeError("labels: expected at least one label, got none")
    if (codes < 0).any():
        raise LookalikeError(f"labels: missing label at position {int(np.flatnonzero(codes < 0)[0])}")
    return codes.astype(np.int64)


def _replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """World size and rank: given, else torch.distributed's when initialised, else 1 and 0."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = num_replicas if num_replicas is not None else (torch.distributed.get_world_size() if dist else 1)
    rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
    _check_positive(world, "num_replicas")
    if not 0 <= rank < world:
        raise LookalikeError(f"rank: expected 0 <= rank < num_replicas={world}, got {rank}")
    return int(world), int(rank)
