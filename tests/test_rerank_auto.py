"""Gallery-adaptive ("auto") defaults of the training-free re-rankers (issue 20 item 2): explicit published values rank
as before, the defaults follow the gallery, record what they resolved to, and leave a gallery no setting fits
unchanged with a one-line warning."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeWarning
from lookalike.metrics import compute_metrics
from lookalike.rerank import RerankContext, create_reranker
from lookalike.search import search

NAMES = ("kreciprocal", "qe", "dba", "icfrr")
# The published values, and the indices' sha256 (first 16 hex) and the sum of the first 10 distances of each row that
# the code before "auto" (commit 0478a47, where these were the defaults) gave on `clustered()` below.
PUBLISHED = {
    "kreciprocal": ({"k1": 20, "k2": 6, "lambda_value": 0.3}, "a4263c3727a41502", 48.27807639911771),
    "qe": ({"n": 5}, "63166d6039da56fa", 50.973169803619385),
    "dba": ({"n": 5}, "82478bb041166e2f", 64.99618130922318),
    "icfrr": ({"kg": 256, "kq": 250, "beta": 0.5}, "083dd9a15f1b5449", 124.63985930383205),
}


def clustered(seed: int = 0, classes: int = 6, per_class: int = 12, n_queries: int = 20, noise: float = 0.9):
    """Unit vectors around random centres: queries (random classes) and a gallery of `per_class` items a class."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, 16))
    g_labels = np.repeat(np.arange(classes), per_class)
    q_labels = rng.integers(0, classes, n_queries)

    def emb(labels: np.ndarray, prefix: str) -> Embeddings:
        x = centres[labels] + noise * rng.standard_normal((len(labels), 16))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        return Embeddings(x, [f"{prefix}{i}" for i in range(len(labels))])

    return emb(q_labels, "q"), emb(g_labels, "g"), q_labels, g_labels


def every_image_a_query(seed: int = 0, classes: int = 12, per_class: int = 20, noise: float = 1.1):
    """One set of images, each a query against all the others (the Omniglot protocol), its lists and context."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    x = rng.standard_normal((classes, 16))[labels] + noise * rng.standard_normal((len(labels), 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    emb = Embeddings(x, [f"i{i}" for i in range(len(labels))])
    own = np.arange(len(labels))
    results = search(emb, emb, k=len(labels) - 1, exclude=(own, own))
    return results, emb, labels, (own, own)


def cmc1(results, labels: np.ndarray, exclude) -> float:
    return compute_metrics(results, labels, labels, exclude=exclude).means["cmc@1"]


@pytest.mark.parametrize("name", NAMES)
def test_published_parameters_give_todays_outputs(name: str) -> None:
    """Given explicitly, the published parameters rank exactly as the published defaults did before "auto"."""
    params, index_hash, distance_sum = PUBLISHED[name]
    queries, gallery, _, _ = clustered()
    results = search(queries, gallery, k=len(gallery))
    out = create_reranker(name, **params).rerank(results, RerankContext(queries=queries, gallery=gallery))
    assert hashlib.sha256(np.ascontiguousarray(out.indices, np.int64).tobytes()).hexdigest()[:16] == index_hash
    assert float(np.float64(out.distances[:, :10]).sum()) == pytest.approx(distance_sum, rel=1e-6)
    assert "resolved" not in out.meta["rerank"][-1]


@pytest.mark.parametrize("name", NAMES)
def test_defaults_do_not_lower_cmc1(name: str) -> None:
    """20 images a class, every image a query: at its defaults no re-ranker lowers CMC@1 by more than one point (ICFRR's
    published KG 256 / KQ 250 / beta 0.5, the defaults before, cost 3.75 points here)."""
    results, emb, labels, exclude = every_image_a_query()
    context = RerankContext(queries=emb, gallery=emb, exclude=exclude, query_labels=labels, gallery_labels=labels)
    out = create_reranker(name).rerank(results, context)
    assert cmc1(out, labels, exclude) >= cmc1(results, labels, exclude) - 0.01


def test_icfrr_published_values_hurt_this_gallery() -> None:
    """The gallery of test_defaults_do_not_lower_cmc1 is one where the published ICFRR values do lower CMC@1."""
    results, emb, labels, exclude = every_image_a_query()
    context = RerankContext(queries=emb, gallery=emb, exclude=exclude)
    out = create_reranker("icfrr", **PUBLISHED["icfrr"][0]).rerank(results, context)
    assert cmc1(out, labels, exclude) < cmc1(results, labels, exclude) - 0.03


@pytest.mark.parametrize("name", NAMES)
def test_resolved_values_are_recorded(name: str) -> None:
    """The values "auto" resolved to, and the gallery shape they came from, are in the stage's meta record."""
    results, emb, labels, exclude = every_image_a_query()
    context = RerankContext(queries=emb, gallery=emb, exclude=exclude, gallery_labels=labels)
    record = create_reranker(name).rerank(results, context).meta["rerank"][-1]
    expected = {
        "kreciprocal": {"k1": 20, "k2": 6, "lambda_value": 0.5},
        "qe": {"n": 2},
        "dba": {"n": 2},
        "icfrr": {"kg": 10, "kq": 10},
    }[name]
    assert {k: record["resolved"][k] for k in expected} == expected
    assert record["resolved"]["gallery"] == {"n_gallery": 240, "class_size": 20, "min_class": 20, "from": "labels"}
    if name == "icfrr":  # beta: 0.3 x the median spread of each list's first KQ Euclidean distances
        assert 0 < record["resolved"]["beta"] < 0.5


def test_class_size_estimated_from_neighbours_without_labels() -> None:
    """Serving an upload, no labels: well-separated classes of 15 are found from the neighbour distances."""
    queries, gallery, _, _ = clustered(classes=8, per_class=15, noise=0.2)
    results = search(queries, gallery, k=len(gallery))
    record = create_reranker("qe").rerank(results, RerankContext(queries=queries, gallery=gallery)).meta["rerank"][-1]
    assert record["resolved"]["gallery"] == {"n_gallery": 120, "class_size": 15, "min_class": 15, "from": "neighbours"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["two items", "one item a class"])
def test_unfit_gallery_warns_once_and_keeps_the_list(name: str, case: str) -> None:
    """A gallery of two items, or of classes of one item: a one-line warning and the incoming list unchanged."""
    queries, gallery, _, g_labels = clustered(classes=2, per_class=1 if case == "two items" else 4)
    labels = None if case == "two items" else np.arange(len(gallery))
    results = search(queries, gallery, k=len(gallery))
    context = RerankContext(queries=queries, gallery=gallery, gallery_labels=labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = create_reranker(name).rerank(results, context)
    lines = [str(w.message) for w in caught if issubclass(w.category, LookalikeWarning)]
    assert len(lines) == 1 and "\n" not in lines[0] and lines[0].startswith(f"rerank {name}: ")
    assert lines[0].endswith("the list is left unchanged")
    np.testing.assert_array_equal(out.indices, results.indices)
    np.testing.assert_array_equal(out.distances, results.distances)
    assert "skipped" in out.meta["rerank"][-1]


def test_explicit_values_rerank_an_unfit_gallery_as_before() -> None:
    """Only "auto" gives up on a gallery: explicit values re-rank it as they always did."""
    queries, gallery, _, _ = clustered(classes=2, per_class=1)
    results = search(queries, gallery, k=len(gallery))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LookalikeWarning)
        out = create_reranker("qe", n=1).rerank(results, RerankContext(queries=queries, gallery=gallery))
    assert "skipped" not in out.meta["rerank"][-1]
