"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) from sparse k-NN lists, plus list helpers shared by re-rankers.

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

from lookalike.errors import LookalikeError
from lookalike.rerank.base import RerankContext, Reranker, positive_int, register
from lookalike.search.exact import check_metric, exact_knn
from lookalike.search.results import PAD, RetrievalResults


@register
class KReciprocal(Reranker):
    """Re-sorts each query's first `candidates` items (all when None) by the k-reciprocal final distance."""

    name = "kreciprocal"

    def __init__(
        self, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, candidates: int | None = None, chunk: int = 16384
    ) -> None:
        self.k1 = positive_int(k1, "k1", self.name)
        self.k2 = positive_int(k2, "k2", self.name)
        self.candidates = None if candidates is None else positive_int(candidates, "candidates", self.name)
        self.chunk = positive_int(chunk, "chunk", self.name)
        if not 0.0 <= float(lambda_value) <= 1.0:
            raise LookalikeError(f"rerank {self.name}: lambda_value must lie in [0, 1], got {lambda_value}")
        self.lambda_value = float(lambda_value)

    def rerank(self, results: RetrievalResults, context: RerankContext) -> RetrievalResults:
        """New results: the incoming candidates re-sorted by (1 - lambda) Jaccard + lambda d~; the rest kept after."""
        queries, gallery = context_vectors(results, context, self.name)
        results = drop_excluded(results, context.exclude)
        x, query_nodes = union_vectors(queries, gallery, results, context.metric)
        neighbours = union_neighbours(x, max(self.k1, self.k2 - 1), context.metric)
        farthest = farthest_sqdist(x)
        v = kreciprocal_vectors(x, neighbours, farthest, self.k1, self.k2, self.chunk)
        head = results.indices[:, : self.candidates or results.k]
        distances = final_distances(x, v, farthest, query_nodes, head, self.lambda_value, self.chunk)
        return rerank_head(results, distances)


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


def pair_sqdist(a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int) -> np.ndarray:
    """Squared euclidean distances |a[rows] - b[cols]|^2 in float64, `chunk` pairs at a time."""
    out = np.empty(len(rows), dtype=np.float64)
    for s in range(0, len(rows), chunk):
        diff = a[rows[s : s + chunk]].astype(np.float64) - b[cols[s : s + chunk]]
        out[s : s + chunk] = np.einsum("pd,pd->p", diff, diff)
    return out


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


# ---- helpers shared by re-rankers that re-sort or re-score the head of each list ----


def context_vectors(results: RetrievalResults, context: RerankContext, by: str) -> tuple[np.ndarray, np.ndarray]:
    """Query and gallery vectors of the context, checked against the results' sizes."""
    context.require("queries", "gallery", by=by)
    queries, gallery = context.queries.vectors, context.gallery.vectors
    if len(queries) != results.n_queries or len(gallery) != len(results.gallery_ids):
        raise LookalikeError(
            f"rerank {by}: context has {len(queries)} query / {len(gallery)} gallery vectors for results of "
            f"{results.n_queries} queries / {len(results.gallery_ids)} gallery items"
        )
    if queries.shape[1] != gallery.shape[1]:
        raise LookalikeError(f"rerank {by}: query dim {queries.shape[1]} differs from gallery dim {gallery.shape[1]}")
    check_metric(context.metric)
    return queries, gallery


def drop_excluded(results: RetrievalResults, exclude: tuple[np.ndarray, np.ndarray] | None) -> RetrievalResults:
    """The results without items of the query's exclusion group (self, same sequence): they become PAD at the end."""
    if exclude is None:
        return results
    q_groups, g_groups = (np.asarray(a, dtype=np.int64) for a in exclude)
    if q_groups.shape != (results.n_queries,) or g_groups.shape != (len(results.gallery_ids),):
        raise LookalikeError(
            f"exclude: expected group arrays of length {results.n_queries} and {len(results.gallery_ids)}, "
            f"got {q_groups.shape} and {g_groups.shape}"
        )
    valid = results.valid
    keep = valid & (g_groups[np.where(valid, results.indices, 0)] != q_groups[:, None])
    if keep.sum() == valid.sum():
        return results
    order = np.argsort(~keep, axis=1, kind="stable")
    indices = np.take_along_axis(np.where(keep, results.indices, PAD), order, 1)
    distances = np.take_along_axis(np.where(keep, results.distances, np.inf), order, 1)
    return RetrievalResults(indices, distances, results.query_ids, results.gallery_ids, dict(results.meta))


def rerank_head(results: RetrievalResults, head_distances: np.ndarray) -> RetrievalResults:
    """Sort the first M columns by new distances [Q, M] (inf on PAD); later columns keep their order after them.

    The later columns' distances are shifted per row so that the first of them equals the largest new
    distance: their gaps are kept and every row stays ascending.
    """
    m = head_distances.shape[1]
    head = results.indices[:, :m]
    new = np.where(head == PAD, np.inf, head_distances)
    order = np.argsort(new, axis=1, kind="stable")
    indices = [np.take_along_axis(head, order, 1), results.indices[:, m:]]
    distances = [np.take_along_axis(new, order, 1), _shifted_tail(results, new, m)]
    indices, distances = np.concatenate(indices, 1), np.concatenate(distances, 1)
    return RetrievalResults(indices, distances, results.query_ids, results.gallery_ids, dict(results.meta))


def _shifted_tail(results: RetrievalResults, new_head: np.ndarray, m: int) -> np.ndarray:
    """Distances of columns m.. moved to start at the row's largest new head distance (inf stays on PAD)."""
    tail = results.distances[:, m:].astype(np.float64)
    if tail.shape[1] == 0 or m == 0:
        return tail
    valid = results.indices[:, m:] != PAD
    top = np.where(np.isfinite(new_head), new_head, -np.inf).max(axis=1, keepdims=True)
    first = np.where(valid[:, :1], tail[:, :1], 0.0)
    top = np.where(np.isfinite(top), top, first)  # no new head distance: leave the tail where it was
    return np.where(valid, np.maximum(tail - first + top, top), np.inf)
