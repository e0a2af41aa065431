"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) from sparse k-NN lists.

The equations are those of the paper's public `re_ranking` function, over the union of queries and gallery:

- original distance d(i, j): squared euclidean distance. With metric "cosine" the vectors are L2-normalised
  first, so d = |x_i - x_j|^2 = 2 (1 - cos); with "euclidean" the vectors are used as given. Every row is then
  divided by its largest value over the union, d~(i, j) = d(i, j) / max_m d(i, m), as the public code does.
- N(i, k): the k nearest items of i, i itself first; R(i, k) = {j in N(i, k+1) : i in N(j, k+1)}.
- expansion: E(i) = R(i, k1) plus R(c, round(k1/2)) for every c in R(i, k1) whose set overlaps R(i, k1) in
  more than 2/3 of its members.
- V[i, j] = exp(-d~(i, j)) / sum over E(i), for j in E(i); then local query expansion V[i] = mean of V[j]
  over j in N(i, k2).
- Jaccard distance 1 - s / (2 - s) with s = sum_m min(V[i, m], V[j, m]); final distance
  (1 - lambda) * Jaccard + lambda * d~(i, j).

Nothing of size (Q + G)^2 is ever built: the neighbour lists come from `exact_knn`, V is a CSR matrix with
O(k1^2 k2) entries per row, and the Jaccard terms are sparse element-wise minima over (query, candidate)
pairs, processed `chunk` pairs at a time. One extra blocked pass finds every item's farthest item (the row
normalisation). A query whose id and vector equal a gallery item's is that gallery node (not a duplicate).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from lookalike.core.errors import LookalikeError
from lookalike.core.results import PAD, RetrievalResults
from lookalike.rerank.auto import AUTO, GalleryShape, given_or, is_auto, kreciprocal_k, resolve, skipped
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


@register
class KReciprocal(Reranker):
    """Re-sorts each query's first `candidates` items (all when None) by the k-reciprocal final distance."""

    name = "kreciprocal"

    def __init__(
        self,
        k1: int | str = AUTO,
        k2: int | str = AUTO,
        lambda_value: float | str = AUTO,
        candidates: int | None = None,
        chunk: int = 16384,
    ) -> None:
        self.k1 = k1 if is_auto(k1) else positive_int(k1, "k1", self.name)
        self.k2 = k2 if is_auto(k2) else positive_int(k2, "k2", self.name)
        self.candidates = None if candidates is None else positive_int(candidates, "candidates", self.name)
        self.chunk = positive_int(chunk, "chunk", self.name)
        if not is_auto(lambda_value) and not 0.0 <= float(lambda_value) <= 1.0:
            raise LookalikeError(f"rerank {self.name}: lambda_value must lie in [0, 1] or be auto, got {lambda_value}")
        self.lambda_value = lambda_value if is_auto(lambda_value) else float(lambda_value)

    def rerank(self, results: RetrievalResults, context: RerankContext) -> RetrievalResults:
        """New results: the incoming candidates re-sorted by (1 - lambda) Jaccard + lambda d~; the rest kept after.
        "auto" parameters follow the gallery (lookalike.rerank.auto); a gallery no setting fits is left unchanged."""
        queries, gallery = context_vectors(results, context, self.name)
        resolved = resolve(self, ("k1", "k2", "lambda_value"), results, context, _auto_values)
        if isinstance(resolved, str):
            return skipped(results, {"name": self.name, **self.params()}, resolved)
        k1, k2, lam = (given_or(self, n, resolved) for n in ("k1", "k2", "lambda_value"))
        results = drop_excluded(results, context.exclude)
        x, query_nodes = union_vectors(queries, gallery, results, context.metric)
        neighbours = union_neighbours(x, max(k1, k2 - 1), context.metric)
        farthest = farthest_sqdist(x)
        v = kreciprocal_vectors(x, neighbours, farthest, k1, k2, self.chunk)
        head = results.indices[:, : self.candidates or results.k]
        distances = final_distances(x, v, farthest, query_nodes, head, lam, self.chunk)
        return self.recorded(merge_head(results, distances), **({"resolved": resolved} if resolved else {}))

    @property
    def head(self) -> int | None:
        """The incoming candidates it re-sorts (None: every item of the list)."""
        return self.candidates


def _auto_values(shape: GalleryShape) -> dict[str, int | float]:
    """k1, k2 and lambda for a gallery of this shape (lookalike.rerank.auto.kreciprocal_k)."""
    k1, k2, lam = kreciprocal_k(shape)
    return {"k1": k1, "k2": k2, "lambda_value": lam}


def union_vectors(
    queries: np.ndarray, gallery: np.ndarray, results: RetrievalResults, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """The union's vectors [N, D] (gallery first, then queries that are not gallery items) and each query's node."""
    same = _gallery_position(results.query_ids, results.gallery_ids)
    found = same >= 0
    found[found] = (queries[found] == gallery[same[found]]).all(axis=1)  # same id and same vector: the same node
    extra = ~found
    nodes = np.where(found, same, len(gallery) + np.cumsum(extra) - 1)
    x = np.concatenate([gallery, queries[extra]]).astype(np.float32)
    if metric == "cosine":
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x, nodes.astype(np.int64)


def _gallery_position(query_ids: np.ndarray, gallery_ids: np.ndarray) -> np.ndarray:
    """Gallery position of every query id, -1 where absent (or where gallery ids repeat)."""
    index = pd.Index(np.asarray(gallery_ids).astype(str))
    if not index.is_unique:
        return np.full(len(query_ids), -1, dtype=np.int64)
    return index.get_indexer(np.asarray(query_ids).astype(str)).astype(np.int64)


def union_neighbours(x: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Neighbour lists [N, min(k, N-1) + 1] over the union, each item itself first (the paper's N(i, k + 1))."""
    n = len(x)
    own = np.arange(n)[:, None]
    if n < 2:
        return own
    idx, _ = exact_knn(x, x, min(k, n - 1), metric, exclude=(np.arange(n), np.arange(n)))
    return np.concatenate([own, idx], axis=1)


def farthest_sqdist(x: np.ndarray, row_block: int = 1024, col_block: int = 16384) -> np.ndarray:
    """max_j |x_i - x_j|^2 for every row (float64), by a blocked pass that holds one block of scores at a time."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    rows_aug = torch.cat([t, torch.ones(len(t), 1)], 1)  # [x_i, 1] . [-2 x_j, |x_j|^2] = |x_j|^2 - 2 x_i.x_j
    cols_aug = torch.cat([-2 * t, (t * t).sum(1, keepdim=True)], 1)
    buffer = torch.empty(min(row_block, len(t)) * min(col_block, len(t)))
    best = torch.empty(len(t), dtype=torch.int64)
    with torch.inference_mode():
        for r in range(0, len(t), row_block):
            rows = rows_aug[r : r + row_block]
            top, arg = torch.full((len(rows),), -torch.inf), torch.zeros(len(rows), dtype=torch.int64)
            for c in range(0, len(t), col_block):
                cols = cols_aug[c : c + col_block]
                value, pos = torch.mm(rows, cols.T, out=buffer[: len(rows) * len(cols)].view(len(rows), len(cols))).max(
                    1
                )
                better = value > top
                top, arg = torch.where(better, value, top), torch.where(better, pos + c, arg)
            best[r : r + row_block] = arg
    return pair_sqdist(x, x, np.arange(len(x)), best.numpy(), 1 << 16)


def reciprocal_sets(neighbours: np.ndarray, k: int) -> sp.csr_matrix:
    """R(i, k) as a 0/1 CSR matrix: j among i's k + 1 nearest and i among j's (the matrix is symmetric)."""
    n = len(neighbours)
    head = neighbours[:, : k + 1]
    a = sp.csr_matrix(
        (np.ones(head.size, dtype=np.int32), (np.repeat(np.arange(n), head.shape[1]), head.ravel())), shape=(n, n)
    )
    return a.multiply(a.T).tocsr()


def expanded_sets(neighbours: np.ndarray, k1: int) -> sp.csr_matrix:
    """E(i): R(i, k1) plus R(c, round(k1/2)) of each member c whose set lies more than 2/3 inside R(i, k1)."""
    r = reciprocal_sets(neighbours, k1)
    half = reciprocal_sets(neighbours, round(k1 / 2))
    overlap = (r @ half).multiply(r).tocoo()  # |R(c, k1/2) & R(i, k1)| for c in R(i, k1); never 0 (c is in both)
    sizes = np.diff(half.indptr)[overlap.col]
    keep = 3 * overlap.data > 2 * sizes
    chosen = sp.csr_matrix((np.ones(keep.sum(), dtype=np.int32), (overlap.row[keep], overlap.col[keep])), shape=r.shape)
    e = (r + chosen @ half).tocsr()
    e.data[:] = 1
    e.sort_indices()
    return e


def kreciprocal_vectors(
    x: np.ndarray, neighbours: np.ndarray, farthest: np.ndarray, k1: int, k2: int, chunk: int
) -> sp.csr_matrix:
    """V after local query expansion: Gaussian weights over E(i), each row averaged over its k2 nearest rows."""
    e = expanded_sets(neighbours, k1)
    rows = np.repeat(np.arange(len(x)), np.diff(e.indptr))
    weight = np.exp(-pair_sqdist(x, x, rows, e.indices, chunk) / np.maximum(farthest[rows], 1e-300))
    weight /= np.bincount(rows, weights=weight, minlength=len(x))[rows]
    v = sp.csr_matrix((weight, e.indices, e.indptr), shape=e.shape)
    k2 = min(k2, neighbours.shape[1])
    if k2 > 1:
        near = neighbours[:, :k2]
        mean = sp.csr_matrix(
            (np.full(near.size, 1.0 / k2), (np.repeat(np.arange(len(x)), k2), near.ravel())), shape=e.shape
        )
        v = (mean @ v).tocsr()
        v.sort_indices()
    return v


def final_distances(
    x: np.ndarray,
    v: sp.csr_matrix,
    farthest: np.ndarray,
    query_nodes: np.ndarray,
    head: np.ndarray,
    lambda_value: float,
    chunk: int,
) -> np.ndarray:
    """(1 - lambda) Jaccard + lambda d~ for every (query, gallery) pair in `head` [Q, M]; inf on PAD slots."""
    out = np.full(head.shape, np.inf)
    q, m = np.nonzero(head != PAD)
    a, b = query_nodes[q], head[q, m]  # gallery position j is union node j
    shared = np.empty(len(a))
    for s in range(0, len(a), chunk):
        shared[s : s + chunk] = np.asarray(v[a[s : s + chunk]].minimum(v[b[s : s + chunk]]).sum(axis=1)).ravel()
    jaccard = 1.0 - shared / (2.0 - shared)
    original = pair_sqdist(x, x, a, b, chunk) / np.maximum(farthest[a], 1e-300)
    out[q, m] = (1.0 - lambda_value) * jaccard + lambda_value * original
    return out
