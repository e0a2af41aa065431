"""Query expansion: average QE and alpha-QE (Radenović et al.), and database-side augmentation (DBA).

A vector is replaced by the weighted mean of itself (weight 1) and its top-n neighbours x_i, weights
max(cos(v, x_i), 0)^alpha: alpha = 0 is average QE, alpha > 0 is alpha-QE. With metric "cosine" the vectors
are L2-normalised before and after averaging; with "euclidean" the plain weighted mean is used (no
re-normalisation, so the distances keep the embeddings' scale).

Searching again: with `candidates=None` the whole gallery is searched with `exact_knn` (items outside the
incoming list may enter; the list keeps its length K); with `candidates=M` only the first M items of each
incoming list are re-scored and re-sorted, the rest follow in their old order. Exclusion groups
(context.exclude) are applied to the incoming list before its top-n are taken, and to the new search.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lookalike.core.errors import LookalikeError
from lookalike.core.results import PAD, RetrievalResults
from lookalike.rerank.auto import AUTO, expansion_n, given_or, is_auto, resolve, skipped
from lookalike.rerank.base import (
    RerankContext,
    Reranker,
    context_vectors,
    drop_excluded,
    merge_head,
    pair_sqdist,
    positive_int,
    register,
)
from lookalike.search.exact import exact_knn

DBA_CACHE_KEY = "dba_gallery"  # (gallery ids, augmented gallery vectors) left by DatabaseAugmentation for later stages


class _Expansion(Reranker):
    """Parameters and the re-search shared by QE and DBA."""

    uses_augmented_gallery = False  # QE searches the gallery a DBA stage left in the context

    def __init__(
        self, n: int | str = AUTO, alpha: float = 0.0, candidates: int | None = None, chunk: int = 16384
    ) -> None:
        self.n = n if is_auto(n) else positive_int(n, "n", self.name)
        self.candidates = None if candidates is None else positive_int(candidates, "candidates", self.name)
        self.chunk = positive_int(chunk, "chunk", self.name)
        if not float(alpha) >= 0.0:
            raise LookalikeError(f"rerank {self.name}: alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)

    def resolved_n(self, results: RetrievalResults, context: RerankContext) -> dict[str, Any] | str:
        """{} for an explicit n; {"n": value, "gallery": shape} for n="auto"; a reason when the gallery fits none."""
        context_vectors(results, context, self.name)
        return resolve(self, ("n",), results, context, lambda shape: {"n": expansion_n(shape)})

    def skip(self, results: RetrievalResults, reason: str) -> RetrievalResults:
        """The list unchanged, with a one-line warning why."""
        return skipped(results, {"name": self.name, **self.params()}, reason)

    def prepared(
        self, results: RetrievalResults, context: RerankContext
    ) -> tuple[np.ndarray, np.ndarray, RetrievalResults, bool]:
        """Query and gallery vectors (unit for cosine; gallery DBA-augmented when a DBA stage ran), results without
        excluded items."""
        queries, gallery = context_vectors(results, context, self.name)
        results = drop_excluded(results, context.exclude)
        if self.uses_augmented_gallery:
            gallery = _augmented_gallery(context, results, gallery)
        cosine = context.metric == "cosine"
        q, g = (unit(queries), unit(gallery)) if cosine else (queries, gallery)
        return q, g, results, cosine

    def search_again(
        self,
        queries: np.ndarray,
        gallery: np.ndarray,
        results: RetrievalResults,
        context: RerankContext,
        resolved: dict[str, Any],
    ) -> RetrievalResults:
        """Whole-gallery exact search (candidates=None) or a re-score of each list's first `candidates` items."""
        extra = {"resolved": resolved} if resolved else {}
        if self.candidates is None:
            idx, dist = exact_knn(queries, gallery, results.k, context.metric, exclude=context.exclude)
            searched = RetrievalResults(idx, dist, results.query_ids, results.gallery_ids, dict(results.meta))
            return self.recorded(searched, **extra)
        head = results.indices[:, : self.candidates]
        distances = head_distances(queries, gallery, head, context.metric, self.chunk)
        return self.recorded(merge_head(results, distances), **extra)

    @property
    def head(self) -> int | None:
        """The incoming candidates it re-scores (None: the whole gallery is searched again)."""
        return self.candidates


@register
class QueryExpansion(_Expansion):
    """Each query becomes the (alpha-)weighted mean of itself and its top-n gallery items; then searched again."""

    name = "qe"
    uses_augmented_gallery = True

    def rerank(self, results: RetrievalResults, context: RerankContext) -> RetrievalResults:
        """New results for the expanded queries (over the DBA-augmented gallery when a DBA stage ran before)."""
        resolved = self.resolved_n(results, context)
        if isinstance(resolved, str):
            return self.skip(results, resolved)
        q, g, results, cosine = self.prepared(results, context)
        n = given_or(self, "n", resolved)
        expanded = expand_vectors(q, g, results.indices[:, :n], self.alpha, cosine, self.chunk)
        return self.search_again(expanded, g, results, context, resolved)


@register
class DatabaseAugmentation(_Expansion):
    """Each gallery item becomes the (alpha-)weighted mean of itself and its top-n other gallery items; then
    searched."""

    name = "dba"

    def rerank(self, results: RetrievalResults, context: RerankContext) -> RetrievalResults:
        """New results against the augmented gallery, which is also left in context.cache for later stages."""
        resolved = self.resolved_n(results, context)
        if isinstance(resolved, str):
            return self.skip(results, resolved)
        q, g, results, cosine = self.prepared(results, context)
        neighbours = gallery_neighbours(g, given_or(self, "n", resolved), context.metric)
        augmented = expand_vectors(g, g, neighbours, self.alpha, cosine, self.chunk)
        context.cache[DBA_CACHE_KEY] = (results.gallery_ids, augmented)
        return self.search_again(q, augmented, results, context, resolved)


def expand_vectors(
    vectors: np.ndarray, source: np.ndarray, neighbours: np.ndarray, alpha: float, normalise: bool, chunk: int
) -> np.ndarray:
    """Weighted mean of each vector (weight 1) and its neighbours in `source` (PAD skipped), weights max(cos,
    0)^alpha."""
    out = np.empty(vectors.shape, dtype=np.float32)
    rows = max(1, chunk // max(1, neighbours.shape[1]))
    for s in range(0, len(vectors), rows):
        v, idx = vectors[s : s + rows].astype(np.float64), neighbours[s : s + rows]
        nb = source[np.maximum(idx, 0)].astype(np.float64)  # [b, n, D]
        cos = np.einsum("bd,bnd->bn", v, nb) / np.maximum(
            np.linalg.norm(v, axis=1)[:, None] * np.linalg.norm(nb, axis=2), 1e-12
        )
        w = np.where(idx != PAD, np.maximum(cos, 0.0) ** alpha, 0.0)
        out[s : s + rows] = (v + np.einsum("bn,bnd->bd", w, nb)) / (1.0 + w.sum(1, keepdims=True))
    return unit(out) if normalise else out


def gallery_neighbours(gallery: np.ndarray, n: int, metric: str) -> np.ndarray:
    """Each gallery item's n nearest other gallery items [G, n] (PAD when the gallery is smaller)."""
    own = np.arange(len(gallery))
    idx, _ = exact_knn(gallery, gallery, n, metric, exclude=(own, own))
    return idx


def head_distances(queries: np.ndarray, gallery: np.ndarray, head: np.ndarray, metric: str, chunk: int) -> np.ndarray:
    """Distances [Q, M] from each query to the gallery items in its `head` (inf on PAD); cosine expects unit vectors."""
    out = np.full(head.shape, np.inf)
    q, m = np.nonzero(head != PAD)
    sq = pair_sqdist(queries, gallery, q, head[q, m], chunk)
    out[q, m] = sq / 2.0 if metric == "cosine" else np.sqrt(sq)  # |a - b|^2 / 2 = 1 - cos for unit vectors
    return out


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _augmented_gallery(context: RerankContext, results: RetrievalResults, gallery: np.ndarray) -> np.ndarray:
    """The gallery a DBA stage left for these results' gallery, else the context's."""
    cached = context.cache.get(DBA_CACHE_KEY)
    if cached is not None and np.array_equal(np.asarray(cached[0]), np.asarray(results.gallery_ids)):
        return cached[1]
    return gallery
