"""k-reciprocal re-ranking: the sparse implementation against a dense oracle written from the paper's equations."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.results import PAD, RetrievalResults
from lookalike.rerank import KReciprocal, RerankContext, check_ascending, create_reranker
from lookalike.search import exact_knn, search


def dense_kreciprocal(x: np.ndarray, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    """Final distances [N, N] over the union x (rows and columns), dense, one item at a time: the oracle.

    Original distance: squared euclidean, each row divided by its largest entry (the public code divides the
    columns by their maxima and transposes, which is the same for a symmetric matrix).
    """
    x = x.astype(np.float64)
    n = len(x)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    dist = (dist / dist.max(axis=0)).T
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, : k + 1]
        return np.array([j for j in forward if i in rank[j, : k + 1]], dtype=np.int64)

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = set(r.tolist())
        for c in r:
            rc = reciprocal(c, round(k1 / 2))
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                expansion |= set(rc.tolist())
        members = np.array(sorted(expansion))
        weight = np.exp(-dist[i, members])
        v[i, members] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    shared = np.minimum(v[:, None, :], v[None, :, :]).sum(-1)
    jaccard = 1.0 - shared / (2.0 - shared)
    return (1.0 - lambda_value) * jaccard + lambda_value * dist


def clustered(rng, n, d=8, centres=None, noise=0.35):
    """Points around a few random centres (labels returned too)."""
    centres = rng.standard_normal((6, d)) if centres is None else centres
    labels = rng.integers(0, len(centres), n)
    return (centres[labels] + noise * rng.standard_normal((n, d))).astype(np.float32), labels, centres


def make_case(seed, n_query=12, n_gallery=90, metric="cosine"):
    """Disjoint queries and gallery whose ids overlap as strings ("0", "1", ...) but whose vectors differ."""
    rng = np.random.default_rng(seed)
    g, _, centres = clustered(rng, n_gallery)
    q, _, _ = clustered(rng, n_query, centres=centres)
    queries = Embeddings(q, np.arange(n_query).astype(str))
    gallery = Embeddings(g, np.arange(n_gallery).astype(str))
    results = search(queries, gallery, k=n_gallery, metric=metric)
    return results, RerankContext(queries=queries, gallery=gallery, metric=metric), q, g


def as_union(q, g, metric):
    x = np.concatenate([q, g]).astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x


@pytest.mark.parametrize(
    "metric, k1, k2, lam",
    [
        ("cosine", 20, 6, 0.3),
        ("cosine", 7, 3, 0.5),
        ("euclidean", 10, 1, 0.3),
        ("euclidean", 5, 4, 0.0),
        ("cosine", 20, 6, 1.0),
    ],
)
def test_sparse_equals_dense_oracle(metric, k1, k2, lam):
    results, context, q, g = make_case(seed=k1 + k2, metric=metric)
    out = KReciprocal(k1=k1, k2=k2, lambda_value=lam, chunk=37).rerank(results, context)  # many ragged chunks
    final = dense_kreciprocal(as_union(q, g, metric), k1, k2, lam)[: len(q), len(q) :]
    np.testing.assert_allclose(out.distances, np.take_along_axis(final, out.indices, 1), atol=1e-5)
    np.testing.assert_allclose(out.distances, np.sort(final, axis=1), atol=1e-5)
    if lam > 0:  # with lambda = 0 the many Jaccard distances of exactly 1 tie, in any order
        np.testing.assert_array_equal(out.indices, np.argsort(final, axis=1, kind="stable"))
    assert (lam == 1.0) == np.array_equal(out.indices, results.indices)  # lambda = 1 is the original ranking
    check_ascending(out)


def test_query_in_gallery_is_one_node_and_never_returned():
    rng = np.random.default_rng(3)
    g, _, _ = clustered(rng, 70)
    gallery = Embeddings(g, [f"img{i}" for i in range(70)])
    picked = np.arange(0, 70, 7)
    queries = Embeddings(g[picked], gallery.ids[picked])
    groups = (picked, np.arange(70))  # every item is its own group: a query never matches itself
    context = RerankContext(queries=queries, gallery=gallery, exclude=groups)
    final = dense_kreciprocal(as_union(np.empty((0, 8)), g, "cosine"), 20, 6, 0.3)[picked]
    for exclude in (groups, None):  # the incoming list already without self, or with self at rank 0
        idx, dist = exact_knn(
            queries.vectors, gallery.vectors, 70, exclude=exclude
        )  # 70 columns either way (search() clamps)
        results = RetrievalResults(idx, dist, queries.ids, gallery.ids)
        out = KReciprocal(k1=20, k2=6, lambda_value=0.3).rerank(results, context)
        assert not (out.indices == picked[:, None]).any()
        assert (out.indices[:, -1] == PAD).all() and np.isinf(out.distances[:, -1]).all()
        masked = final.copy()
        masked[np.arange(len(picked)), picked] = np.inf
        expected = np.argsort(masked, axis=1, kind="stable")[:, :69]
        np.testing.assert_array_equal(out.indices[:, :69], expected)
        np.testing.assert_allclose(out.distances[:, :69], np.take_along_axis(masked, expected, 1), atol=1e-5)


def test_only_incoming_candidates_are_resorted_and_padding_kept():
    results, context, q, g = make_case(seed=5)
    short = results.top(15)
    out = KReciprocal(k1=8, k2=3, lambda_value=0.3).rerank(short, context)
    assert out.indices.shape == (12, 15)
    np.testing.assert_array_equal(np.sort(out.indices, 1), np.sort(short.indices, 1))  # same items, none added
    final = dense_kreciprocal(as_union(q, g, "cosine"), 8, 3, 0.3)[: len(q), len(q) :]
    np.testing.assert_allclose(out.distances, np.take_along_axis(final, out.indices, 1), atol=1e-5)
    first = np.arange(15) < 10
    padded = RetrievalResults(
        np.where(first, short.indices, PAD),
        np.where(first, short.distances, np.inf),
        short.query_ids,
        short.gallery_ids,
    )
    out = KReciprocal(k1=8, k2=3, lambda_value=0.3).rerank(padded, context)
    assert (out.indices[:, 10:] == PAD).all() and np.isinf(out.distances[:, 10:]).all()
    np.testing.assert_array_equal(np.sort(out.indices[:, :10], 1), np.sort(short.indices[:, :10], 1))
    check_ascending(out)


def test_candidates_resorts_the_head_and_keeps_the_tail_in_order():
    results, context, q, g = make_case(seed=6)
    out = KReciprocal(k1=8, k2=3, lambda_value=0.3, candidates=10).rerank(results, context)
    np.testing.assert_array_equal(out.indices[:, 10:], results.indices[:, 10:])
    np.testing.assert_array_equal(out.distances[:, 10:], results.distances[:, 10:])  # the tail keeps its distances
    np.testing.assert_array_equal(np.sort(out.indices[:, :10], 1), np.sort(results.indices[:, :10], 1))
    final = dense_kreciprocal(as_union(q, g, "cosine"), 8, 3, 0.3)[: len(q), len(q) :]
    head = np.take_along_axis(final, out.indices[:, :10], 1)
    np.testing.assert_array_equal(np.argsort(head, axis=1, kind="stable"), np.tile(np.arange(10), (len(q), 1)))
    ratio = (
        out.distances[:, :10] / head
    )  # merge_head: the head's distances as they are, or scaled as one below the tail
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-4)
    assert (ratio <= 1 + 1e-5).all() and (out.distances[:, 9] < results.distances[:, 10]).all()
    check_ascending(out)


def test_sparse_memory_stays_far_below_the_dense_matrix():
    rng = np.random.default_rng(7)
    g, _, centres = clustered(rng, 8000, d=16, noise=0.5)
    q, _, _ = clustered(rng, 300, d=16, centres=centres, noise=0.5)
    queries, gallery = Embeddings(q, [f"q{i}" for i in range(300)]), Embeddings(g, [f"g{i}" for i in range(8000)])
    results = search(queries, gallery, k=50)
    tracemalloc.start()
    out = KReciprocal(k1=10, k2=3).rerank(results, RerankContext(queries=queries, gallery=gallery))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    dense = (300 + 8000) ** 2 * 4  # one float32 (Q+G)^2 matrix: 276 MB; this run needs about 17 MB
    assert peak < dense / 8, f"peak {peak / 2**20:.0f} MiB"
    check_ascending(out)


def test_registry_and_bad_parameters():
    assert isinstance(create_reranker("kreciprocal", k1=10), KReciprocal)
    for params, word in [
        ({"k1": 0}, "k1"),
        ({"k2": 1.5}, "k2"),
        ({"lambda_value": 2}, "lambda_value"),
        ({"candidates": -1}, "candidates"),
    ]:
        with pytest.raises(LookalikeError, match=word):
            KReciprocal(**params)
    results, context, _, _ = make_case(seed=8)
    with pytest.raises(LookalikeError, match="needs queries"):
        KReciprocal(k1=20, k2=6, lambda_value=0.3).rerank(results, RerankContext(gallery=context.gallery))
    with pytest.raises(LookalikeError, match="gallery vectors"):
        KReciprocal(k1=20, k2=6, lambda_value=0.3).rerank(
            results, RerankContext(queries=context.queries, gallery=Embeddings(np.zeros((3, 8)), ["a", "b", "c"]))
        )
