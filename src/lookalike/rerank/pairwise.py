"""STIR re-ranking: a pairwise model re-scores each query's top_n candidates from the images themselves.

The Q x top_n (query, candidate) pairs are scored in batches. Images are decoded and transformed once per
distinct image (queries are not decoded again for each of their candidates): the queries are split into
chunks whose distinct images fit in `cache_mb`, and a chunk's images are decoded once into one tensor that
the pair batches index. With the default budget a dataset of a few thousand images is one chunk, so every
image is decoded exactly once.

Merge rule: `merge_head` (rerank/base.py), Open Metric Learning's PairwiseReranker rule, so the new rankings are
the same as OML's: each row's top_n sorted by the new distance, the rest in place, the head moved below the next
original distance where it would pass it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lookalike.core.results import PAD, RetrievalResults
from lookalike.core.table import DatasetTable
from lookalike.data.images import ImageDataset
from lookalike.devices import resolve_device
from lookalike.models.pairwise import PairwiseModel, load_pairwise
from lookalike.rerank.base import RerankContext, Reranker, merge_head, positive_int, register


@register
class PairwiseReranker(Reranker):
    """Re-scores the top_n items of every list with a pairwise model (a checkpoint path or a PairwiseModel)."""

    name = "pairwise"
    needs_vectors = False  # scores the images of the list's pairs
    needs_images = True
    needs_model = True

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

    @property
    def head(self) -> int:
        """The top_n items of each list it re-scores."""
        return self.top_n

    def params(self) -> dict[str, Any]:
        """What meta records: top_n, the model's timm name and whether it averages both orders (tta)."""
        return {"top_n": self.top_n, "model": self.model.spec.name, "tta": self.model.spec.tta}

    def load(self) -> None:
        """Load and check the weights now (not at the first list)."""
        self.model  # noqa: B018 -- loads the weights

    def rerank(self, results: RetrievalResults, context: RerankContext) -> RetrievalResults:
        """New results: each row's top_n sorted by the pairwise distance, the rest in place (`merge_head`)."""
        context.require("table", by=self.name)
        batches = self.pair_batches(results, context.table)
        model, training = self.model.to(self.device), self.model.training
        try:
            head = score_pairs(model.eval(), batches, self.device, self.amp, self.progress)
        finally:
            model.train(training)
        return self.recorded(merge_head(results, head), top_n=head.shape[1])

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
