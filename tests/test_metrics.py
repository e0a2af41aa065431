"""Metrics against hand-computed values, with Open Metric Learning's definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lookalike.core.errors import LookalikeError
from lookalike.core.results import PAD, RetrievalResults
from lookalike.metrics import cmc_curve, compute_metrics, count_relevant


def results(indices, n_gallery, distances=None) -> RetrievalResults:
    idx = np.asarray(indices, dtype=np.int64)
    dist = np.tile(np.arange(idx.shape[1], dtype=np.float32), (len(idx), 1)) if distances is None else distances
    dist = np.where(idx == PAD, np.inf, dist)
    return RetrievalResults(idx, dist, np.arange(len(idx)), np.arange(n_gallery))


def test_hand_computed_single_query():
    # gallery labels by position: relevant items (label 7) at positions 1 and 3 -> ranks 1 and 3 below
    g = np.array([0, 7, 0, 7, 5])
    rr = results([[1, 0, 3, 2, 4]], 5)
    m = compute_metrics(rr, np.array([7]), g, cmc_k=(1, 2), precision_k=(1, 2, 3), map_k=(1, 2, 3, 5)).per_query
    assert m["cmc@1"][0] == 1 and m["cmc@2"][0] == 1
    assert m["precision@1"][0] == 1.0
    assert m["precision@2"][0] == pytest.approx(1 / 2)
    assert m["precision@3"][0] == pytest.approx(2 / 2)
    assert m["map@1"][0] == 1.0
    assert m["map@2"][0] == 1.0  # one relevant item within top 2, precision@1 = 1
    assert m["map@3"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert m["map@all"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert m["r_precision"][0] == pytest.approx(1 / 2)


def test_precision_divides_by_min_k_and_relevant():
    g = np.array([1, 1, 1, 0, 0, 0])
    rr = results([[3, 0, 4, 1, 5, 2]], 6)
    m = compute_metrics(rr, np.array([1]), g, cmc_k=(1,), precision_k=(2, 5), map_k=(5,)).per_query
    assert m["cmc@1"][0] == 0
    assert m["precision@2"][0] == pytest.approx(1 / 2)
    assert m["precision@5"][0] == pytest.approx(2 / 3)  # 2 hits in top 5, min(5, 3 relevant) = 3
    assert m["map@5"][0] == pytest.approx((1 / 2 + 2 / 4) / 2)  # divided by hits within top 5, not by 3
    assert m["map@all"][0] == pytest.approx((1 / 2 + 2 / 4 + 3 / 6) / 3)


def test_query_with_no_relevant_item_is_reported_and_excluded():
    g = np.array([0, 0, 1])
    rr = results([[0, 1, 2], [2, 0, 1]], 3)
    report = compute_metrics(rr, np.array([0, 9]), g, cmc_k=(1,), precision_k=(1,), map_k=(1,))
    assert np.isnan(report.per_query["cmc@1"][1])
    assert report.no_relevant_ids == ["1"]
    assert report.n_evaluated == 1
    assert report.means["cmc@1"] == 1.0  # not dragged to 0.5 by the query without a match


def test_all_relevant():
    rr = results([[0, 1, 2, 3]], 4)
    m = compute_metrics(rr, np.array([2]), np.full(4, 2), cmc_k=(1,), precision_k=(4,), map_k=(4,)).means
    assert m == pytest.approx({"cmc@1": 1, "precision@4": 1, "map@4": 1, "map@all": 1, "r_precision": 1})


def test_ties_follow_the_stored_order():
    g = np.array([1, 0])
    same_distance = np.zeros((1, 2), dtype=np.float32)
    wrong_first = compute_metrics(
        results([[1, 0]], 2, same_distance), np.array([1]), g, cmc_k=(1,), precision_k=(1,), map_k=(2,)
    )
    right_first = compute_metrics(
        results([[0, 1]], 2, same_distance), np.array([1]), g, cmc_k=(1,), precision_k=(1,), map_k=(2,)
    )
    assert wrong_first.means["cmc@1"] == 0 and wrong_first.means["map@2"] == pytest.approx(0.5)
    assert right_first.means["cmc@1"] == 1 and right_first.means["map@2"] == 1


def test_sequence_exclusion_lowers_the_relevant_count():
    # query 0 (label 3, sequence 10); gallery: same label in sequences 10, 10, 11; other label in 11
    g_labels, g_groups = np.array([3, 3, 3, 4]), np.array([10, 10, 11, 11])
    q_labels, q_groups = np.array([3]), np.array([10])
    n_rel = count_relevant(q_labels, g_labels, (q_groups, g_groups))
    assert n_rel.tolist() == [1]
    rr = results([[2, 3, PAD, PAD]], 4)  # search hid the two same-sequence items
    m = compute_metrics(
        rr, q_labels, g_labels, cmc_k=(1,), precision_k=(2,), map_k=(2,), exclude=(q_groups, g_groups)
    ).means
    assert m["precision@2"] == 1.0  # 1 hit / min(2, 1); without the exclusion it would be 1/2
    assert m["map@all"] == 1.0


def test_only_same_sequence_matches_means_no_relevant_item():
    rr = results([[1, PAD]], 2)
    report = compute_metrics(rr, np.array([5]), np.array([5, 6]), exclude=(np.array([1]), np.array([1, 2])))
    assert report.no_relevant_ids == ["0"]


def test_k_larger_than_gallery_pads_and_still_counts():
    rr = results([[1, 0, PAD, PAD, PAD]], 2)
    m = compute_metrics(rr, np.array([1]), np.array([2, 1]), cmc_k=(1, 10), precision_k=(5,), map_k=(10,))
    assert m.per_query["cmc@10"][0] == 1.0
    assert m.per_query["precision@5"][0] == 1.0
    assert m.per_query["map@10"][0] == 1.0
    assert m.complete_ranking


def test_truncated_ranking_is_flagged():
    rr = results([[0, 1]], 4)
    report = compute_metrics(rr, np.array([1]), np.array([1, 0, 1, 1]))
    assert not report.complete_ranking
    assert report.per_query["map@all"][0] == pytest.approx(1 / 3)  # two relevant items never retrieved


def test_string_labels_and_per_category():
    rr = results([[0, 1], [0, 1]], 2)
    report = compute_metrics(
        rr,
        np.array(["cat", "dog"]),
        np.array(["cat", "dog"]),
        cmc_k=(1,),
        precision_k=(1,),
        map_k=(1,),
        query_categories=np.array(["a", "b"]),
    )
    assert report.per_category["a"]["cmc@1"] == 1.0
    assert report.per_category["b"]["cmc@1"] == 0.0


def test_inconsistent_relevant_count_is_an_error():
    with pytest.raises(LookalikeError, match="retrieves 2 relevant items but has only 1"):
        compute_metrics(results([[0, 1]], 2), np.array([1]), np.array([1, 1]), n_relevant=np.array([1]))


def test_cmc_curve_and_json(tmp_path):
    rr = results([[1, 0], [0, 1]], 2)
    report = compute_metrics(rr, np.array([0, 0]), np.array([0, 1]))
    assert cmc_curve(report.relevance, report.n_relevant).tolist() == [0.5, 1.0]
    report.save(tmp_path / "m.json")
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["means"]["cmc@1"] == 0.5 and saved["n_queries"] == 2
