"""STIR re-ranking: a pairwise model re-scores each query's top_n candidates from the images themselves.

The Q x top_n (query, candidate) pairs are scored in batches. Images are decoded and transformed once per
distinct image (queries are not decoded again for each of their candidates): the queries are split into
chunks whose distinct images fit in `cache_mb`, and a chunk's images are decoded once into one tensor that
the pair batches index. With the default budget a dataset of a few thousand images is one chunk, so every
image is decoded exactly once.

Merge rule (Open Metric Learning's PairwiseReranker, so the new rankings are the same): each row's top_n
items are sorted by their new distance (ties keep their old order); everything after top_n stays where it
was, with its distances. When the largest new distance exceeds the (top_n+1)-th original distance t, the
new distances are rescaled to d * m / max(d) with m = t (1 - gap), gap = 1000 float32 epsilons, so the row
stays ascending. OML subtracts an absolute 1000 epsilons after scaling to t instead, which turns the new
distances negative when t is below about 1e-4; here they stay in [0, t). When t <= 0 (a list of negated
scores) they are shifted by m - max(d) instead (m = t - gap |t|), since a negative ratio would flip them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from lookalike.core.results import PAD, RetrievalResults
from lookalike.core.table import DatasetTable
from lookalike.data.images import ImageDataset
from lookalike.devices import resolve_device
from lookalike.models.pairwise import PairwiseModel, load_pairwise
from lookalike.rerank.base import RerankContext, Reranker, positive_int, register

MERGE_GAP = np.float32(1000 * np.finfo(np.float32).eps)  # relative gap kept below the first untouched distance


@register
class PairwiseReranker(Reranker):
    """Re-scores the top_n items of every list with a pairwise model (a checkpoint path or a PairwiseModel)."""

    name = "pairwise"
    uses_embeddings = False  # scores the images of the list's pairs

    def __init__(
        self,
        weights: str | os.PathLike | PairwiseModel,
        top_n: int = 5,
        batch_size: int = 128,
        tta: bool | None = None,
        device: str = "cpu",
        amp: bool = True,
        num_workers: int = 0,
        cache_mb: int = 1024,
        progress: bool = True,
    ) -> None:
        self.top_n = positive_int(top_n, "top_n", self.name)
        self.batch_size = positive_int(batch_size, "batch_size", self.name)
        self.cache_mb = positive_int(cache_mb, "cache_mb", self.name)
        self.weights, self.tta, self.device, self.amp = (
            weights,
            tta,
            resolve_device(device, "pairwise.device"),
            bool(amp),
        )
        self.num_workers, self.progress = int(num_workers), bool(progress)
        self._model: PairwiseModel | None = None

    @property
    def model(self) -> PairwiseModel:
        """The pairwise model, loaded on first use."""
        if self._model is None:
            self._model = (
                self.weights if isinstance(self.weights, PairwiseModel) else load_pairwise(self.weights, self.tta)
            )
        return self._model

    def rerank(self, results: RetrievalResults, context: RerankContext) -> RetrievalResults:
        """New results: each row's top_n sorted by the pairwise distance, the rest in place (see the module's merge
        rule)."""
        context.require("table", by=self.name)
        batches = self.pair_batches(results, context.table)
        model, training = self.model.to(self.device), self.model.training
        try:
            head = score_pairs(model.eval(), batches, self.device, self.amp, self.progress)
        finally:
            model.train(training)
        merged = merge_top_n(results, head)
        record = {"name": self.name, "top_n": head.shape[1], "model": model.spec.name, "tta": model.spec.tta}
        merged.meta["rerank"] = [*results.meta.get("rerank", []), record]
        return merged

    def pair_batches(self, results: RetrievalResults, table: DatasetTable) -> PairBatches:
        """The (query, candidate) image batches of the results' top_n, decoded per chunk of queries."""
        model = self.model
        query_rows, gallery_rows = table_rows(table, results)
        transform = model.transform()
        images_per_chunk = max(1, self.cache_mb * 2**20 // (4 * 3 * int(np.prod(model.spec.size))))
        plans = plan_pairs(results, query_rows, gallery_rows, self.top_n, images_per_chunk)
        shape = (results.n_queries, min(self.top_n, results.k))
        return PairBatches(table, transform, plans, shape, self.batch_size, self.num_workers)


def table_rows(table: DatasetTable, results: RetrievalResults) -> tuple[np.ndarray, np.ndarray]:
    """Table rows of the results' query and gallery ids (table paths); an id missing from the table is an error."""
    return (
        table.rows_of(results.query_ids, "rerank pairwise: query id"),
        table.rows_of(results.gallery_ids, "rerank pairwise: gallery id"),
    )


@dataclass
class PairPlan:
    """One chunk of queries: the table rows to decode (each once) and, per pair, its two slots among them."""

    rows: np.ndarray  # [U] distinct table rows
    first: np.ndarray  # [P] slot of the query image
    second: np.ndarray  # [P] slot of the candidate image
    cells: np.ndarray  # [P] flat position q * top_n + j in the [Q, top_n] head


def plan_pairs(
    results: RetrievalResults, query_rows: np.ndarray, gallery_rows: np.ndarray, top_n: int, images_per_chunk: int
) -> list[PairPlan]:
    """Chunks of queries whose distinct images (queries and their top_n candidates) number at most images_per_chunk."""
    n = min(top_n, results.k)
    head = results.indices[:, :n]
    step = max(1, images_per_chunk // (n + 1))
    plans = []
    for start in range(0, results.n_queries, step):
        q, j = np.nonzero(head[start : start + step] != PAD)
        q += start
        rows, inverse = np.unique(np.concatenate([query_rows[q], gallery_rows[head[q, j]]]), return_inverse=True)
        plans.append(PairPlan(rows, inverse[: len(q)], inverse[len(q) :], q * n + j))
    return plans


def decode_rows(
    table: DatasetTable, rows: np.ndarray, transform: Callable, batch_size: int = 64, num_workers: int = 0
) -> torch.Tensor:
    """The transformed images of the given table rows, stacked [U, C, H, W] (each decoded once)."""
    dataset = torch.utils.data.Subset(ImageDataset(table, transform), rows.tolist())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    return torch.cat([images for images, _ in loader]) if len(rows) else torch.empty(0)


class PairBatches(torch.utils.data.Dataset):
    """Item i = batch i of pairs (query images, candidate images, cells); read in order, each plan's images are decoded
    once, when its first batch is read, and the last plan's stay decoded (so a single plan is decoded only once
    ever)."""

    def __init__(
        self,
        table: DatasetTable,
        transform: Callable,
        plans: list[PairPlan],
        shape: tuple[int, int],
        batch_size: int,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.table, self.transform, self.plans, self.shape = (
            table,
            transform,
            plans,
            shape,
        )  # shape: the head [Q, top_n]
        self.batch_size, self.num_workers = batch_size, num_workers
        sizes = [-(-len(p.cells) // batch_size) for p in plans]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # first batch of each plan
        self._decoded: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        plan, s = self.plans[k], (i - int(self.starts[k])) * self.batch_size
        images = self._images(k)
        first, second = (torch.from_numpy(a[s : s + self.batch_size]) for a in (plan.first, plan.second))
        return images[first], images[second], torch.from_numpy(plan.cells[s : s + self.batch_size])

    def _images(self, k: int) -> torch.Tensor:
        """Plan k's decoded images."""
        if self._decoded is None or self._decoded[0] != k:
            self._decoded = None  # free the previous plan's images first
            self._decoded = (
                k,
                decode_rows(self.table, self.plans[k].rows, self.transform, self.batch_size, self.num_workers),
            )
        return self._decoded[1]


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 (else fp16) autocast on CUDA when enabled; nothing on other devices (CPU runs in float32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


def score_pairs(
    model: PairwiseModel, batches: PairBatches, device: torch.device, amp: bool = True, progress: bool = True
) -> np.ndarray:
    """Pairwise distances of the head [Q, top_n] (inf where a slot is empty), batch by batch with a progress bar."""
    out = np.full(batches.shape, np.inf, dtype=np.float32).reshape(-1)
    bar = tqdm(
        batches, total=len(batches), desc="pairwise re-ranking", unit="batch", disable=None if progress else True
    )
    with torch.inference_mode(), autocast(device, amp):
        for x1, x2, cells in bar:
            out[cells.numpy()] = model.distance(x1.to(device), x2.to(device)).float().cpu().numpy()
    return out.reshape(batches.shape)


def merge_top_n(results: RetrievalResults, head_distances: np.ndarray) -> RetrievalResults:
    """Sort each row's first n = head_distances.shape[1] items by the new distances, keep the rest, rescale (module
    doc)."""
    n = head_distances.shape[1]
    head = results.indices[:, :n]
    new = np.where(head == PAD, np.inf, head_distances).astype(np.float32)
    order = np.argsort(new, axis=1, kind="stable")
    indices, new = np.take_along_axis(head, order, 1), np.take_along_axis(new, order, 1)
    if results.k > n:
        new = _below_next(new, np.where(results.indices[:, n] != PAD, results.distances[:, n], np.inf))
    distances = np.concatenate([new, results.distances[:, n:]], axis=1)
    return RetrievalResults(
        np.concatenate([indices, results.indices[:, n:]], 1),
        distances,
        results.query_ids,
        results.gallery_ids,
        dict(results.meta),
    )


def _below_next(new: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Sorted new head distances [Q, n] moved below each row's next original distance nxt [Q] where they exceed it:
    their largest becomes m = t - gap |t| (at least one float32 step below t), by scaling d * m / max(d) when t > 0
    and by shifting d - (max(d) - m) otherwise."""
    finite = np.isfinite(new)
    top = np.where(finite, new, -np.inf).max(axis=1)
    need = np.isfinite(top) & (top > nxt)
    t = np.where(need, nxt, 1.0).astype(np.float32)
    m = np.minimum(t - MERGE_GAP * np.abs(t), np.nextafter(t, np.float32(-np.inf)))
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = new * (m / np.where(need, top, 1.0))[:, None]
    moved = np.where((t > 0)[:, None], scaled, new - (top - m)[:, None])
    moved = np.minimum(moved, m[:, None])  # float32 rounding never lifts a moved distance above m
    return np.where(need[:, None] & finite, moved, new).astype(np.float32)
