"""Search a gallery: exact blocked k-NN or a FAISS index, both returning RetrievalResults."""

from __future__ import annotations

import numpy as np
import torch

from lookalike.data.table import DatasetTable
from lookalike.embeddings import Embeddings
from lookalike.errors import LookalikeError
from lookalike.progress import Progress
from lookalike.search.centroids import Centroids, evaluate_centroids, gallery_centroids, search_centroids
from lookalike.search.exact import exact_knn
from lookalike.search.faiss_index import FaissIndex
from lookalike.search.protocol import exclusion_groups, query_gallery_ids
from lookalike.search.results import PAD, RetrievalResults, clamp_k

__all__ = [
    "PAD",
    "Centroids",
    "FaissIndex",
    "RetrievalResults",
    "clamp_k",
    "evaluate_centroids",
    "exact_knn",
    "exclusion_groups",
    "gallery_centroids",
    "query_gallery_ids",
    "search",
    "search_centroids",
    "search_table",
]


def search(
    queries: Embeddings,
    gallery: Embeddings,
    k: int = 100,
    metric: str = "cosine",
    index: str = "exact",
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> RetrievalResults:
    """Top-k gallery items of every query; `index` is 'exact' or a FAISS factory string ('Flat', 'HNSW32', ...);
    `progress` may wrap exact search's loop over query blocks. A k above the gallery items a query may see is clamped
    to that many (a LookalikeWarning, `k_requested` in meta): the extra columns could hold nothing but padding."""
    requested, k = k, clamp_k(k, len(gallery), len(queries), exclude)
    if index == "exact":
        idx, dist = exact_knn(queries.vectors, gallery.vectors, k, metric, exclude=exclude, device=device, progress=progress)
    else:
        if queries.dim != gallery.dim:
            raise LookalikeError(f"search: query dim {queries.dim} differs from gallery dim {gallery.dim}")
        idx, dist = FaissIndex(index, metric).add(gallery.vectors).search(queries.vectors, k, exclude)
    meta = {"metric": metric, "index": index, "k": k} | ({"k_requested": requested} if k != requested else {})
    return RetrievalResults(idx, dist, queries.ids, gallery.ids, meta)


def search_table(embeddings: Embeddings, table: DatasetTable, k: int = 100, **kwargs) -> RetrievalResults:
    """Search the validation queries of `table` against its validation gallery, applying its exclusion rules."""
    query_ids, gallery_ids = query_gallery_ids(table)
    exclude = exclusion_groups(table, query_ids, gallery_ids)
    return search(embeddings.select(query_ids), embeddings.select(gallery_ids), k, exclude=exclude, **kwargs)
