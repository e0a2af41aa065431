"""ICFRR: the reference's example numbers, a dense oracle, candidates/chunks, the cache format, pictures, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import LOOKALIKE
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.results import PAD, RetrievalResults
from lookalike.metrics import compute_metrics
from lookalike.rerank import ICFRR, RerankContext, check_ascending, create_reranker, icfrr_iterations
from lookalike.rerank.chain import build_chain, run_chain
from lookalike.rerank.icfrr import (
    GALLERY_KNN_KEY,
    RankStrips,
    dense_gallery_distances,
    dense_query_distances,
    icfrr_cache_inputs,
    icfrr_weights,
    load_icfrr_cache,
    plot_icfrr_curve,
    reference_image_ids,
    results_from_distances,
    run_icfrr_cache,
    save_icfrr_cache,
    save_rank_strips,
    stable_order,
)
from lookalike.search import exact_knn, search

EXAMPLE = Path(__file__).resolve().parent / "data" / "icfrr_example"
EXAMPLE_MAP_ALL = [0.57577, 0.59596, 0.74314] + [0.79801] * 13 + [0.88135, 0.90635] + [1.0] * 3  # iterations 0..20


def embeddings(n: int, d: int, seed: int, prefix: str) -> Embeddings:
    """Seeded random vectors with ids prefix0, prefix1, ..."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return Embeddings(x, [f"{prefix}{i}" for i in range(n)])


def dense_oracle(qg: np.ndarray, gg: np.ndarray, kg: int, kq: int, beta: float, n_times: int) -> np.ndarray:
    """The equations on dense matrices, one query at a time (stable sorts): final rankings [Q, G]."""
    n_gallery = gg.shape[1]
    ranks = np.argsort(np.argsort(gg, axis=1, kind="stable"), axis=1, kind="stable") - 1
    w = np.array([1 - r / (n_gallery - 1) if r < kg else 0.0 for r in range(n_gallery)])
    w[n_gallery - 1] = 0.0  # rank -1 reads the last entry, which is 0 whatever KG is
    out = np.empty(qg.shape, np.int64)
    for q in range(len(qg)):
        order = np.argsort(qg[q], kind="stable")
        base = -qg[q][order].astype(np.float64)
        for _ in range(n_times):
            delta = w[ranks[order[:kq]]].mean(axis=0)
            order = order[np.argsort(-(base + beta * delta[order]), kind="stable")]
        out[q] = order
    return out


@pytest.fixture(scope="module")
def random_setup() -> tuple[RetrievalResults, Embeddings, np.ndarray, np.ndarray]:
    """Whole-list results for 12 random queries over 60 random gallery items, and the dense matrices."""
    queries, gallery = embeddings(12, 8, 0, "q"), embeddings(60, 8, 1, "g")
    results = search(queries, gallery, k=60)
    return results, gallery, dense_query_distances(results), dense_gallery_distances(gallery)


# ---------------------------------------------------------------- the reference's example


def test_reference_example_reproduced_exactly() -> None:
    records = run_icfrr_cache(EXAMPLE / "-1", kg=10, kq=15, beta=0.5, n_times=20)
    assert [r["iteration"] for r in records] == list(range(21))
    assert [round(r["map@all"], 5) for r in records] == EXAMPLE_MAP_ALL
    assert all(r["prec@25"] == pytest.approx(0.4) for r in records)


def test_reference_prec_at_k_is_hits_over_k() -> None:
    """The reference's prec@25 divides by 25; OML's precision@25 by min(25, relevant) = 10 here."""
    results, _, labels = icfrr_cache_inputs(EXAMPLE / "-1")
    ours = compute_metrics(results, labels["query"], labels["gallery"], precision_k=(25,))
    assert ours.means["precision@25"] == pytest.approx(1.0)
    assert run_icfrr_cache(EXAMPLE / "-1", kg=10, kq=15, n_times=0)[0]["prec@25"] == pytest.approx(0.4)


# ---------------------------------------------------------------- the equations


def test_weights_follow_linspace() -> None:
    np.testing.assert_allclose(icfrr_weights(4, 3), [1.0, 2 / 3, 1 / 3], rtol=1e-6)
    assert icfrr_weights(5, 2).dtype == np.float64


def test_stable_order_equals_numpy_stable() -> None:
    rng = np.random.default_rng(5)
    key = rng.integers(0, 6, (40, 30)).astype(np.float64)
    key[rng.random(key.shape) < 0.1] = np.inf
    key[rng.random(key.shape) < 0.05] = np.nan
    np.testing.assert_array_equal(stable_order(key), np.argsort(key, axis=1, kind="stable"))
    fine = 1.0 + rng.integers(0, 4, (40, 30)) * 1e-12  # equal in float32, ordered only in float64
    np.testing.assert_array_equal(stable_order(fine), np.argsort(fine, axis=1, kind="stable"))


def test_four_item_toy_by_hand() -> None:
    """G = 4, KG = 2 (w(0) = 1, w(1) = 2/3, w(2) = 0), KQ = 2, beta = 1; scores worked out by hand."""
    gg = np.array([[0.0, 0.5, 0.3, 0.9], [0.5, 0.0, 0.8, 0.2], [0.3, 0.8, 0.0, 0.6], [0.9, 0.2, 0.6, 0.0]], np.float32)
    results = results_from_distances(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
    context = RerankContext(gallery_distances=gg)
    # voters 0, 1: list of 0 = [2, 1, 3] -> delta = (1/3, 1/3, 1/2, 1/2); scores -0.1+1/3, -0.2+1/3, -0.3+1/2, -0.4+1/2
    one = ICFRR(distance="search", kg=2, kq=2, beta=1.0, n_times=1, exact=True).rerank(results, context)
    assert one.indices.tolist() == [[0, 2, 1, 3]]
    np.testing.assert_allclose(one.distances[0], [-(-0.1 + 1 / 3), -0.2, -(-0.2 + 1 / 3), -0.1], atol=1e-6)
    # voters 0, 2: list of 2 = [0, 3, 1] -> delta = (1/2, 1/3, 1/2, 1/3); the base scores stay with the positions
    two = ICFRR(distance="search", kg=2, kq=2, beta=1.0, n_times=2, exact=True).rerank(results, context)
    assert two.indices.tolist() == [[0, 2, 1, 3]]
    np.testing.assert_allclose(two.distances[0], [-0.4, -0.3, -(-0.3 + 1 / 3), -(-0.4 + 1 / 3)], atol=1e-6)


@pytest.mark.parametrize(
    ("kg", "kq", "beta", "n_times"), [(10, 15, 0.5, 6), (59, 60, 0.3, 3), (1, 1, 2.0, 4), (300, 5, 0.5, 2)]
)
def test_dense_path_matches_oracle(random_setup, kg: int, kq: int, beta: float, n_times: int) -> None:
    results, _, qg, gg = random_setup
    reranker = ICFRR(distance="search", kg=kg, kq=kq, beta=beta, n_times=n_times, exact=True)
    ours = reranker.rerank(results, RerankContext(gallery_distances=gg))
    np.testing.assert_array_equal(ours.indices, dense_oracle(qg, gg, kg, kq, beta, n_times))
    check_ascending(ours)


def test_sparse_knn_path_equals_dense_path(random_setup) -> None:
    results, gallery, _, gg = random_setup
    reranker = ICFRR(distance="search", kg=12, kq=20, beta=0.5, n_times=5, exact=True)
    from_knn = reranker.rerank(results, RerankContext(gallery=gallery))
    from_dense = reranker.rerank(results, RerankContext(gallery_distances=gg))
    np.testing.assert_array_equal(from_knn.indices, from_dense.indices)
    np.testing.assert_array_equal(from_knn.distances, from_dense.distances)
    assert from_knn.meta["rerank"][-1]["neighbours"] == "embeddings"
    assert from_dense.meta["rerank"][-1]["neighbours"] == "distances"


def test_chunking_does_not_change_anything(random_setup) -> None:
    results, gallery, _, _ = random_setup
    outs = [
        ICFRR(distance="search", beta=0.5, kg=12, kq=20, n_times=4, exact=True, chunk=c).rerank(
            results, RerankContext(gallery=gallery)
        )
        for c in (1, 5, 1024)
    ]
    for other in outs[1:]:
        np.testing.assert_array_equal(outs[0].indices, other.indices)
        np.testing.assert_array_equal(outs[0].distances, other.distances)


def test_candidates_equal_exact_when_m_covers_the_votes() -> None:
    """Tight, far-apart clusters of 20: every vote lands in the query's own cluster, the top 20 of its list."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((5, 16)).astype(np.float32) * 10
    points = np.repeat(centres, 20, axis=0) + rng.standard_normal((100, 16)).astype(np.float32)
    gallery = Embeddings(points, [f"g{i}" for i in range(100)])
    queries = Embeddings(centres + 0.1 * rng.standard_normal((5, 16)).astype(np.float32), [f"q{i}" for i in range(5)])
    results = search(queries, gallery, k=100, metric="euclidean")
    params = {"kg": 10, "kq": 8, "beta": 0.5, "n_times": 5}
    exact = ICFRR(**params, distance="search", exact=True).rerank(
        results, RerankContext(gallery=gallery, metric="euclidean")
    )
    head = ICFRR(**params, distance="search", candidates=30).rerank(
        results, RerankContext(gallery=gallery, metric="euclidean")
    )
    np.testing.assert_array_equal(head.indices, exact.indices)
    np.testing.assert_array_equal(head.distances, exact.distances)
    assert not np.array_equal(exact.indices, results.indices)  # re-ranking did something


def test_candidates_keep_the_tail(random_setup) -> None:
    results, gallery, _, _ = random_setup
    out = ICFRR(distance="search", beta=0.5, kg=12, kq=10, n_times=3, candidates=10).rerank(
        results, RerankContext(gallery=gallery)
    )
    np.testing.assert_array_equal(out.indices[:, 10:], results.indices[:, 10:])
    np.testing.assert_array_equal(out.distances[:, 10:], results.distances[:, 10:])
    assert (np.sort(out.indices[:, :10], axis=1) == np.sort(results.indices[:, :10], axis=1)).all()
    check_ascending(out)
    assert out.meta["rerank"][-1] == {
        "name": "icfrr",
        "kg": 12,
        "kq": 10,
        "beta": 0.5,
        "n_times": 3,
        "candidates": 10,
        "exact": False,
        "distance": "search",
        "m": 10,
        "neighbours": "embeddings",
        "iteration": 3,
    }


def test_self_exclusion_respected() -> None:
    """Queries are the gallery, each query's own item excluded: it never appears, the empty slot stays last."""
    items = embeddings(40, 6, 4, "x")
    own = np.arange(40)
    idx, dist = exact_knn(
        items.vectors, items.vectors, 40, exclude=(own, own)
    )  # one PAD slot per row (search() clamps to 39)
    results = RetrievalResults(idx, dist, items.ids, items.ids)
    assert (results.indices[:, -1] == PAD).all()
    out = ICFRR(distance="search", beta=0.5, kg=8, kq=10, n_times=5, exact=True).rerank(
        results, RerankContext(queries=items, gallery=items, exclude=(own, own))
    )
    assert not (out.indices == own[:, None]).any()
    assert (out.indices[:, -1] == PAD).all() and np.isinf(out.distances[:, -1]).all()
    assert (np.sort(out.indices[:, :-1], axis=1) == np.sort(results.indices[:, :-1], axis=1)).all()
    check_ascending(out)
    everyone = ICFRR(distance="search", beta=0.5, kg=8, kq=40, n_times=3, exact=True).rerank(
        results, RerankContext(gallery=items)
    )  # the empty slot votes nothing
    assert (everyone.indices[:, -1] == PAD).all() and not (everyone.indices == own[:, None]).any()
    check_ascending(everyone)


def test_ties_broken_by_gallery_position() -> None:
    """Ties go to the lower gallery position, as stable sorts do: in the first sort of the list and in the gallery
    lists. Lists of 0 and 1 (all others at 5.0): [1, 2, 3] and [0, 2, 3]; KG = 2, so w = 1, 2/3, 0 and
    delta = (0 + 1, 1 + 0, 2/3 + 2/3, 0) / 2: item 2 rises to the top, the rest keep their order."""
    gg = np.full((4, 4), 5.0, np.float32)
    np.fill_diagonal(gg, 0.0)
    results = RetrievalResults(np.array([[3, 1, 2, 0]]), np.array([[1.0, 1.0, 1.0, 1.0]]), ["q"], list("abcd"))
    context = RerankContext(gallery_distances=gg)
    assert ICFRR(distance="search", beta=0.5, kg=2, kq=2, n_times=0, exact=True).rerank(
        results, context
    ).indices.tolist() == [[0, 1, 2, 3]]
    out = ICFRR(distance="search", beta=0.5, kg=2, kq=2, n_times=1, exact=True).rerank(results, context)
    assert out.indices.tolist() == [[2, 0, 1, 3]]
    np.testing.assert_allclose(out.distances[0], [1 - 0.5 * 2 / 3, 1 - 0.25, 1 - 0.25, 1.0], atol=1e-6)


def test_iterations_generator_and_cache_reuse(random_setup) -> None:
    results, gallery, _, _ = random_setup
    context = RerankContext(gallery=gallery)
    steps = list(icfrr_iterations(results, context, distance="search", beta=0.5, kg=12, kq=20, n_times=4, exact=True))
    assert [s.meta["rerank"][-1]["iteration"] for s in steps] == [1, 2, 3, 4]
    cached = context.cache[GALLERY_KNN_KEY]["indices"]
    final = ICFRR(distance="search", beta=0.5, kg=12, kq=20, n_times=4, exact=True).rerank(results, context)
    assert context.cache[GALLERY_KNN_KEY]["indices"] is cached  # reused, not rebuilt
    np.testing.assert_array_equal(final.indices, steps[-1].indices)
    ICFRR(distance="search", beta=0.5, kg=5, kq=20, n_times=1, exact=True).rerank(results, context)
    assert context.cache[GALLERY_KNN_KEY]["indices"] is cached  # a shorter list is a prefix of the cached one


def test_registry_and_zero_iterations(random_setup) -> None:
    results, gallery, _, _ = random_setup
    reranker = create_reranker("icfrr", kg=4, kq=4, n_times=0, distance="search")
    out = reranker.rerank(results, RerankContext(gallery=gallery))
    np.testing.assert_array_equal(out.indices, results.indices)
    assert out.indices.shape == results.indices.shape and out.distances.dtype == np.float32


# ---------------------------------------------------------------- the cache format


def test_cache_round_trip_and_same_rankings(tmp_path: Path, random_setup) -> None:
    results, gallery, qg, gg = random_setup
    labels = {"query": np.arange(12) % 3, "gallery": np.arange(60) % 3}
    save_icfrr_cache(tmp_path / "c", results, gallery, labels, metric="cosine")
    qg_t, gg_t, labels_t = load_icfrr_cache(tmp_path / "c")
    np.testing.assert_array_equal(qg_t.numpy(), qg)
    np.testing.assert_array_equal(gg_t.numpy(), gg)
    assert labels_t["query"].dtype == torch.int64 and labels_t["gallery"].tolist() == labels["gallery"].tolist()
    cached, context, _ = icfrr_cache_inputs(tmp_path / "c")
    reranker = ICFRR(distance="search", beta=0.5, kg=12, kq=20, n_times=5, exact=True)
    from_embeddings = reranker.rerank(results, RerankContext(gallery=gallery))
    np.testing.assert_array_equal(reranker.rerank(cached, context).indices, from_embeddings.indices)
    records = run_icfrr_cache(tmp_path / "c", kg=12, kq=20, n_times=2)
    assert [r["iteration"] for r in records] == [0, 1, 2] and {"map@all", "map@200", "prec@100"} <= set(records[0])
    save_icfrr_cache(tmp_path / "c", qg, torch.from_numpy(gg))  # from matrices, no labels: the stale labels go
    assert load_icfrr_cache(tmp_path / "c")[2] is None
    assert [set(r) for r in run_icfrr_cache(tmp_path / "c", kg=4, kq=4, n_times=1)] == [{"iteration"}] * 2


def test_string_labels_are_coded(tmp_path: Path) -> None:
    save_icfrr_cache(
        tmp_path, np.zeros((2, 3)), np.zeros((3, 3)), {"query": ["cat", "dog"], "gallery": ["dog", "cat", "cat"]}
    )
    labels = load_icfrr_cache(tmp_path)[2]
    assert labels["query"].tolist() == [0, 1] and labels["gallery"].tolist() == [1, 0, 0]


def test_cache_errors(tmp_path: Path) -> None:
    with pytest.raises(LookalikeError, match="no such ICFRR cache folder"):
        load_icfrr_cache(tmp_path / "absent")
    torch.save(torch.zeros(2, 3), tmp_path / "qg_dists.pth")
    with pytest.raises(LookalikeError, match="gg_dists.pth: missing"):
        load_icfrr_cache(tmp_path)
    torch.save(torch.zeros(3, 4), tmp_path / "gg_dists.pth")
    with pytest.raises(LookalikeError, match=r"gg_dists.pth: expected \[G, G\] = \[3, 3\]"):
        load_icfrr_cache(tmp_path)
    torch.save(torch.zeros(3, dtype=torch.long), tmp_path / "gg_dists.pth")
    with pytest.raises(LookalikeError, match="expected a floating-point distance tensor"):
        load_icfrr_cache(tmp_path)
    (tmp_path / "gg_dists.pth").write_bytes(b"not a torch file")
    with pytest.raises(LookalikeError, match="gg_dists.pth: not a torch file"):
        load_icfrr_cache(tmp_path)
    torch.save(torch.zeros(3, 3), tmp_path / "gg_dists.pth")
    torch.save(
        {"query": torch.zeros(2, dtype=torch.long), "gallery": torch.zeros(4, dtype=torch.long)},
        tmp_path / "labels.pth",
    )
    with pytest.raises(LookalikeError, match="'gallery' must be an integer tensor of length 3"):
        load_icfrr_cache(tmp_path)
    torch.save([1, 2], tmp_path / "labels.pth")
    with pytest.raises(LookalikeError, match="labels.pth: expected a dict"):
        load_icfrr_cache(tmp_path)


def test_save_errors(tmp_path: Path, random_setup) -> None:
    results, gallery, qg, _ = random_setup
    with pytest.raises(LookalikeError, match=r"qg: results must list the whole gallery \(K = G = 60\)"):
        save_icfrr_cache(tmp_path, results.top(10), gallery)
    with pytest.raises(LookalikeError, match=r"gg: expected \[G, G\] = \[60, 60\]"):
        save_icfrr_cache(tmp_path, qg, np.zeros((5, 5)))
    with pytest.raises(LookalikeError, match="labels: expected 12 query and 60 gallery labels"):
        save_icfrr_cache(tmp_path, qg, gallery, {"query": [1], "gallery": [1]})
    assert not (tmp_path / "qg_dists.pth").exists()  # nothing written when the input is bad
    with pytest.raises(LookalikeError, match="ids: expected 12 query and 60 gallery ids, got 12 and 3"):
        results_from_distances(qg, gallery_ids=["a", "b", "c"])


# ---------------------------------------------------------------- errors of the re-ranker


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"kg": 0}, "kg must be a positive integer"),
        ({"kq": 300, "candidates": 200}, r"candidates must be >= kq \(300\)"),
        ({"beta": -1.0}, "beta must be a finite number >= 0"),
        ({"n_times": -1}, "n_times must be an integer >= 0"),
        ({"chunk": 0}, "chunk must be a positive integer"),
        ({"colour": 1}, "rerank icfrr: .*colour"),
        ({"distance": "manhattan"}, "distance must be one of euclidean, cosine, search, got 'manhattan'"),
    ],
)
def test_bad_parameters(params: dict, message: str) -> None:
    with pytest.raises(LookalikeError, match=message):
        create_reranker("icfrr", **params)


def test_missing_or_mismatched_context(random_setup) -> None:
    results = random_setup[0]
    with pytest.raises(LookalikeError, match="rerank icfrr: needs gallery"):
        ICFRR(distance="search").rerank(results, RerankContext())
    with pytest.raises(LookalikeError, match=r"gallery_distances must be \[G, G\] = \[60, 60\]"):
        ICFRR(distance="search").rerank(results, RerankContext(gallery_distances=np.zeros((5, 5))))
    with pytest.raises(LookalikeError, match="10 gallery embeddings for results over 60 gallery items"):
        ICFRR(distance="search").rerank(results, RerankContext(gallery=embeddings(10, 8, 0, "g")))
    with pytest.raises(
        LookalikeError, match="distance=euclidean needs the query and gallery embeddings; give distance=search"
    ):
        ICFRR().rerank(results, RerankContext(gallery_distances=np.zeros((60, 60))))
    queries = embeddings(12, 8, 0, "q")
    with pytest.raises(LookalikeError, match="10 gallery embeddings for results over 60 gallery items"):
        ICFRR(distance="cosine").rerank(results, RerankContext(queries=queries, gallery=embeddings(10, 8, 0, "g")))


# ---------------------------------------------------------------- pictures


def test_curve_and_rank_strips(tmp_path: Path) -> None:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (12, 12), colour).save(tmp_path / f"g{i}.png")
    Image.new("RGB", (12, 12), colours[0]).save(tmp_path / "q0.png")
    results = results_from_distances(np.array([[0.1, 0.2, 0.3, 0.4]]), ["q0.png"], [f"g{i}.png" for i in range(4)])
    strips = save_rank_strips(
        results, tmp_path / "strips.png", tmp_path, np.array([0]), np.array([0, 1, 0, 1]), top_k=3
    )
    records = [
        {"iteration": i, "map@all": 0.5 + 0.1 * i, "map@200": 0.5, "prec@100": 0.2, "prec@200": 0.1} for i in range(3)
    ]
    curve = plot_icfrr_curve(records, tmp_path / "curve.png")
    for path in (strips, curve):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 100
    with pytest.raises(LookalikeError, match="records: expected per-iteration records"):
        plot_icfrr_curve([{"iteration": 0}], tmp_path / "bad.png")


# ---------------------------------------------------------------- fidelity to the reference's command (issue 16)


def lookalike(*args: object) -> subprocess.CompletedProcess:
    """The real `lookalike` command beside this Python."""
    return subprocess.run([LOOKALIKE, *map(str, args)], check=False, capture_output=True, text=True, timeout=300)


def clustered(n: int, seed: int, prefix: str, centres: np.ndarray) -> tuple[Embeddings, np.ndarray]:
    """Unit vectors around random centres (as the reference's L2-normalised features) and their cluster labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(centres), n)
    x = centres[labels] + 0.9 * rng.standard_normal((n, centres.shape[1]))
    return Embeddings(
        (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), [f"{prefix}{i}" for i in range(n)]
    ), labels


def test_chain_on_embeddings_equals_icfrr_command_on_their_cache(tmp_path: Path) -> None:
    """The reference adds its votes to torch.cdist (Euclidean) distances: the chain's default does too, so a cosine
    search re-ranked in a chain ranks every query as `lookalike icfrr` does on the Euclidean cache of the same
    vectors."""
    centres = np.random.default_rng(9).standard_normal((6, 16))
    (queries, q_labels), (gallery, g_labels) = clustered(30, 1, "q", centres), clustered(120, 2, "g", centres)
    results = search(queries, gallery, k=120)  # search.metric's default: cosine
    params = {"kg": 10, "kq": 15, "n_times": 5, "beta": 0.5}
    chain = run_chain(results, RerankContext(queries=queries, gallery=gallery), build_chain([{"icfrr": params}]))
    save_icfrr_cache(
        tmp_path / "cache", queries, gallery, {"query": q_labels, "gallery": g_labels}
    )  # the reference's cdist
    done = lookalike("icfrr", tmp_path / "cache", "--kg", 10, "--kq", 15, "--n-times", 5, "--output", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "out" / "rankings.npz") as rankings:
        np.testing.assert_array_equal(chain[-1].results.indices, rankings["reranking_iter_5"])
    cosine_base = ICFRR(**params, distance="search").rerank(results, RerankContext(queries=queries, gallery=gallery))
    assert (cosine_base.indices != chain[-1].results.indices).any(
        axis=1
    ).sum() >= 20  # the old default ranked otherwise
    cosine = ICFRR(**params, distance="cosine").rerank(results, RerankContext(queries=queries, gallery=gallery))
    np.testing.assert_array_equal(
        cosine.indices, cosine_base.indices
    )  # cosine from the vectors = the cosine search's own


def test_save_cache_defaults_to_euclidean_like_torch_cdist(tmp_path: Path) -> None:
    queries, gallery = embeddings(5, 8, 0, "q"), embeddings(9, 8, 1, "g")
    save_icfrr_cache(tmp_path, queries, gallery)
    qg, gg, _ = load_icfrr_cache(tmp_path)
    q, g = torch.from_numpy(queries.vectors), torch.from_numpy(gallery.vectors)
    np.testing.assert_allclose(qg.numpy(), torch.cdist(q, g).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        gg.numpy(), torch.cdist(g, g).numpy(), rtol=1e-5, atol=2e-3
    )  # exact search: |g|² - 2 g.g + |g|²
    with pytest.raises(LookalikeError, match="qg: query embeddings need the gallery embeddings as gg"):
        save_icfrr_cache(tmp_path, queries, np.zeros((9, 9)))


def test_icfrr_command_without_labels_writes_rankings_of_every_iteration(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("qg_dists.pth", "gg_dists.pth"):
        shutil.copy(EXAMPLE / "-1" / name, cache / name)
    done = lookalike("icfrr", cache, "--kg", 10, "--kq", 15, "--n-times", 3, "--output", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "no metrics" in done.stdout and not (tmp_path / "out" / "metrics.json").exists()
    results, context, _ = icfrr_cache_inputs(cache)
    steps = [
        results,
        *ICFRR(beta=0.5, kg=10, kq=15, n_times=3, exact=True, distance="search").iterations(results, context),
    ]
    with np.load(tmp_path / "out" / "rankings.npz") as rankings:
        assert sorted(rankings.files) == [f"reranking_iter_{i}.npy".removesuffix(".npy") for i in range(4)]
        for i, step in enumerate(steps):
            from_torch = torch.load(tmp_path / "out" / "ranks" / f"reranking_iter_{i}.pth", weights_only=True)
            assert from_torch.dtype == torch.int64 and from_torch.shape == (1, 50)
            np.testing.assert_array_equal(from_torch.numpy(), step.indices)
            np.testing.assert_array_equal(rankings[f"reranking_iter_{i}"], step.indices)
    qg = torch.load(cache / "qg_dists.pth", weights_only=True)
    np.testing.assert_array_equal(
        steps[0].indices, torch.argsort(qg, stable=True).numpy()
    )  # iteration 0: the cache's order


def test_icfrr_command_reads_the_reference_layout_and_draws_rank_strips(tmp_path: Path) -> None:
    """The quickstart's command line, in the reference's spelling: CACHE_ROOT/custom/-1, images in query/ and gallery/
    numbered as labels.json lists them; rank strips after every iteration, results in OUTPUT/custom/-1."""
    shutil.copytree(EXAMPLE / "-1", tmp_path / "examples" / "custom" / "-1")
    images = tmp_path / "images"
    names = json.loads((EXAMPLE / "labels.json").read_text())
    for split, files in names.items():
        for i, name in enumerate(files):
            (images / split).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (10, 10), (5 * i, 100, 200)).save(images / split / name, format="PNG")
    shutil.copy(EXAMPLE / "labels.json", images / "labels.json")
    done = lookalike(
        "icfrr",
        "--dataset",
        "custom",
        "--cache_root",
        tmp_path / "examples",
        "--n_times",
        20,
        "--KG",
        10,
        "--KQ",
        15,
        "--rerank_results_dir",
        tmp_path / "results",
        "--query_idxs_to_vis",
        0,
        "--num_gallery_ims_to_vis",
        5,
        "--image-root",
        images,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "results" / "custom" / "-1"
    records = json.loads((out / "metrics.json").read_text())
    assert [round(r["map@all"], 5) for r in records] == EXAMPLE_MAP_ALL and "prec@200" in records[0]
    for i in range(21):
        with Image.open(out / "vis" / f"reranking_iter_{i}.png") as strip:
            assert strip.width > strip.height > 50
    assert (out / "icfrr_curve.png").stat().st_size > 1000 and (out / "ranks" / "reranking_iter_20.pth").is_file()


def test_icfrr_command_errors_are_one_line(tmp_path: Path) -> None:
    """Bad choices of what to draw or where the cache is: one line, exit 2, nothing written (in-process: the same
    command)."""
    from typer.testing import CliRunner

    from lookalike.cli import app

    images = tmp_path / "images"
    for split, n in (("query", 1), ("gallery", 50)):
        (images / split).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(images / split / f"{i:02d}.png")
    cases = [
        (
            ["--query-idxs-to-vis", "0,3", "--image-root", images],
            "--query-idxs-to-vis: query 3 is not a row of the cache (it has 1 queries: 0..0)",
        ),
        (
            ["--query-idxs-to-vis", "x", "--image-root", images],
            "--query-idxs-to-vis: expected query numbers (cache rows), got 'x'",
        ),
        (
            ["--query-idxs-to-vis", "0"],
            "--query-idxs-to-vis: needs --image-root, the folder holding the query/ and gallery/ images",
        ),
        (["--query-idxs-to-vis", "0", "--image-root", tmp_path], f"{tmp_path / 'query'}: no such folder"),
        (["--dataset", "custom"], "icfrr: give a cache folder, or --cache-root and --dataset"),
    ]
    for args, message in cases:
        done = CliRunner().invoke(
            app, ["icfrr", str(EXAMPLE / "-1"), "--n-times", "1", "--output", str(tmp_path / "out"), *map(str, args)]
        )
        assert done.exit_code == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, (
            done.stderr
        )
        assert not (tmp_path / "out").exists()
    (images / "gallery" / "00.png").unlink()
    done = CliRunner().invoke(
        app, ["icfrr", str(EXAMPLE / "-1"), "--query-idxs-to-vis", "0", "--image-root", str(images)]
    )
    assert done.exit_code == 2 and f"{images / 'gallery'}: 49 images for the cache's 50 gallery items" in done.stderr


def test_rank_strips_of_a_sketch_dataset_follow_its_zero_shot_lists(tmp_path: Path) -> None:
    """--dataset tuberlin: rows are the zero list's sketches and columns its photos; per_class keeps the first of each
    class number, class by class (the reference's per_class); strips are drawn after every iteration."""
    root = tmp_path / "TUBerlin"
    lists = {
        "png_ready": [("png_ready/cow/1.png", 1), ("png_ready/bee/2.png", 0), ("png_ready/cow/3.png", 1)],
        "ImageResized_ready": [
            ("ImageResized_ready/cow/a.jpg", 1),
            ("ImageResized_ready/bee/b.jpg", 0),
            ("ImageResized_ready/bee/c.jpg", 0),
        ],
    }
    for prefix, rows in lists.items():
        (root / "zeroshot").mkdir(parents=True, exist_ok=True)
        (root / "zeroshot" / f"{prefix}_filelist_zero.txt").write_text("".join(f"{p} {n}\n" for p, n in rows))
        for i, (path, _) in enumerate(rows):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (10, 10), (40 * i, 90, 9)).save(root / path)
    assert reference_image_ids(root, 3, 3, "tuberlin") == (
        [p for p, _ in lists["png_ready"]],
        [p for p, _ in lists["ImageResized_ready"]],
    )
    queries, gallery = reference_image_ids(root, 2, 2, "tuberlin", per_class=1)
    assert queries == ["png_ready/bee/2.png", "png_ready/cow/1.png"] and gallery == [
        "ImageResized_ready/bee/b.jpg",
        "ImageResized_ready/cow/a.jpg",
    ]
    with pytest.raises(LookalikeError, match=r"png_ready_filelist_zero\.txt: 3 images for the cache's 4 query items"):
        reference_image_ids(root, 4, 3, "tuberlin")
    with pytest.raises(LookalikeError, match=r"zeroshot1/sketch_tx_000000000000_ready_filelist_zero\.txt: missing"):
        reference_image_ids(root, 3, 3, "sketchy_zs1")
    save_icfrr_cache(
        tmp_path / "cache", np.array([[0.1, 0.2, 0.3], [0.3, 0.1, 0.2], [0.2, 0.3, 0.1]]), np.ones((3, 3)) - np.eye(3)
    )
    ids = reference_image_ids(root, 3, 3, "tuberlin")
    strips = RankStrips(root, *ids, queries=[0, 2], top_k=2)
    run_icfrr_cache(tmp_path / "cache", kg=2, kq=2, n_times=2, output=tmp_path / "out", strips=strips)
    assert sorted(p.name for p in (tmp_path / "out" / "vis").iterdir()) == [f"reranking_iter_{i}.png" for i in range(3)]
