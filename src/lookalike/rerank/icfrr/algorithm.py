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

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lookalike.core.errors import LookalikeError
from lookalike.core.results import PAD, RetrievalResults, check_metric
from lookalike.rerank.auto import AUTO, given_or, icfrr_beta, icfrr_k, is_auto, resolve, skipped
from lookalike.rerank.base import RerankContext, Reranker, merge_head, positive_int, register
from lookalike.rows import pack_rows, sort_by_value
from lookalike.search.exact import exact_knn, order_by_distance

GALLERY_KNN_KEY = "gallery_knn"  # context.cache: {vectors, metric, indices [G, k], distances [G, k]} from gallery_knn
DENSE_RANKS_KEY = "icfrr_dense_ranks"  # context.cache: rank lists taken from context.gallery_distances
SCATTER_ELEMENTS = 1 << 21  # votes scattered per step (voters x KG per query): bounds the temporaries
ACCUMULATOR_BYTES = 1 << 21  # float64 vote accumulator per step, small enough to stay in cache
KNN_BLOCK_ELEMENTS = 1 << 24  # gallery-gallery search: its score buffer stays <= 64 MiB
DISTANCES = ("euclidean", "cosine", "search")  # the base distances: recomputed from the embeddings, or the list's own
PAIR_BLOCK_ELEMENTS = 1 << 24  # pair_distances: gathered gallery vectors per block (64 MiB of float32)


@register
class ICFRR(Reranker):
    """Iterative cluster-free re-ranking: the top-KQ of each list vote through their gallery-gallery top-KG lists."""

    name = "icfrr"

    def __init__(
        self,
        kg: int | str = AUTO,
        kq: int | str = AUTO,
        beta: float | str = AUTO,
        n_times: int = 5,
        candidates: int = 2000,
        exact: bool = False,
        chunk: int = 1024,
        distance: str = "euclidean",
    ) -> None:
        self.kg, self.kq = (v if is_auto(v) else positive_int(v, n, self.name) for v, n in ((kg, "kg"), (kq, "kq")))
        self.chunk = positive_int(chunk, "chunk", self.name)
        self.candidates = positive_int(candidates, "candidates", self.name)
        if not is_auto(self.kq) and self.candidates < self.kq and not exact:
            raise LookalikeError(
                f"rerank icfrr: candidates must be >= kq ({self.kq}), got {candidates} (or exact=True)"
            )
        if isinstance(n_times, bool) or not isinstance(n_times, (int, np.integer)) or n_times < 0:
            raise LookalikeError(f"rerank icfrr: n_times must be an integer >= 0, got {n_times!r}")
        if not is_auto(beta) and (
            isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating)) or not 0 <= beta < np.inf
        ):
            raise LookalikeError(f"rerank icfrr: beta must be a finite number >= 0 or auto, got {beta!r}")
        if distance not in DISTANCES:
            raise LookalikeError(f"rerank icfrr: distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        self.beta = beta if is_auto(beta) else float(beta)
        self.n_times, self.exact, self.distance = int(n_times), bool(exact), distance

    @property
    def head(self) -> int | None:
        """The candidates re-scored; None when the whole list is re-ordered (exact=True, or a Euclidean / cosine
        distance, by which the whole list is first re-sorted)."""
        return self.candidates if self.distance == "search" and not self.exact else None

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
        """The results after n_times iterations: rows re-sorted by the new score, distances = -score ("auto" KG, KQ
        and beta follow the gallery; a gallery no setting fits is returned unchanged, with a warning)."""
        run = self._start(results, context)
        if isinstance(run, str):
            return skipped(results, {"name": self.name, **self.params()}, run)
        for _ in range(self.n_times):
            run.step()
        return run.results(self.n_times)

    def iterations(self, results: RetrievalResults, context: RerankContext) -> Iterator[RetrievalResults]:
        """The results after iteration 1, 2, ..., n_times (for metrics per iteration)."""
        run = self._start(results, context)
        if isinstance(run, str):
            unchanged = skipped(
                results, {"name": self.name, **self.params()}, run
            )  # one warning, not one per iteration
            yield from [unchanged] * self.n_times
            return
        for i in range(1, self.n_times + 1):
            run.step()
            yield run.results(i)

    def _start(self, results: RetrievalResults, context: RerankContext) -> _Run | str:
        """Neighbour lists (cached in the context) and the sorted candidate lists, ready to iterate; or the reason
        why auto parameters fit no setting to this gallery."""
        n_gallery = len(results.gallery_ids)
        resolved = resolve(
            self, ("kg", "kq"), results, context, lambda shape: dict.fromkeys(("kg", "kq"), icfrr_k(shape))
        )
        if isinstance(resolved, str):
            return resolved
        kg, kq = given_or(self, "kg", resolved), given_or(self, "kq", resolved)
        if self.distance != "search":
            results = rescore(results, context, self.distance)
        if is_auto(self.beta):
            resolved["beta"] = icfrr_beta(results.distances, min(kq, results.k))
        beta = given_or(self, "beta", resolved)
        metric = context.metric if self.distance == "search" else self.distance
        neighbours, source = rank_lists(results, context, kg, self.chunk, metric)
        m = results.k if self.exact else min(self.candidates, results.k)
        m = max(m, min(kq, results.k))  # an auto KQ never has more voters than re-scored items
        meta = {"name": self.name, **self.params(), "m": m, "neighbours": source}
        if resolved:
            meta["resolved"] = resolved
        return _Run(
            results,
            neighbours,
            icfrr_weights(n_gallery, neighbours.shape[1]),
            min(kq, results.k),
            m,
            beta,
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
    check_metric(metric)
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
        dense = as_numpy(context.gallery_distances)
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
        gallery, gallery, min(k + 1, n - 1), metric, exclude=(own, own), query_block=knn_block(n, chunk)
    )
    return idx[:, :k], dist[:, :k]


def knn_block(n_gallery: int, chunk: int) -> int:
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


def as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
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
        source, indices = self.source, self.source.indices.copy()
        head = np.empty((source.n_queries, 0), np.float32)
        if self.chunks:
            items = torch.cat([ch.items for ch in self.chunks]).numpy()
            indices[:, : self.m] = np.where(items == self.n_gallery, PAD, items)
            head = torch.cat([_distances(ch) for ch in self.chunks]).numpy()
        ordered = RetrievalResults(indices, source.distances, source.query_ids, source.gallery_ids, dict(source.meta))
        merged = merge_head(ordered, head)  # the head is sorted and below the tail already: merging moves nothing
        merged.meta["rerank"] = [*merged.meta.get("rerank", []), {**self.meta, "iteration": iteration}]
        return merged


def _distances(ch: _Chunk) -> torch.Tensor:
    """A chunk's current distances (float32), along the current order of its lists."""
    return (ch.key if ch.order is None else ch.key.gather(1, ch.order)).float()


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
