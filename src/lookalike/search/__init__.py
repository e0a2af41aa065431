"""Search a gallery: exact blocked k-NN or a FAISS index, both returning RetrievalResults."""

from __future__ import annotations

import inspect
import os
import sys
import types
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.protocol import exclusion_groups, query_gallery_ids
from lookalike.core.results import RetrievalResults, clamp_k
from lookalike.core.table import DatasetTable
from lookalike.progress import Progress
from lookalike.search.centroids import Centroids, evaluate_centroids, gallery_centroids, search_centroids
from lookalike.search.exact import exact_knn
from lookalike.search.faiss_index import FaissIndex, build_faiss_from_shards
from lookalike.shards import iter_shards

__all__ = [
    "Centroids",
    "FaissIndex",
    "build_faiss_from_shards",
    "evaluate_centroids",
    "exact_knn",
    "gallery_centroids",
    "search",
    "search_centroids",
    "search_table",
    "search_table_shards",
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
    """Top-k gallery items of every query; `index` is 'exact' or a FAISS factory string ('Flat', 'HNSW32', ...).
    A k above the gallery items a query may see is clamped to that many (a LookalikeWarning, `k_requested` in meta):
    the extra columns could hold nothing but padding.

    Args:
        queries: query embeddings [Q, D].
        gallery: gallery embeddings [G, D].
        k: list length (clamped to the gallery items a query may see).
        metric: "cosine" or "euclidean".
        index: "exact" (blocked matrix product, ties in gallery order) or a FAISS factory string.
        exclude: (query groups [Q], gallery groups [G]): a gallery item of the query's group is never returned.
        device: torch device of exact search.
        progress: optional wrapper of exact search's loop over query blocks.

    Returns:
        RetrievalResults: indices [Q, k] into the gallery and distances [Q, k], ascending.

    Example:
        >>> import numpy as np, lookalike
        >>> gallery = lookalike.Embeddings(np.eye(3), ["a", "b", "c"])
        >>> query = lookalike.Embeddings([[0.1, 1.0, 0.0]], ["q"])
        >>> lookalike.search(query, gallery, k=2).indices.tolist()
        [[1, 0]]
    """
    requested, k = k, clamp_k(k, len(gallery), len(queries), exclude)
    if index == "exact":
        idx, dist = exact_knn(
            queries.vectors, gallery.vectors, k, metric, exclude=exclude, device=device, progress=progress
        )
    else:
        if queries.dim != gallery.dim:
            raise LookalikeError(f"search: query dim {queries.dim} differs from gallery dim {gallery.dim}")
        idx, dist = FaissIndex(index, metric).add(gallery.vectors).search(queries.vectors, k, exclude)
    meta = {"metric": metric, "index": index, "k": k} | ({"k_requested": requested} if k != requested else {})
    return RetrievalResults(idx, dist, queries.ids, gallery.ids, meta)


def search_table(embeddings: Embeddings, table: DatasetTable, k: int = 100, **kwargs) -> RetrievalResults:
    """Search the validation queries of `table` against its validation gallery, applying its exclusion rules.

    Args:
        embeddings: embeddings of (at least) the table's validation rows, ids = the table's paths.
        table: the dataset table (is_query, is_gallery; `sequence`, or else "never find yourself").
        k: list length.
        **kwargs: metric, index, device as `search` takes them.

    Returns:
        RetrievalResults of the validation queries over the validation gallery.

    Example:
        >>> import numpy as np, lookalike
        >>> table = lookalike.import_folder("data/omniglot/images_background_small1/Latin", validation_fraction=1.0)
        >>> # or embed(extractor, table)
        >>> embeddings = lookalike.Embeddings(np.random.rand(len(table), 8), table.paths)
        >>> lookalike.search_table(embeddings, table, k=10).indices.shape
        (520, 10)
    """
    query_ids, gallery_ids = query_gallery_ids(table)
    exclude = exclusion_groups(table, query_ids, gallery_ids)
    return search(embeddings.select(query_ids), embeddings.select(gallery_ids), k, exclude=exclude, **kwargs)


def search_table_shards(
    shards: str | os.PathLike, table: DatasetTable, k: int = 100, metric: str = "cosine", index: str = "IVF1024,Flat"
) -> RetrievalResults:
    """search_table over a shard folder (`extract.keep_shards`) with a FAISS index: the gallery's index is trained on a
    sample and filled shard by shard, the queries gathered as the shards pass, so memory is the index + the queries +
    one shard, never every vector (a 10M-row gallery searched where only its IVF-PQ codes fit).

    Args:
        shards: a complete shard folder (OUTPUT.shards) of (at least) the table's validation rows.
        table: the dataset table (is_query, is_gallery, `sequence`).
        k: list length (clamped as `search` clamps it).
        metric: "cosine" or "euclidean".
        index: a FAISS factory string.

    Returns:
        RetrievalResults of the validation queries over the validation gallery, the gallery in the shards' order.
    """
    query_ids, gallery_ids = query_gallery_ids(table)

    def gallery_blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, vectors in iter_shards(shards):
            keep = np.isin(ids, gallery_ids)
            yield ids[keep], vectors[keep]

    built = build_faiss_from_shards(gallery_blocks, index, metric)
    if len(built.ids) != len(gallery_ids):
        missing = np.setdiff1d(gallery_ids, built.ids)
        raise LookalikeError(f"{shards}: no embedding for gallery id {str(missing[0])!r} ({len(missing)} missing)")
    queries = _gather(shards, query_ids)
    exclude = exclusion_groups(table, query_ids, built.ids)
    requested, k = k, clamp_k(k, len(built.ids), len(query_ids), exclude)
    idx, dist = built.search(queries, k, exclude)
    meta = {"metric": metric, "index": index, "k": k} | ({"k_requested": requested} if k != requested else {})
    return RetrievalResults(idx, dist, query_ids, built.ids, meta)


def _gather(shards: str | os.PathLike, ids: np.ndarray) -> np.ndarray:
    """The vectors of `ids`, in that order, read shard by shard; an id no shard holds is one line."""
    found = [(block[keep], vectors[keep]) for block, vectors in iter_shards(shards) for keep in [np.isin(block, ids)]]
    names = np.concatenate([names for names, _ in found])
    vectors = np.concatenate([v for _, v in found])
    order = pd.Index(names).get_indexer(ids)
    if (order < 0).any():
        raise LookalikeError(f"{shards}: no embedding for query id {str(ids[order < 0][0])!r}")
    return vectors[order]


class _CallablePackage(types.ModuleType):
    """This package, callable as its `search` function: `lookalike.search` is both the verb and the subpackage (its
    attribute on `lookalike` becomes this module whenever the subpackage is imported), so both spellings must work."""

    def __call__(self, *args, **kwargs) -> RetrievalResults:
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
__signature__ = inspect.signature(search)
