"""Query expansion (average and alpha-QE) and database-side augmentation on hand-computed 2-D cases, and on clusters."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.results import PAD, RetrievalResults
from lookalike.metrics import compute_metrics
from lookalike.rerank import DatabaseAugmentation, QueryExpansion, RerankContext, check_ascending, create_reranker
from lookalike.search import exact_knn, search

SQRT50 = np.sqrt(50.0)
# query (1, 0); gallery g0 .. g3 at cosines .96, .8, 12/13 and -1 to it: initial order g0, g2, g1, g3
GALLERY = np.array([[0.96, 0.28], [0.8, 0.6], [12 / 13, -5 / 13], [-1.0, 0.0]], dtype=np.float32)


def case(query=(1.0, 0.0), gallery=GALLERY, metric="cosine", exclude=None, k=None):
    queries = Embeddings(np.array([query], dtype=np.float32), ["q"])
    gal = Embeddings(gallery, [f"g{i}" for i in range(len(gallery))])
    results = search(queries, gal, k=k or len(gallery), metric=metric, exclude=exclude)
    return results, RerankContext(queries=queries, gallery=gal, metric=metric, exclude=exclude)


def angles(*degrees):
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], 1).astype(np.float32)


def test_average_qe_by_hand():
    results, context = case()
    np.testing.assert_array_equal(results.indices[0], [0, 2, 1, 3])
    out = QueryExpansion(n=1).rerank(results, context)
    # q' = (q + g0) / |q + g0| = (7, 1) / sqrt(50): g1 (cos 6.2/sqrt50) now beats g2 (cos (79/13)/sqrt50)
    np.testing.assert_array_equal(out.indices[0], [0, 1, 2, 3])
    np.testing.assert_allclose(out.distances[0], 1 - np.array([7, 6.2, 79 / 13, -7]) / SQRT50, atol=1e-6)
    check_ascending(out)


def test_alpha_qe_by_hand():
    results, context = case()
    out = QueryExpansion(n=2, alpha=3.0).rerank(results, context)
    q = np.array([1.0, 0.0]) + 0.96**3 * GALLERY[0] + (12 / 13) ** 3 * GALLERY[2]  # weights cos^3 of the top-2 (g0, g2)
    cos = GALLERY.astype(np.float64) @ (q / np.linalg.norm(q))
    np.testing.assert_allclose(out.distances[0], np.sort(1 - cos), atol=1e-6)
    np.testing.assert_array_equal(out.indices[0], np.argsort(1 - cos))
    average = QueryExpansion(n=2, alpha=0.0).rerank(results, context)
    q0 = np.array([1 + 0.96 + 12 / 13, 0.28 - 5 / 13])  # alpha = 0: plain mean of q, g0, g2
    np.testing.assert_allclose(average.distances[0], np.sort(1 - GALLERY @ (q0 / np.linalg.norm(q0))), atol=1e-6)


def test_alpha_qe_gives_no_weight_to_dissimilar_neighbours():
    gallery = angles(10, 100, 200)  # the query's top-2 are at 10 and 100 degrees: cos(100) < 0
    results, context = case(query=(1.0, 0.0), gallery=gallery)
    out = QueryExpansion(n=2, alpha=1.0).rerank(results, context)
    q = np.array([1.0, 0.0]) + np.cos(np.deg2rad(10)) * gallery[0]  # the 100-degree item gets weight max(cos, 0) = 0
    np.testing.assert_allclose(out.distances[0], np.sort(1 - gallery @ (q / np.linalg.norm(q))), atol=1e-6)


def test_qe_with_euclidean_metric_uses_the_plain_mean():
    results, context = case(metric="euclidean")
    out = QueryExpansion(n=1).rerank(results, context)
    q = np.array([0.98, 0.14])  # (q + g0) / 2, not re-normalised
    np.testing.assert_allclose(out.distances[0], np.sort(np.linalg.norm(GALLERY - q, axis=1)), atol=1e-6)
    np.testing.assert_allclose(out.distances[0, 0], np.sqrt(0.02), atol=1e-6)


def test_qe_candidates_rescores_the_head_only():
    results, context = case()
    out = QueryExpansion(n=1, candidates=2).rerank(results, context)
    np.testing.assert_array_equal(out.indices[0], [0, 2, 1, 3])  # g1 is outside the head: it cannot overtake g2
    head = 1 - np.array([7, 79 / 13]) / SQRT50  # 0.010, 0.141: below the next original distance 0.2, kept as they are
    tail = np.array([0.2, 2.0])  # g1, g3 keep their places and their distances (the one merge rule, merge_head)
    np.testing.assert_allclose(out.distances[0], np.concatenate([head, tail]), atol=1e-6)
    check_ascending(out)


def test_dba_by_hand():
    # a 0, b 40, c 90, d 180 degrees; nearest other: a->b, b->a, c->b, d->c. With n=1, alpha=0 each item moves to
    # the bisector with its neighbour: a', b' at 20, c' at 65, d' at 135 degrees. Query at 60 degrees.
    gallery = angles(0, 40, 90, 180)
    results, context = case(query=angles(60)[0], gallery=gallery)
    np.testing.assert_array_equal(results.indices[0], [1, 2, 0, 3])
    out = DatabaseAugmentation(n=1).rerank(results, context)
    assert out.indices[0, 0] == 2 and set(out.indices[0, 1:3]) == {0, 1} and out.indices[0, 3] == 3
    np.testing.assert_allclose(out.distances[0], 1 - np.cos(np.deg2rad([5, 40, 40, 75])), atol=1e-6)
    a_prime = (
        gallery[0] + np.cos(np.deg2rad(40)) ** 2 * gallery[1]
    )  # alpha = 2, n = 2: a's second neighbour c has cos 0
    out = DatabaseAugmentation(n=2, alpha=2.0).rerank(results, context)
    expected = 1 - angles(60)[0] @ (a_prime / np.linalg.norm(a_prime))
    np.testing.assert_allclose(out.distances[0][out.indices[0] == 0], [expected], atol=1e-6)


def test_dba_leaves_its_gallery_for_a_following_qe():
    gallery = angles(0, 40, 90, 180)
    results, context = case(query=angles(60)[0], gallery=gallery)
    after_dba = DatabaseAugmentation(n=1).rerank(results, context)
    out = QueryExpansion(n=1).rerank(after_dba, context)
    q = angles(60)[0] + angles(65)[0]  # the query averaged with c' (65 degrees): 62.5 degrees
    augmented = angles(20, 20, 65, 135)
    np.testing.assert_allclose(out.distances[0], np.sort(1 - augmented @ (q / np.linalg.norm(q))), atol=1e-6)


@pytest.mark.parametrize(
    "reranker",
    [
        QueryExpansion(n=2),
        QueryExpansion(n=2, candidates=3),
        DatabaseAugmentation(n=2),
        DatabaseAugmentation(n=2, candidates=3),
    ],
)
def test_exclusion_groups_are_respected(reranker):
    rng = np.random.default_rng(0)
    g = rng.standard_normal((12, 4)).astype(np.float32)
    gallery = Embeddings(g, [f"g{i}" for i in range(12)])
    queries = Embeddings(g[:4], gallery.ids[:4])  # the queries are gallery items; items 4, 5 share query 0's sequence
    groups = (np.arange(4), np.array([0, 1, 2, 3, 0, 0, 6, 7, 8, 9, 10, 11]))
    context = RerankContext(queries=queries, gallery=gallery, exclude=groups)
    clean = reranker.rerank(search(queries, gallery, k=8, exclude=groups), context)
    dirty = reranker.rerank(search(queries, gallery, k=8), context)  # incoming list still holds the excluded items
    for out in (clean, dirty):
        hidden = out.valid & (groups[1][np.maximum(out.indices, 0)] == groups[0][:, None])
        assert not hidden.any()
        check_ascending(out)
    np.testing.assert_array_equal(clean.indices[:, :3], dirty.indices[:, :3])
    np.testing.assert_allclose(clean.distances[:, :3], dirty.distances[:, :3], atol=1e-6)


@pytest.mark.parametrize(
    "reranker", [QueryExpansion(n=3), QueryExpansion(n=3, candidates=4), DatabaseAugmentation(n=3)]
)
def test_output_contract_with_padding(reranker):
    rng = np.random.default_rng(1)
    queries = Embeddings(rng.standard_normal((5, 6)), [f"q{i}" for i in range(5)])
    gallery = Embeddings(rng.standard_normal((4, 6)), [f"g{i}" for i in range(4)])
    idx, dist = exact_knn(
        queries.vectors, gallery.vectors, 7
    )  # only 4 gallery items: 3 PAD slots per row (search() clamps)
    results = RetrievalResults(idx, dist, queries.ids, gallery.ids)
    out = reranker.rerank(results, RerankContext(queries=queries, gallery=gallery))
    assert out.indices.shape == (5, 7) and out.distances.dtype == np.float32
    assert (out.indices[:, 4:] == PAD).all() and np.isinf(out.distances[:, 4:]).all()
    np.testing.assert_array_equal(np.sort(out.indices[:, :4], 1), np.tile(np.arange(4), (5, 1)))
    np.testing.assert_array_equal(out.query_ids, results.query_ids)
    check_ascending(out)


def test_qe_and_dba_improve_map_on_clusters():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 32))
    g_labels, q_labels = np.repeat(np.arange(20), 10), np.repeat(np.arange(20), 3)
    gallery = Embeddings(centres[g_labels] + 1.1 * rng.standard_normal((200, 32)), [f"g{i}" for i in range(200)])
    queries = Embeddings(centres[q_labels] + 1.1 * rng.standard_normal((60, 32)), [f"q{i}" for i in range(60)])
    results = search(queries, gallery, k=200)
    context = RerankContext(queries=queries, gallery=gallery)

    def score(r):
        return compute_metrics(r, q_labels, g_labels).means["map@all"]

    before = score(results)
    assert before < 0.9
    assert score(QueryExpansion(n=3).rerank(results, context)) > before + 0.03
    assert score(QueryExpansion(n=5, alpha=3.0).rerank(results, context)) > before + 0.03
    assert (
        score(DatabaseAugmentation(n=3).rerank(results, RerankContext(queries=queries, gallery=gallery)))
        > before + 0.03
    )


def test_registry_and_bad_parameters():
    assert isinstance(create_reranker("qe", n=2, alpha=3), QueryExpansion)
    assert isinstance(create_reranker("dba", n=2), DatabaseAugmentation)
    for cls in (QueryExpansion, DatabaseAugmentation):
        for params, word in [({"n": 0}, "n must"), ({"alpha": -1}, "alpha"), ({"candidates": 0}, "candidates")]:
            with pytest.raises(LookalikeError, match=word):
                cls(**params)
    results, context = case()
    with pytest.raises(LookalikeError, match="needs gallery"):
        QueryExpansion().rerank(results, RerankContext(queries=context.queries))
