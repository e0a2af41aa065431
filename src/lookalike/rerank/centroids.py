"""Centroids as the first stage of a re-ranking chain (CTL): the gallery becomes one vector per label."""

from __future__ import annotations

import numpy as np

from lookalike.core.embeddings import Embeddings
from lookalike.core.results import RetrievalResults
from lookalike.rerank.base import RerankContext, Reranker, register
from lookalike.search.centroids import search_centroids, table_centroids


@register
class CentroidRanker(Reranker):
    """Rank per-label gallery centroids (per label and sequence with per_sequence) instead of gallery images."""

    name = "centroids"
    first_only = True  # after another stage it would discard that stage's list and rank the centroids afresh
    needs_labels = True  # one centroid per label of the table
    servable = False  # an index's gallery is images, not centroids

    def __init__(self, per_sequence: bool = False) -> None:
        self.per_sequence = per_sequence

    def rerank(self, results: RetrievalResults, context: RerankContext) -> RetrievalResults:
        """The queries ranked against the centroids of the table's labels; the context's gallery becomes them."""
        context.require("table", "queries", "gallery", by=self.name)
        both = _union(context.queries, context.gallery)
        reranked, labels, n_relevant = search_centroids(
            both, context.table, results.k, self.per_sequence, context.metric
        )
        context.gallery = table_centroids(both, context.table, self.per_sequence).embeddings
        context.gallery_labels, context.n_relevant = labels, n_relevant
        context.exclude = None  # centroid visibility is settled here; later stages see only what this list holds
        context.cache.clear()  # gallery neighbour lists of the images no longer apply
        return self.recorded(reranked)


def _union(queries: Embeddings, gallery: Embeddings) -> Embeddings:
    """One Embeddings holding every query and gallery id once (they overlap when queries are gallery items)."""
    ids = np.concatenate([queries.ids, gallery.ids])
    vectors = np.concatenate([queries.vectors, gallery.vectors])
    _, first = np.unique(ids, return_index=True)
    return Embeddings(vectors[first], ids[first], dict(queries.meta))
