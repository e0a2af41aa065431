"""ICFRR: Iterative Cluster-free Re-ranking (Hudson & Smith), with the reference implementation's semantics, at scale.

What the reference code does (src/rerank.py of finlay-hudson/ICFRR), and so what this module does:
similarities are negated distances; each query's list is sorted once, and the p-th best original similarity
stays the base score of whatever item sits at position p. Each iteration the current top-KQ items vote: for
gallery item b, delta(b) = mean over the voters j of w(rank of b in the gallery-gallery list of j), with
w(r) = 1 - r/(G-1) for r < KG and 0 otherwise (the float32 values of linspace(1, 0, G), as the reference builds
them); the first item of j's ascending list (j itself) has rank -1 and weight 0, its nearest other item rank 0.
The score at position p becomes base(p) + beta * delta(item at p); the list is re-sorted; repeat n_times.
The mean is over min(KQ, K) voters, K the length of the incoming list (the reference: min(KQ, G), its lists
being whole), and w uses G = the gallery size whatever K is.

Pinned choices where the reference leaves the outcome to torch's unstable sort: the first sort orders ties by
gallery position, every re-sort is stable (tied scores keep their current order), and a dense gallery-gallery
row is ranked by a stable sort. delta is summed in float64 from the float32 weights: the sum is exact, so neither
the summation order nor the chunking can change a ranking.

Distances (`distance`): the reference adds its votes to torch.cdist distances, Euclidean between the features. So
by default (`euclidean`) the incoming list is re-scored with the Euclidean distances of its items computed from the
embeddings and re-sorted (ties by gallery position), and the gallery-gallery lists are Euclidean too: the chain on
embeddings ranks as the reference does on a cache of the same embeddings. `cosine` does the same with cosine
distances; `search` keeps the incoming list's own distances and order (e.g. after another re-ranker) and ranks the
gallery by the search metric.

At scale: the gallery-gallery lists are the top-KG neighbours of every gallery item (exact k-NN, never a dense
G x G matrix unless the caller passes one), queries run in chunks, and only the top-M items of each incoming list
are re-scored (exact=True re-scores the whole list). Beyond the per-item state of the lists (output-sized,
Q x M) the memory is O(G * KG + chunk * M): the rank lists, one chunk's temporaries and small scatter buffers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lookalike.atomic import atomic_path
from lookalike.embeddings import Embeddings
from lookalike.errors import LookalikeError
from lookalike.metrics import compute_metrics, relevance
from lookalike.rerank.base import RerankContext, Reranker, positive_int, register
from lookalike.rows import pack_rows, sort_by_value
from lookalike.search.exact import exact_knn, order_by_distance
from lookalike.search.results import PAD, RetrievalResults
from lookalike.viz import save_figure, save_result_grid

GALLERY_KNN_KEY = "gallery_knn"  # context.cache: {vectors, metric, indices [G, k], distances [G, k]} from gallery_knn
DENSE_RANKS_KEY = "icfrr_dense_ranks"  # context.cache: rank lists taken from context.gallery_distances
CACHE_FILES = {"qg": "qg_dists.pth", "gg": "gg_dists.pth", "labels": "labels.pth"}
SCATTER_ELEMENTS = 1 << 21  # votes scattered per step (voters x KG per query): bounds the temporaries
ACCUMULATOR_BYTES = 1 << 21  # float64 vote accumulator per step, small enough to stay in cache
KNN_BLOCK_ELEMENTS = 1 << 24  # gallery-gallery search: its score buffer stays <= 64 MiB
DISTANCES = ("euclidean", "cosine", "search")  # the base distances: recomputed from the embeddings, or the list's own
PAIR_BLOCK_ELEMENTS = 1 << 24  # pair_distances: gathered gallery vectors per block (64 MiB of float32)
CURVES = (
    ("map@all", "mAP@all"),
    ("map@200", "mAP@200"),
    ("prec@100", "P@100"),
    ("prec@200", "P@200"),
)  # the reference's four
RANKS_DIR, RANKS_FILE, RANKINGS_NPZ = (
    "ranks",
    "reranking_iter_{}.pth",
    "rankings.npz",
)  # the reference's ranks/ layout, + one npz
VIS_DIR, VIS_FILE = "vis", "reranking_iter_{}.png"
ICFRR_DATASETS = {
    "sketchy_zs1": ("sketchy", "zeroshot1"),
    "sketchy_zs2": ("sketchy", "zeroshot2"),
    "tuberlin": ("tu-berlin", "zeroshot"),
}


@register
class ICFRR(Reranker):
    """Iterative cluster-free re-ranking: the top-KQ of each list vote through their gallery-gallery top-KG lists."""

    name = "icfrr"

    def __init__(
        self,
        kg: int = 256,
        kq: int = 250,
        beta: float = 0.5,
        n_times: int = 5,
        candidates: int = 2000,
        exact: bool = False,
        chunk: int = 1024,
        distance: str = "euclidean",
    ) -> None:
        self.kg, self.kq, self.chunk = (
            positive_int(v, n, self.name) for v, n in ((kg, "kg"), (kq, "kq"), (chunk, "chunk"))
        )
        self.candidates = positive_int(candidates, "candidates", self.name)
        if self.candidates < self.kq and not exact:
            raise LookalikeError(
                f"rerank icfrr: candidates must be >= kq ({self.kq}), got {candidates} (or exact=True)"
            )
        if isinstance(n_times, bool) or not isinstance(n_times, (int, np.integer)) or n_times < 0:
            raise LookalikeError(f"rerank icfrr: n_times must be an integer >= 0, got {n_times!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating)) or not 0 <= beta < np.inf:
            raise LookalikeError(f"rerank icfrr: beta must be a finite number >= 0, got {beta!r}")
        if distance not in DISTANCES:
            raise LookalikeError(f"rerank icfrr: distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        self.beta, self.n_times, self.exact, self.distance = float(beta), int(n_times), bool(exact), distance

    def params(self) -> dict[str, Any]:
        """The parameters, as recorded in the results' meta."""
        return {
            "kg": self.kg,
            "kq": self.kq,
            "beta": self.beta,
            "n_times": self.n_times,
            "candidates": self.candidates,
            "exact": self.exact,
            "distance": self.distance,
        }

    def rerank(self, results: RetrievalResults, context: RerankContext) -> RetrievalResults:
        """The results after n_times iterations: rows re-sorted by the new score, distances = -score."""
        run = self._start(results, context)
        for _ in range(self.n_times):
            run.step()
        return run.results(self.n_times)

    def iterations(self, results: RetrievalResults, context: RerankContext) -> Iterator[RetrievalResults]:
        """The results after iteration 1, 2, ..., n_times (for metrics per iteration)."""
        run = self._start(results, context)
        for i in range(1, self.n_times + 1):
            run.step()
            yield run.results(i)

    def _start(self, results: RetrievalResults, context: RerankContext) -> _Run:
        """Neighbour lists (cached in the context) and the sorted candidate lists, ready to iterate."""
        n_gallery = len(results.gallery_ids)
        if self.distance != "search":
            results = rescore(results, context, self.distance)
        metric = context.metric if self.distance == "search" else self.distance
        neighbours, source = rank_lists(results, context, self.kg, self.chunk, metric)
        m = results.k if self.exact else min(self.candidates, results.k)
        meta = {"name": self.name, **self.params(), "m": m, "neighbours": source}
        return _Run(
            results,
            neighbours,
            icfrr_weights(n_gallery, neighbours.shape[1]),
            min(self.kq, results.k),
            m,
            self.beta,
            self.chunk,
            meta,
        )


def icfrr_iterations(results: RetrievalResults, context: RerankContext, **params: Any) -> Iterator[RetrievalResults]:
    """The results after each ICFRR iteration; params as for ICFRR (kg, kq, beta, n_times, candidates, exact, chunk,
    distance)."""
    return ICFRR(**params).iterations(results, context)


def icfrr_weights(n_gallery: int, kg: int) -> np.ndarray:
    """w(r) for ranks r = 0..kg-1: 1 - r/(G-1) as the float32 linspace(1, 0, G) of the reference, in float64."""
    return torch.linspace(1.0, 0.0, n_gallery, dtype=torch.float32)[:kg].double().numpy()


# ---------------------------------------------------------------- base distances


def rescore(results: RetrievalResults, context: RerankContext, metric: str) -> RetrievalResults:
    """The list's items with their `metric` distances from the context's embeddings, re-sorted stably (ties by
    gallery position): the reference's base, torch.cdist distances sorted, whatever metric the search used."""
    if context.queries is None or context.gallery is None:
        raise LookalikeError(
            f"rerank icfrr: distance={metric} needs the query and gallery embeddings; "
            "give distance=search to use the list's own distances"
        )
    for name, emb, n in (
        ("query", context.queries, results.n_queries),
        ("gallery", context.gallery, len(results.gallery_ids)),
    ):
        if len(emb) != n:
            raise LookalikeError(f"rerank icfrr: {len(emb)} {name} embeddings for results over {n} {name} items")
    distances = pair_distances(context.queries.vectors, context.gallery.vectors, results.indices, metric)
    indices, distances = order_by_distance(results.indices, distances)
    return RetrievalResults(indices, distances, results.query_ids, results.gallery_ids, results.meta)


def pair_distances(queries: np.ndarray, gallery: np.ndarray, indices: np.ndarray, metric: str) -> np.ndarray:
    """Distances [Q, K] (float32) of each query to the gallery items its row lists (PAD: inf), by `metric`.

    Each pair on its own (a difference and a norm, or a dot product of unit vectors), so a pair's distance does not
    depend on which other pairs are computed with it: the dense [Q, G] matrix of a cache holds the same numbers.
    """
    if metric not in ("euclidean", "cosine"):
        raise LookalikeError(f"metric: expected euclidean or cosine, got {metric!r}")
    q, g = (
        torch.from_numpy(np.ascontiguousarray(queries, np.float32)),
        torch.from_numpy(np.ascontiguousarray(gallery, np.float32)),
    )
    if metric == "cosine":
        q, g = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    valid = indices != PAD
    items = torch.from_numpy(np.where(valid, indices, 0))
    out = torch.empty(indices.shape, dtype=torch.float32)
    rows = max(1, PAIR_BLOCK_ELEMENTS // max(1, indices.shape[1] * q.shape[1]))
    with torch.inference_mode():
        for s in range(0, len(q), rows):
            vectors, query = g[items[s : s + rows]], q[s : s + rows, None]
            if metric == "euclidean":
                out[s : s + rows] = torch.linalg.vector_norm(vectors - query, dim=2)
            else:
                out[s : s + rows] = 1.0 - (vectors * query).sum(2)
    return np.where(valid, out.numpy(), np.float32(np.inf))


# ---------------------------------------------------------------- gallery-gallery rank lists


def rank_lists(
    results: RetrievalResults, context: RerankContext, kg: int, chunk: int = 1024, metric: str | None = None
) -> tuple[np.ndarray, str]:
    """Each gallery item's top-KG other items in rank order [G, min(KG, G-1)], and where they came from.

    From context.gallery_distances when given (ranked like the reference), else from the gallery embeddings
    by exact k-NN by `metric` (default: context.metric); either way cached in context.cache so later stages
    and calls reuse them.
    """
    metric = metric or context.metric
    n_gallery = len(results.gallery_ids)
    k = min(kg, max(n_gallery - 1, 0))
    if context.gallery_distances is not None:
        dense = _as_numpy(context.gallery_distances)
        if dense.shape != (n_gallery, n_gallery):
            expected = f"[G, G] = [{n_gallery}, {n_gallery}]"
            raise LookalikeError(f"rerank icfrr: gallery_distances must be {expected}, got {list(dense.shape)}")
        cached = context.cache.get(DENSE_RANKS_KEY)
        if cached is None or cached["matrix"] is not context.gallery_distances or cached["indices"].shape[1] < k:
            cached = {"matrix": context.gallery_distances, "indices": neighbours_from_distances(dense, k, chunk)}
            context.cache[DENSE_RANKS_KEY] = cached
        return cached["indices"][:, :k], "distances"
    context.require("gallery", by="icfrr")
    if len(context.gallery) != n_gallery:
        raise LookalikeError(
            f"rerank icfrr: {len(context.gallery)} gallery embeddings for results over {n_gallery} gallery items"
        )
    cached = context.cache.get(GALLERY_KNN_KEY)
    fresh = (
        isinstance(cached, dict) and cached.get("vectors") is context.gallery.vectors and cached.get("metric") == metric
    )
    if not (fresh and cached["indices"].shape[1] >= k):
        idx, dist = gallery_knn(context.gallery.vectors, k, metric, chunk)
        cached = {"vectors": context.gallery.vectors, "metric": metric, "indices": idx, "distances": dist}
        context.cache[GALLERY_KNN_KEY] = cached
    return cached["indices"][:, :k], "embeddings"


def gallery_knn(
    gallery: np.ndarray, k: int, metric: str = "cosine", chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Every gallery item's k nearest other items [G, k] and their distances, equal distances in gallery order
    (exact_knn's order), as a stable sort of the dense row ranks them. One extra neighbour is fetched so that a tie
    of two items at the k-th place is broken the same way; with more items tied there (duplicated images), which of
    them make the list is left to the search, so such rows can differ from the dense reference's.
    """
    n = len(gallery)
    k = min(k, max(n - 1, 0))
    if k == 0:
        return np.empty((n, 0), np.int64), np.empty((n, 0), np.float32)
    own = np.arange(n)
    idx, dist = exact_knn(
        gallery, gallery, min(k + 1, n - 1), metric, exclude=(own, own), query_block=_knn_block(n, chunk)
    )
    return idx[:, :k], dist[:, :k]


def _knn_block(n_gallery: int, chunk: int) -> int:
    """Queries per block of a gallery-gallery search: exact_knn's score buffer, block x min(G, 16384), <= 64 MiB."""
    return max(chunk, min(n_gallery, KNN_BLOCK_ELEMENTS // max(min(n_gallery, 16384), 1)))


def neighbours_from_distances(distances: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Rank lists [G, k] from a dense [G, G] matrix as the reference ranks rows: a stable ascending sort,
    whose first item (the item itself, or an earlier item at the same distance) gets rank -1 and is dropped."""
    out = np.empty((len(distances), k), np.int64)
    for start in range(0, len(distances), chunk):
        rows = np.asarray(distances[start : start + chunk], dtype=np.float32)
        out[start : start + chunk] = np.argsort(rows, axis=1, kind="stable")[:, 1 : k + 1]
    return out


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy view of an array or a CPU copy of a tensor."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ---------------------------------------------------------------- the iterations


@dataclass
class _Chunk:
    """The state of one chunk of queries, each tensor [c, M] along the current order of the lists."""

    items: torch.Tensor  # gallery positions, PAD stored as the sink G
    base: torch.Tensor  # float64: the original distances, sorted: they stay with the positions
    key: torch.Tensor  # float64: the last step's -score per position before its sort (the base before any step)
    order: torch.Tensor | None  # that sort; the current distances are key[order], made only when results are read
    votes: torch.Tensor  # float64: the sum of w(rank) the item gets from the voters counted so far
    counted: torch.Tensor  # bool: the item's own list is among the counted voters


class _Run:
    """The live state of one ICFRR run over every query's top-M items, chunk by chunk.

    A step first brings each row's vote sums up to its current top-KQ (adding the lists of entering voters,
    subtracting those of voters that left: exact, as the sums are exact), then re-sorts the row. After the
    first step only the voters that changed cost anything. Scatters and permutations are torch's (both cores),
    the sort numpy's (its AVX-512 sort of int64 values; torch's CPU sort is several times slower).
    """

    def __init__(
        self,
        results: RetrievalResults,
        neighbours: np.ndarray,
        weights: np.ndarray,
        n_voters: int,
        m: int,
        beta: float,
        chunk: int,
        meta: dict,
    ) -> None:
        self.source, self.weights, self.n_voters, self.m = results, torch.from_numpy(weights), n_voters, m
        self.beta, self.meta = beta, meta
        self.n_gallery = len(results.gallery_ids)
        self.neighbours = torch.from_numpy(_with_sink(neighbours, self.n_gallery))
        self.chunks = [_start_chunk(results, slice(s, s + chunk), m) for s in range(0, results.n_queries, chunk)]

    def step(self) -> None:
        """One iteration: key = -score = base distance - beta * delta, sorted stably, for every chunk."""
        if self.m == 0:
            return
        for ch in self.chunks:
            self._recount(ch)
            ch.key = ch.base - self.beta * (ch.votes / self.n_voters)
            ch.order = torch.from_numpy(stable_order(ch.key.numpy()))
            ch.items, ch.votes, ch.counted = (a.gather(1, ch.order) for a in (ch.items, ch.votes, ch.counted))

    def _recount(self, ch: _Chunk) -> None:
        """Make the chunk's vote sums those of its current top-KQ: lists of entering voters +w, leaving ones -w."""
        should = torch.zeros(ch.counted.shape, dtype=torch.bool)
        should[:, : self.n_voters] = True
        rows, cols = (ch.counted != should).nonzero(as_tuple=True)
        if len(rows):
            signs = should[rows, cols].double() * 2 - 1
            self._scatter(ch, rows, ch.items[rows, cols], signs)
        ch.counted = should

    def _scatter(self, ch: _Chunk, voter_rows: torch.Tensor, voters: torch.Tensor, signs: torch.Tensor) -> None:
        """Add sign * w(rank) of each voter's list to the vote sums of its row's items, a few rows at a time.

        Each row's voters are packed (padded with the sink's list, sign 0) and rows taken in order of their
        voter count, so a block pads little; one scatter_add along the rows adds a block's lists into a
        [rows, G + 1] accumulator whose last column is the sink, and each row gathers its items' sums.
        """
        width, kg = self.n_gallery + 1, self.neighbours.shape[1]
        per_row = torch.bincount(voter_rows, minlength=len(ch.items))
        packed_voters, packed_signs = pack_rows(voter_rows, len(ch.items), (voters, self.n_gallery), (signs, 0.0))
        by_count = torch.argsort(per_row, descending=True, stable=True)[: int((per_row > 0).sum())]
        counts = per_row[by_count].tolist()
        first, max_rows = 0, max(1, ACCUMULATOR_BYTES // (8 * width))
        while first < len(counts):
            n_voters = counts[first]  # the most in this block: rows come by descending count
            n = min(max_rows, max(1, SCATTER_ELEMENTS // (n_voters * kg)), len(counts) - first)
            rows = by_count[first : first + n]
            targets = self.neighbours.index_select(0, packed_voters[rows, :n_voters].reshape(-1)).view(n, -1)
            weights = (packed_signs[rows, :n_voters, None] * self.weights).view(n, -1)
            sums = torch.zeros(n, width, dtype=torch.float64).scatter_add_(1, targets, weights)
            ch.votes[rows] += sums.gather(1, ch.items[rows])
            first += n

    def results(self, iteration: int) -> RetrievalResults:
        """The current state as RetrievalResults: the re-scored head, then the untouched tail of the list."""
        indices, distances = self.source.indices.copy(), self.source.distances.copy()
        if self.chunks:
            items = torch.cat([ch.items for ch in self.chunks]).numpy()
            indices[:, : self.m] = np.where(items == self.n_gallery, PAD, items)
            distances[:, : self.m] = torch.cat([_distances(ch) for ch in self.chunks]).numpy()
        meta = dict(self.source.meta)
        meta["rerank"] = [*meta.get("rerank", []), {**self.meta, "iteration": iteration}]
        return RetrievalResults(indices, distances, self.source.query_ids, self.source.gallery_ids, meta)


def _distances(ch: _Chunk) -> torch.Tensor:
    """A chunk's current distances (float32), along the current order of its lists."""
    return (ch.key if ch.order is None else ch.key.gather(1, ch.order)).float()


def stable_argsort(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise argsort in which equal keys keep their order, and the sorted keys."""
    order = stable_order(key)
    return order, torch.from_numpy(key).gather(1, torch.from_numpy(order)).numpy()


def stable_order(key: np.ndarray) -> np.ndarray:
    """Row-wise argsort in which equal keys keep their order.

    One sort of int64 values, the key rounded to float32 above (rounding never inverts an order) and the
    position below, so equal keys come out by position; then, if float64 keys are out of order within a run
    of equal float32 keys, each such run is put in (float64 key, position) order. The same result as
    kind="stable", 3x faster than numpy's argsort.
    """
    order, rough = sort_by_value(key, np.arange(key.shape[1]))
    r, j = _nonzero(rough[:, 1:] == rough[:, :-1])  # position j ties with j + 1 in float32
    if len(r) and (key[r, order[r, j]] > key[r, order[r, j + 1]]).any():  # float64 keys out of order in a tie
        tied = np.zeros(key.shape, bool)
        tied[r, j] = True
        member = np.zeros(key.shape, bool)
        member[r, j] = member[r, j + 1] = True
        mr, mj = _nonzero(member)  # row-major: each run of ties is contiguous here
        run = np.cumsum(~((mj > 0) & tied[mr, np.maximum(mj - 1, 0)]))
        positions = order[mr, mj]
        order[mr, mj] = positions[np.lexsort((positions, key[mr, positions], run))]
    return order


def _nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of the True entries of a 2-D mask, row-major (several times faster than np.nonzero)."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _start_chunk(results: RetrievalResults, rows: slice, m: int) -> _Chunk:
    """A chunk's first m items (PAD as the sink G) and distances, ties ordered by gallery position."""
    n_gallery = len(results.gallery_ids)
    idx, dist = (
        np.where(results.indices[rows, :m] == PAD, n_gallery, results.indices[rows, :m]),
        results.distances[rows, :m],
    )
    out_of_order = (dist[:, 1:] < dist[:, :-1]) | ((dist[:, 1:] == dist[:, :-1]) & (idx[:, 1:] < idx[:, :-1]))
    if out_of_order.any():  # exact search returns (distance, position) order already; anything else is sorted so
        idx, dist = order_by_distance(idx, np.asarray(dist, np.float32))
    base = np.array(dist, np.float32)
    items = torch.from_numpy(np.ascontiguousarray(idx))
    votes, counted = torch.zeros(items.shape, dtype=torch.float64), torch.zeros(items.shape, dtype=torch.bool)
    base = torch.from_numpy(base.astype(np.float64))
    return _Chunk(items, base, base, None, votes, counted)


def _with_sink(neighbours: np.ndarray, n_gallery: int) -> np.ndarray:
    """Rank lists [G + 1, k] with PAD mapped to the sink G, plus a sink row G (the list of a PAD voter)."""
    lists = np.full((n_gallery + 1, neighbours.shape[1]), n_gallery, np.int64)
    lists[:n_gallery] = neighbours
    lists[:n_gallery][neighbours == PAD] = n_gallery
    return lists


# ---------------------------------------------------------------- the reference's cache format


def load_icfrr_cache(folder: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """Read an ICFRR cache folder: qg_dists.pth [Q, G], gg_dists.pth [G, G], optional labels.pth {query, gallery}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LookalikeError(
            f"{folder}: no such ICFRR cache folder (expected {CACHE_FILES['qg']} and {CACHE_FILES['gg']} in it)"
        )
    qg = _load_matrix(folder / CACHE_FILES["qg"], "[Q, G]")
    gg = _load_matrix(folder / CACHE_FILES["gg"], "[G, G]")
    if gg.shape != (qg.shape[1], qg.shape[1]):
        expected = f"[G, G] = [{qg.shape[1]}, {qg.shape[1]}] to match {CACHE_FILES['qg']}"
        raise LookalikeError(f"{folder / CACHE_FILES['gg']}: expected {expected}, got {list(gg.shape)}")
    labels_path = folder / CACHE_FILES["labels"]
    labels = _load_labels(labels_path, qg.shape) if labels_path.exists() else None
    return qg, gg, labels


def _load(path: Path) -> Any:
    """torch.load with weights_only=True onto the CPU, with one-line errors."""
    if not path.is_file():
        holds = f"{CACHE_FILES['qg']}, {CACHE_FILES['gg']} and optionally {CACHE_FILES['labels']}"
        raise LookalikeError(f"{path}: missing (an ICFRR cache holds {holds})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing here
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise LookalikeError(f"{path}: not a torch file of tensors ({exc.__class__.__name__}: {first_line})") from None


def _load_matrix(path: Path, shape: str) -> torch.Tensor:
    """A 2-D floating-point distance tensor from a .pth file."""
    value = _load(path)
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point():
        got = (
            f"{value.dtype} tensor of shape {list(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise LookalikeError(f"{path}: expected a floating-point distance tensor {shape}, got {got}")
    return value.float()


def _load_labels(path: Path, qg_shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """{'query': LongTensor [Q], 'gallery': LongTensor [G]} from labels.pth."""
    value = _load(path)
    if not isinstance(value, dict) or not {"query", "gallery"} <= set(value):
        raise LookalikeError(f"{path}: expected a dict with 'query' and 'gallery' label tensors")
    for key, n in (("query", qg_shape[0]), ("gallery", qg_shape[1])):
        t = value[key]
        if not isinstance(t, torch.Tensor) or t.shape != (n,) or t.is_floating_point() or t.is_complex():
            got = f"shape {list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise LookalikeError(f"{path}: '{key}' must be an integer tensor of length {n}, got {got}")
    return {"query": value["query"].long(), "gallery": value["gallery"].long()}


def save_icfrr_cache(
    folder: str | os.PathLike,
    qg: Embeddings | RetrievalResults | np.ndarray | torch.Tensor,
    gg: Embeddings | np.ndarray | torch.Tensor,
    labels: dict[str, Sequence] | None = None,
    metric: str = "euclidean",
) -> Path:
    """Write qg_dists.pth, gg_dists.pth (and labels.pth, else remove a stale one) atomically in the reference's format.

    qg: the query embeddings (distances by `metric` to the gallery embeddings gg, each pair as the icfrr re-ranker
    computes it), results that list the whole gallery (K = G), or a [Q, G] matrix; gg: the gallery embeddings
    (distances by `metric`) or a [G, G] matrix; labels: {'query': [Q], 'gallery': [G]} ints or strings (coded
    together). The default metric is the reference's: torch.cdist, Euclidean.
    """
    folder = Path(folder)
    qg_t = torch.from_numpy(_query_matrix(qg, gg, metric))
    n_gallery = qg_t.shape[1]
    gg_t = torch.from_numpy(dense_gallery_distances(gg, metric) if isinstance(gg, Embeddings) else _matrix(gg, "gg"))
    if gg_t.shape != (n_gallery, n_gallery):
        raise LookalikeError(f"gg: expected [G, G] = [{n_gallery}, {n_gallery}] to match qg, got {list(gg_t.shape)}")
    coded = _label_tensors(labels, qg_t.shape) if labels is not None else None
    _save_tensor(qg_t, folder / CACHE_FILES["qg"])
    _save_tensor(gg_t, folder / CACHE_FILES["gg"])
    if coded is None:
        (folder / CACHE_FILES["labels"]).unlink(missing_ok=True)
    else:
        _save_tensor(coded, folder / CACHE_FILES["labels"])
    return folder


def _query_matrix(qg: Embeddings | RetrievalResults | np.ndarray | torch.Tensor, gg: Any, metric: str) -> np.ndarray:
    """The dense [Q, G] query-gallery distances of save_icfrr_cache's qg."""
    if isinstance(qg, RetrievalResults):
        return dense_query_distances(qg)
    if not isinstance(qg, Embeddings):
        return _matrix(qg, "qg")
    if not isinstance(gg, Embeddings):
        raise LookalikeError("qg: query embeddings need the gallery embeddings as gg (not a matrix)")
    return pair_distances(qg.vectors, gg.vectors, np.broadcast_to(np.arange(len(gg)), (len(qg), len(gg))), metric)


def _matrix(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """A 2-D float32 numpy copy of a distance matrix."""
    array = _as_numpy(x)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise LookalikeError(
            f"{name}: expected a 2-D numeric distance matrix, got shape {list(array.shape)} {array.dtype}"
        )
    return np.array(array, dtype=np.float32)


def dense_query_distances(results: RetrievalResults) -> np.ndarray:
    """The [Q, G] query-gallery distances of results that list the whole gallery; excluded items get inf."""
    n_gallery = len(results.gallery_ids)
    if results.k < n_gallery:
        raise LookalikeError(
            f"qg: results must list the whole gallery (K = G = {n_gallery}), got K = {results.k}; search with k = G"
        )
    out = np.full((results.n_queries, n_gallery), np.inf, np.float32)
    rows = np.broadcast_to(np.arange(results.n_queries)[:, None], results.indices.shape)
    valid = results.valid
    out[rows[valid], results.indices[valid]] = results.distances[valid]
    return out


def dense_gallery_distances(gallery: Embeddings, metric: str = "cosine", chunk: int = 1024) -> np.ndarray:
    """The [G, G] gallery-gallery distances (self included) by exact search, blocked as gallery_knn blocks them
    (so both see bitwise-equal distances)."""
    n = len(gallery)
    idx, dist = exact_knn(gallery.vectors, gallery.vectors, n, metric, query_block=_knn_block(n, chunk))
    out = np.empty((n, n), np.float32)
    np.put_along_axis(out, idx, dist, 1)
    return out


def _label_tensors(labels: dict[str, Sequence], shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Query and gallery labels as LongTensors; non-integer labels get shared integer codes."""
    if not isinstance(labels, dict) or not {"query", "gallery"} <= set(labels):
        raise LookalikeError("labels: expected a dict with 'query' and 'gallery' label arrays")
    q, g = (
        np.asarray(_as_numpy(labels[k]) if isinstance(labels[k], torch.Tensor) else labels[k])
        for k in ("query", "gallery")
    )
    if q.shape != (shape[0],) or g.shape != (shape[1],):
        got = f"got shapes {list(q.shape)} and {list(g.shape)}"
        raise LookalikeError(f"labels: expected {shape[0]} query and {shape[1]} gallery labels, {got}")
    if not (np.issubdtype(q.dtype, np.integer) and np.issubdtype(g.dtype, np.integer)):
        _, codes = np.unique(np.concatenate([q.astype(str), g.astype(str)]), return_inverse=True)
        q, g = codes[: len(q)], codes[len(q) :]
    return {"query": torch.from_numpy(q.astype(np.int64)), "gallery": torch.from_numpy(g.astype(np.int64))}


def _save_tensor(value: Any, path: Path) -> None:
    """torch.save atomically."""
    with atomic_path(path, suffix=".pth") as tmp:
        torch.save(value, tmp)


def results_from_distances(
    distances: np.ndarray | torch.Tensor,
    query_ids: Sequence | None = None,
    gallery_ids: Sequence | None = None,
    chunk: int = 1024,
) -> RetrievalResults:
    """Results listing the whole gallery from a [Q, G] distance matrix, sorted stably (ties by gallery position)."""
    dense = _matrix(distances, "qg")
    n_q, n_g = dense.shape
    indices = np.empty(dense.shape, np.int64)
    for start in range(0, n_q, chunk):
        indices[start : start + chunk] = np.argsort(dense[start : start + chunk], axis=1, kind="stable")
    q_ids = np.arange(n_q).astype(str) if query_ids is None else np.asarray(query_ids)
    g_ids = np.arange(n_g).astype(str) if gallery_ids is None else np.asarray(gallery_ids)
    if len(q_ids) != n_q or len(g_ids) != n_g:
        raise LookalikeError(f"ids: expected {n_q} query and {n_g} gallery ids, got {len(q_ids)} and {len(g_ids)}")
    return RetrievalResults(
        indices, np.take_along_axis(dense, indices, 1), q_ids, g_ids, {"source": "distances", "k": n_g}
    )


# ---------------------------------------------------------------- the reference's printout, plot and pictures


def icfrr_metrics(results: RetrievalResults, query_labels: np.ndarray, gallery_labels: np.ndarray) -> dict[str, float]:
    """The reference's printout: mAP@all, mAP@200 and prec@25/100/200, means over all queries.

    As the reference computes them: AP@k divides by the relevant items found in the top k (OML's mAP@k);
    prec@k = relevant in the top k / k (OML's precision@k divides by min(k, relevant)); a query with no
    relevant item counts as 0 (OML leaves it out).
    """
    report = compute_metrics(results, query_labels, gallery_labels, cmc_k=(1,), precision_k=(1,), map_k=(200,))
    hits = np.cumsum(report.relevance, axis=1)
    out = {name: float(np.nan_to_num(report.per_query[name], nan=0.0).mean()) for name in ("map@all", "map@200")}
    for k in (25, 100, 200):
        out[f"prec@{k}"] = float((hits[:, min(k, results.k) - 1] / k).mean())
    return out


def icfrr_cache_inputs(
    folder: str | os.PathLike, query_ids: Sequence | None = None, gallery_ids: Sequence | None = None
) -> tuple[RetrievalResults, RerankContext, dict[str, np.ndarray] | None]:
    """Results (K = G), a context holding the dense gallery distances, and labels (or None) from a cache folder.

    The ids default to row positions; give image paths (relative to an image root) to draw rank strips.
    """
    qg, gg, labels = load_icfrr_cache(folder)
    results = results_from_distances(qg, query_ids, gallery_ids)
    context = RerankContext(gallery_distances=gg.numpy())
    if labels is None or bool((labels["query"] == -1).all()):
        return results, context, None
    return results, context, {k: v.numpy() for k, v in labels.items()}


def run_icfrr_cache(
    folder: str | os.PathLike,
    kg: int = 256,
    kq: int = 250,
    beta: float = 0.5,
    n_times: int = 5,
    chunk: int = 1024,
    output: str | os.PathLike | None = None,
    strips: RankStrips | None = None,
) -> list[dict[str, float]]:
    """ICFRR on a reference cache folder, exactly (whole lists, the cache's distances): one record per iteration, 0 =
    before.

    Each record holds 'iteration' and, when the folder has labels, the icfrr_metrics of that iteration. With `output`,
    the ranking of every iteration is written as the reference writes it (output/ranks/reranking_iter_{i}.pth, a
    LongTensor [Q, G]) and all of them in output/rankings.npz (arrays reranking_iter_{i}, readable without torch);
    with `strips` too, output/vis/reranking_iter_{i}.png shows the chosen queries' top images after iteration i.
    """
    ids = (strips.query_ids, strips.gallery_ids) if strips is not None else (None, None)
    results, context, labels = icfrr_cache_inputs(folder, *ids)
    if strips is not None:
        strips.check(results.n_queries)
    reranker = ICFRR(kg=kg, kq=kq, beta=beta, n_times=n_times, exact=True, chunk=chunk, distance="search")
    records = []
    with RankingsWriter(output) if output is not None else contextlib.nullcontext() as writer:
        for i, current in enumerate(itertools.chain([results], reranker.iterations(results, context))):
            records.append(_record(i, current, labels))
            if writer is not None:
                writer.add(i, current.indices)
            if strips is not None and output is not None:
                strips.draw(current, Path(output) / VIS_DIR / VIS_FILE.format(i), labels)
    return records


@dataclass(frozen=True)
class RankStrips:
    """Which queries' rank strips to draw from a cache: their rows, how many gallery images, and the image files.

    query_ids / gallery_ids: the image of every cache row and column, relative to image_root (reference_image_ids).
    """

    image_root: Path
    query_ids: Sequence[str]
    gallery_ids: Sequence[str]
    queries: Sequence[int]
    top_k: int = 20

    def check(self, n_queries: int) -> None:
        """Fail with one line when a chosen query is not a row of the cache."""
        bad = [q for q in self.queries if not 0 <= q < n_queries]
        if bad:
            raise LookalikeError(
                f"--query-idxs-to-vis: query {bad[0]} is not a row of the cache (it has {n_queries} queries: "
                f"0..{n_queries - 1})"
            )
        if self.top_k < 1:
            raise LookalikeError(f"--num-gallery-ims-to-vis: expected a positive number of images, got {self.top_k}")

    def draw(self, results: RetrievalResults, path: Path, labels: dict[str, np.ndarray] | None) -> Path:
        """One PNG of the chosen queries after one iteration (green/red frames with labels, grey without)."""
        q, g = (labels["query"], labels["gallery"]) if labels is not None else (None, None)
        return save_rank_strips(results, path, self.image_root, q, g, list(self.queries), self.top_k)


class RankingsWriter:
    """Writes each iteration's ranking [Q, G] as it comes: ranks/reranking_iter_{i}.pth (torch, the reference's
    layout) and one member of rankings.npz (numpy's zip format, built member by member, renamed into place at the
    end)."""

    def __init__(self, output: str | os.PathLike) -> None:
        self.output = Path(output)
        self._atomic = atomic_path(self.output / RANKINGS_NPZ, suffix=".npz")
        self._zip: zipfile.ZipFile | None = None

    def __enter__(self) -> RankingsWriter:
        self._zip = zipfile.ZipFile(self._atomic.__enter__(), "w", allowZip64=True)
        return self

    def add(self, iteration: int, ranking: np.ndarray) -> None:
        """Write one iteration's ranking (gallery positions, best first) to both files."""
        ranking = np.ascontiguousarray(ranking, dtype=np.int64)
        _save_tensor(torch.from_numpy(ranking), self.output / RANKS_DIR / RANKS_FILE.format(iteration))
        with self._zip.open(f"reranking_iter_{iteration}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, ranking, allow_pickle=False)

    def __exit__(self, *exc: object) -> None:
        self._zip.close()
        self._atomic.__exit__(*exc)


def reference_image_ids(
    image_root: str | os.PathLike, n_queries: int, n_gallery: int, dataset: str | None = None, per_class: int = -1
) -> tuple[list[str], list[str]]:
    """The image of every cache row and column, relative to image_root, numbered as the reference numbers them.

    custom (or no dataset): image_root/query/ and image_root/gallery/. The reference numbers their files in the order
    its folder listing returns them, which differs between machines; labels.json (written with the cache) keeps that
    order, so its keys are used when present, else sorted names. sketchy_zs1, sketchy_zs2, tuberlin: image_root is
    the dataset folder (Sketchy/, TUBerlin/) and the rows are its zero-shot lists' sketches and photos, in list order,
    with per_class > 0 the first per_class of each class number, class by class, as the reference takes them.
    """
    root = Path(image_root)
    if dataset is not None and dataset != "custom":
        return _listed_image_ids(root, dataset, per_class, (n_queries, n_gallery))
    order = _labels_json_order(root / "labels.json")
    ids = []
    for split, n in (("query", n_queries), ("gallery", n_gallery)):
        folder = root / split
        if not folder.is_dir():
            raise LookalikeError(
                f"{folder}: no such folder (an image root holds query/ and gallery/, as the reference's custom dataset)"
            )
        names = order.get(split) or sorted(
            p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
        )
        if len(names) != n:
            raise LookalikeError(f"{folder}: {len(names)} images for the cache's {n} {split} items")
        ids.append([f"{split}/{name}" for name in names])
    return ids[0], ids[1]


def _listed_image_ids(root: Path, dataset: str, per_class: int, sizes: tuple[int, int]) -> tuple[list[str], list[str]]:
    """Query (sketch) and gallery (photo) paths from a sketch dataset's zero-shot file lists, as the reference reads
    them."""
    from lookalike.data.convert.sketch import FILE_LISTS, read_file_list  # here: the converters import scipy

    if dataset not in ICFRR_DATASETS:
        raise LookalikeError(f"--dataset: expected one of custom, {', '.join(ICFRR_DATASETS)}, got {dataset!r}")
    name, split_folder = ICFRR_DATASETS[dataset]
    ids = []
    for (domain, prefix), n in zip(FILE_LISTS[name].items(), sizes):
        path = root / split_folder / f"{prefix}_filelist_zero.txt"
        if not path.is_file():
            raise LookalikeError(
                f"{path}: missing (the {domain} images of {dataset}'s zero-shot split; --image-root is the dataset "
                "folder)"
            )
        rows = read_file_list(path)
        if per_class > 0:
            numbers = rows["number"].to_numpy()
            rows = rows.iloc[np.concatenate([np.flatnonzero(numbers == c)[:per_class] for c in np.unique(numbers)])]
        if len(rows) != n:
            raise LookalikeError(
                f"{path}: {len(rows)} images for the cache's {n} {'query' if domain == 'sketch' else 'gallery'} items"
            )
        ids.append(rows["path"].tolist())
    return ids[0], ids[1]


def _labels_json_order(path: Path) -> dict[str, list[str]]:
    """The file names of labels.json's 'query' and 'gallery' objects in their order ({} without the file)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LookalikeError(f"{path}: not a readable JSON file ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k, {}), dict) for k in ("query", "gallery")):
        raise LookalikeError(f"{path}: expected {{'query': {{file: label}}, 'gallery': {{file: label}}}}")
    return {k: list(data[k]) for k in ("query", "gallery") if k in data}


def cache_folder(cache_root: str | os.PathLike, dataset: str, per_class: int = -1) -> Path:
    """The reference's cache folder for a dataset: cache_root/dataset/per_class (e.g. cache/tuberlin/-1)."""
    return Path(cache_root) / dataset / str(per_class)


def _record(iteration: int, results: RetrievalResults, labels: dict[str, np.ndarray] | None) -> dict[str, float]:
    """One row of the per-iteration table."""
    metrics = icfrr_metrics(results, labels["query"], labels["gallery"]) if labels is not None else {}
    return {"iteration": iteration, **metrics}


def plot_icfrr_curve(records: Sequence[dict[str, float]], path: str | os.PathLike) -> Path:
    """Write a PNG of mAP@all, mAP@200, P@100 and P@200 against the iteration (the reference's four curves)."""
    if not records or any(key not in records[0] for key, _ in CURVES):
        keys = ", ".join(k for k, _ in CURVES)
        raise LookalikeError(f"records: expected per-iteration records with {keys} (run_icfrr_cache with labels)")
    x = [r["iteration"] for r in records]
    fig = Figure(figsize=(5, 3.6), dpi=100)
    ax = fig.subplots()
    for (key, label), marker in zip(CURVES, "ooss"):
        ax.plot(x, [r[key] for r in records], marker=marker if len(x) <= 30 else None, label=label)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.set_title("ICFRR re-ranking")
    fig.tight_layout()
    return save_figure(fig, path)


def save_rank_strips(
    results: RetrievalResults,
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    query_labels: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    queries: Sequence[int] | None = None,
    top_k: int = 10,
) -> Path:
    """Write a PNG: for each chosen query its image then its top-k, framed green/red when labels are given.

    Image paths are image_root / the results' ids (give results_from_distances the file names for a cache).
    """
    labels = (query_labels, gallery_labels) if query_labels is not None and gallery_labels is not None else None
    rel = relevance(results, *labels) if labels is not None else None
    return save_result_grid(results, path, image_root, relevance=rel, queries=queries, top_k=top_k, labels=labels)
