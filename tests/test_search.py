"""Exact blocked search against a dense reference and FAISS; exclusion rules; FAISS backends; saving results."""

from __future__ import annotations

import faiss
import numpy as np
import pandas as pd
import pytest

from helpers import unfiled_validation
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.results import PAD, RetrievalResults
from lookalike.core.table import validate_table
from lookalike.search import FaissIndex, exact_knn, search, search_table
from lookalike.search.exact import order_by_distance


def unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def dense_reference(q, g, k, metric, exclude=None):
    if metric == "cosine":
        d = 1 - q @ g.T
    else:
        d = np.sqrt(np.maximum(((q[:, None, :] - g[None]) ** 2).sum(-1), 0))
    if exclude is not None:
        d[exclude[0][:, None] == exclude[1][None]] = np.inf
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(d, idx, 1)


def vectors(rng, n_q, n_g, d, metric):
    """Gaussian queries and gallery, L2-normalised for cosine."""
    q, g = rng.standard_normal((n_q, d)).astype(np.float32), rng.standard_normal((n_g, d)).astype(np.float32)
    if metric == "cosine":
        q, g = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    return q, g


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_blocked_search_equals_dense_reference(metric):
    q, g = vectors(np.random.default_rng(0), 37, 101, 8, metric)
    idx, dist = exact_knn(q, g, 10, metric, query_block=5, gallery_block=7)  # many blocks, ragged edges
    ref_idx, ref_dist = dense_reference(q, g, 10, metric)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-4)
    assert (np.diff(dist, axis=1) >= 0).all()


@pytest.mark.parametrize(("metric", "k"), [("cosine", 20), ("euclidean", 20), ("cosine", 100), ("cosine", 200)])
def test_chunk_filter_keeps_every_top_k_item(metric, k):
    """Blocks of 2,000 columns: the candidate filter (chunks of 8 columns) for k = 20, a direct selection for
    k = 100 and 200; with exclusions and a ragged tail."""
    q, g = vectors(np.random.default_rng(5), 150, 5003, 16, metric)
    exclude = (np.arange(150), np.arange(5003) % 150)  # each query loses ~33 gallery items
    idx, dist = exact_knn(q, g, k, metric, exclude=exclude, query_block=64, gallery_block=2000)
    ref_idx, ref_dist = dense_reference(q, g, k, metric, exclude)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-5)
    full = dense_reference(q, g, len(g), metric, exclude)
    by_item = np.empty_like(full[1])
    np.put_along_axis(by_item, full[0], full[1], 1)  # reference distance of every gallery item
    np.testing.assert_allclose(np.take_along_axis(by_item, idx, 1), dist, atol=1e-5)  # the items have those distances
    differ = idx != ref_idx  # only swaps of two items at distances equal up to float32 rounding
    assert differ.mean() < 1e-3
    np.testing.assert_allclose(np.take_along_axis(by_item, idx, 1)[differ], ref_dist[differ], atol=1e-6)


@pytest.mark.parametrize("k", [20, 150])  # the chunk filter (its many-ties fallback), a direct selection
def test_duplicated_gallery_ties_give_the_right_distances(k):
    rng = np.random.default_rng(6)
    q, g = unit(rng, 40), np.repeat(unit(rng, 30), 100, axis=0)  # every distance occurs 100 times
    idx, dist = exact_knn(q, g, k, gallery_block=2400)
    ref = np.sort(1 - q @ g.T, axis=1)[:, :k]
    np.testing.assert_allclose(dist, ref, atol=1e-5)
    assert all(len(set(row)) == k for row in idx)  # no item twice
    np.testing.assert_allclose(1 - np.einsum("qd,qkd->qk", q, g[idx]), dist, atol=1e-5)


def test_rows_come_out_by_distance_then_gallery_position():
    index = np.array([[7, 3, PAD, 5, 2, 9]])
    dist = np.array([[0.5, -0.25, np.inf, 0.5, -0.0, 1e-30]], np.float32)
    idx, d = order_by_distance(index, dist)
    np.testing.assert_array_equal(idx, [[3, 2, 9, 5, 7, PAD]])
    np.testing.assert_array_equal(d, np.array([[-0.25, 0.0, 1e-30, 0.5, 0.5, np.inf]], np.float32))
    g = np.repeat(unit(np.random.default_rng(8), 5), 4, axis=0)  # each vector four times
    idx, _ = exact_knn(g[:1], g, 20)
    assert idx[0, :4].tolist() == [0, 1, 2, 3]  # exact ties: lower gallery position first


def test_torch_mm_path_equals_onednn_path(monkeypatch):
    from lookalike.search import exact

    rng = np.random.default_rng(7)
    q, g = unit(rng, 100, 32), unit(rng, 4000, 32)
    fast = exact_knn(q, g, 15, gallery_block=1500)
    monkeypatch.setattr(exact, "ONEDNN_LINEAR", None)
    plain = exact_knn(q, g, 15, gallery_block=1500)
    np.testing.assert_array_equal(fast[0], plain[0])
    np.testing.assert_allclose(fast[1], plain[1], atol=1e-6)


def test_same_neighbours_as_faiss_flat_ip():
    rng = np.random.default_rng(1)
    q, g = unit(rng, 200, 32), unit(rng, 3000, 32)
    idx, dist = exact_knn(q, g, 20, gallery_block=512)
    index = faiss.IndexFlatIP(32)
    index.add(g)
    sim, ref = index.search(q, 20)
    assert (idx == ref).mean() > 0.999
    np.testing.assert_allclose(dist, 1 - sim, atol=1e-5)


def test_self_exclusion_and_padding_when_k_exceeds_gallery():
    rng = np.random.default_rng(2)
    x = unit(rng, 6)
    groups = np.arange(6)
    idx, dist = exact_knn(x, x, 8, exclude=(groups, groups))
    assert not (idx[:, :5] == np.arange(6)[:, None]).any()  # nobody retrieves itself
    assert (idx[:, 5:] == PAD).all() and np.isinf(dist[:, 5:]).all()
    assert (idx[:, :5] >= 0).all()


@pytest.mark.parametrize("k", [5, 299, 400])
def test_one_hidden_item_per_query_equals_the_masked_search(k):
    """One hidden item per query at most: searched for k + 1 unmasked, then dropped; two queries hide nothing."""
    rng = np.random.default_rng(9)
    x = unit(rng, 300)
    q_groups = np.r_[np.arange(298), 999, 999]  # the last two queries hide nothing
    idx, dist = exact_knn(x, x, k, exclude=(q_groups, np.arange(300)))
    ref_idx, ref_dist = dense_reference(x, x, k, "cosine", (q_groups, np.arange(300)))
    ref_idx = np.where(np.isinf(ref_dist), PAD, ref_idx)
    pad = ((0, 0), (0, k - ref_idx.shape[1]))  # k beyond the gallery: empty slots
    ref_idx, ref_dist = np.pad(ref_idx, pad, constant_values=PAD), np.pad(ref_dist, pad, constant_values=np.inf)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-5)


def test_exclusion_against_an_empty_gallery_gives_empty_slots():
    idx, dist = exact_knn(
        np.ones((2, 4), np.float32), np.zeros((0, 4), np.float32), 3, exclude=(np.arange(2), np.arange(0))
    )
    assert (idx == PAD).all() and np.isinf(dist).all() and idx.shape == (2, 3)


def test_group_exclusion_hides_the_whole_sequence():
    rng = np.random.default_rng(3)
    q, g = unit(rng, 4), unit(rng, 12)
    q_groups, g_groups = np.array([0, 1, 2, 3]), np.repeat([0, 1, 2, 3], 3)
    idx, _ = exact_knn(q, g, 12, exclude=(q_groups, g_groups))
    for i in range(4):
        kept = idx[i][idx[i] >= 0]
        assert len(kept) == 9 and not np.isin(kept, np.flatnonzero(g_groups == i)).any()


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
def test_faiss_backend_matches_exact_search(factory):
    rng = np.random.default_rng(4)
    q, g = unit(rng, 50, 16), unit(rng, 400, 16)
    groups = (np.arange(50), np.arange(400) % 60)
    ref, _ = exact_knn(q, g, 10, exclude=groups)
    idx, dist = FaissIndex(factory, nprobe=4).add(g).search(q, 10, exclude=groups)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, ref)])
    assert recall > (0.999 if factory == "Flat" else 0.9)
    hidden = groups[1][np.maximum(idx, 0)] == groups[0][:, None]
    assert not (hidden & (idx >= 0)).any()
    assert (np.diff(dist, axis=1) >= -1e-6).all()


def test_euclidean_faiss_distances_are_not_squared():
    rng = np.random.default_rng(5)
    q, g = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((30, 8)).astype(np.float32)
    _, ref = exact_knn(q, g, 3, "euclidean")
    _, dist = FaissIndex("Flat", "euclidean").add(g).search(q, 3)
    np.testing.assert_allclose(dist, ref, rtol=1e-4)


def test_search_table_applies_the_sequence_rule(tmp_path):
    frame = pd.DataFrame(
        {
            "label": [0, 0, 0, 1, 1],
            "path": [f"{i}.png" for i in range(5)],
            "split": ["validation"] * 5,
            "is_query": ["True"] * 5,
            "is_gallery": ["True"] * 5,
            "sequence": ["a", "a", "b", "c", ""],
        }
    )
    table = validate_table(frame.astype(str), tmp_path, check_files=False)
    emb = Embeddings(np.eye(5, dtype=np.float32) + 0.1, frame["path"])
    rr = search_table(emb, table, k=5)
    got = {q: {rr.gallery_ids[j] for j in row if j >= 0} for q, row in zip(rr.query_ids, rr.indices)}
    assert got["0.png"] == {"2.png", "3.png", "4.png"}  # not itself, not 1.png (same sequence)
    assert got["4.png"] == {"0.png", "1.png", "2.png", "3.png"}  # empty sequence: only itself hidden


def test_results_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    rr = search(Embeddings(unit(rng, 3), ["a", "b", "c"]), Embeddings(unit(rng, 5), list("vwxyz")), k=4)
    rr.save(tmp_path / "r.npz")
    back = RetrievalResults.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(back.indices, rr.indices)
    np.testing.assert_array_equal(back.distances, rr.distances)
    assert back.query_ids.tolist() == ["a", "b", "c"] and back.meta["k"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["r.npz"]  # no temp file left behind


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(LookalikeError, match="metric: expected one of cosine, euclidean"):
        exact_knn(np.ones((2, 3)), np.ones((4, 3)), 2, "manhattan")
    with pytest.raises(LookalikeError, match="equal D"):
        exact_knn(np.ones((2, 3)), np.ones((4, 5)), 2)
    with pytest.raises(LookalikeError, match="cannot build 'NotAnIndex'"):
        FaissIndex("NotAnIndex").add(np.ones((4, 3), np.float32))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(LookalikeError, match="junk.npz: not a results file"):
        RetrievalResults.load(tmp_path / "junk.npz")


def clustered_validation(tmp_path, n_labels=5, per_label=6, sequences=None):
    """A validation table of unfiled images (every row query and gallery) and clustered unit embeddings for it."""
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(n_labels), per_label)
    vectors = np.eye(n_labels, 8)[labels] + 0.8 * rng.standard_normal((len(labels), 8))
    return unfiled_validation(tmp_path, labels, vectors, sequences)


def test_every_other_image_is_a_complete_ranking(tmp_path):
    """Was: search.k=939 on a 940-image set (each query sees the 939 others) reported complete_ranking false."""
    from lookalike.metrics import evaluate_table

    table, emb = clustered_validation(tmp_path)
    report = evaluate_table(search_table(emb, table, k=29), table)
    assert report.complete_ranking and report.to_dict()["complete_ranking"]
    assert not evaluate_table(search_table(emb, table, k=28), table).complete_ranking  # one visible item left out
    # sequences: 3.png..5.png share one, so those queries see 27 items; the others see 29
    sequences = ["", "", "", "s", "s", "s"] + [""] * 24
    table, emb = clustered_validation(tmp_path, sequences=sequences)
    rr = search_table(emb, table, k=29)
    assert (rr.valid.sum(1)[3:6] == 27).all() and evaluate_table(rr, table).complete_ranking


def test_k_above_the_visible_gallery_is_clamped_with_one_warning(tmp_path):
    """Was: search.k=5000 on a 940-image set gave a 940 x 5000 array, 81% padding, without a word."""
    from lookalike.core.errors import LookalikeWarning

    table, emb = clustered_validation(tmp_path)
    with pytest.warns(
        LookalikeWarning,
        match=r"^search\.k: 5000 is more than the 29 gallery items a query may see; the lists hold 29$",
    ):
        rr = search_table(emb, table, k=5000)
    assert rr.k == 29 and rr.valid.all() and rr.meta["k"] == 29 and rr.meta["k_requested"] == 5000
    with pytest.warns(LookalikeWarning, match="more than the 30 gallery items; the lists hold 30"):
        assert search(emb, emb, k=31).k == 30  # no exclusion: every gallery item
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert search_table(emb, table, k=29).meta == {"metric": "cosine", "index": "exact", "k": 29}  # nothing to say


def test_validation_scores_map_at_all_over_the_whole_ranking(tmp_path, monkeypatch):
    """Was: training's validation (table and JSON) gave mAP@all of the top search.k as map@all, with no word about
    it."""
    from lookalike import pipeline
    from lookalike.config import load_config
    from lookalike.core.errors import LookalikeWarning
    from lookalike.metrics import evaluate_table

    table, emb = clustered_validation(tmp_path)
    cfg = load_config(None, ["search.k=5"])
    report, results = pipeline.search_and_score(cfg, emb, table)
    whole = evaluate_table(search_table(emb, table, k=29), table)
    assert report.complete_ranking and results.k == 29
    assert report.means["map@all"] == pytest.approx(whole.means["map@all"])
    assert report.means["map@all"] != pytest.approx(
        evaluate_table(search_table(emb, table, k=5), table).means["map@all"]
    )
    monkeypatch.setattr(pipeline, "WHOLE_RANKING_LIMIT", 30 * 28)  # too large a split: top search.k, said in one line
    with pytest.warns(
        LookalikeWarning,
        match=r"^validation ranks the top 5 of 29 gallery items .* count relevant items beyond 5 as missed$",
    ):
        report, results = pipeline.search_and_score(cfg, emb, table)
    assert results.k == 5 and not report.complete_ranking and not report.to_dict()["complete_ranking"]
