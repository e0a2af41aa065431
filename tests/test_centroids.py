"""Gallery centroids (CTL): hand-computed means, per-sequence groups, leave-one-out, the same-camera rule, metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError, LookalikeWarning
from lookalike.core.protocol import exclusion_groups
from lookalike.core.results import PAD
from lookalike.core.table import validate_table
from lookalike.search import evaluate_centroids, gallery_centroids, search_centroids, search_table


def make_table(tmp_path, labels, sequences=None, is_query=None, is_gallery=None):
    n = len(labels)
    columns = {
        "label": list(labels),
        "path": [f"{i}.png" for i in range(n)],
        "split": ["validation"] * n,
        "is_query": [True] * n if is_query is None else list(is_query),
        "is_gallery": [True] * n if is_gallery is None else list(is_gallery),
    }
    if sequences is not None:
        columns["sequence"] = ["" if s is None else s for s in sequences]
    return validate_table(pd.DataFrame(columns).astype(str), tmp_path, check_files=False)


def embeddings_of(vectors) -> Embeddings:
    vectors = np.asarray(vectors, dtype=np.float32)
    return Embeddings(vectors, [f"{i}.png" for i in range(len(vectors))])


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def by_id(results, distances: bool = False) -> dict[str, list]:
    """Per query id, the retrieved gallery ids (or (id, distance) pairs), empty slots left out."""
    out = {}
    for q, row, dist in zip(results.query_ids, results.indices, results.distances):
        out[q] = [
            (results.gallery_ids[j], float(d)) if distances else results.gallery_ids[j]
            for j, d in zip(row, dist)
            if j != PAD
        ]
    return out


def test_centroids_are_normalised_means_of_the_raw_vectors():
    gallery = embeddings_of([[2, 0], [0, 1], [3, 4], [1, 1], [0, 4]])
    c = gallery_centroids(gallery, np.array(["a", "a", "b", "c", "b"]))
    assert c.embeddings.ids.tolist() == ["label=a", "label=b", "label=c"]
    assert c.labels.tolist() == ["a", "b", "c"] and c.counts.tolist() == [2, 2, 1] and c.groups.tolist() == [-1, -1, -1]
    # mean of raw vectors, then normalised: a -> (1, 0.5), not the mean of the normalised (1, 0) and (0, 1)
    np.testing.assert_allclose(c.embeddings.vectors, [unit([1, 0.5]), unit([1.5, 4]), unit([1, 1])], atol=1e-6)
    raw = gallery_centroids(gallery, np.array(["a", "a", "b", "c", "b"]), normalize=False)
    np.testing.assert_allclose(raw.embeddings.vectors, [[1, 0.5], [1.5, 4], [1, 1]], atol=1e-6)


def test_per_sequence_centroids_group_by_label_and_sequence():
    gallery = embeddings_of([[1, 0], [0, 1], [3, 0], [1, 1], [2, 2]])
    labels = np.array([7, 7, 7, 8, 7])
    c = gallery_centroids(
        gallery, labels, np.array(["7_c1", "7_c2", "7_c1", "8_c1", None], dtype=object), normalize=False
    )
    assert c.embeddings.ids.tolist() == [
        "label=7|sequence=7_c1",
        "label=7|sequence=7_c2",
        "label=8|sequence=8_c1",
        "label=7|sequence=item:4.png",
    ]
    np.testing.assert_allclose(c.embeddings.vectors, [[2, 0], [0, 1], [1, 1], [2, 2]])
    assert c.counts.tolist() == [2, 1, 1, 1] and c.labels.tolist() == [7, 7, 8, 7]
    assert len(set(c.groups.tolist())) == 4  # the item without a sequence is its own group
    # integer sequences are group codes, kept as they are (so they can match exclusion_groups' codes)
    coded = gallery_centroids(gallery, labels, np.array([10, 11, 10, 12, 13]))
    assert coded.groups.tolist() == [10, 11, 12, 13]
    # the same sequence under two labels gives two centroids
    shared = gallery_centroids(gallery, np.array([1, 2, 1, 2, 1]), np.array(["s", "s", "s", "s", "t"]))
    assert shared.counts.tolist() == [2, 2, 1] and shared.groups.tolist() == [0, 0, 1]


def test_leave_one_out_distances_by_hand(tmp_path):
    vectors = [[1, 0], [0.6, 0.8], [0, 1], [-1, 0], [0.8, -0.6]]
    table = make_table(tmp_path, ["a", "a", "b", "b", "c"])
    results, c_labels, n_rel = search_centroids(embeddings_of(vectors), table, k=3)
    assert results.gallery_ids.tolist() == ["label=a", "label=b", "label=c"] and c_labels.tolist() == ["a", "b", "c"]
    got = by_id(results, distances=True)
    b_plain = unit([-0.5, 0.5])
    a_plain = unit([0.8, 0.4])
    # query 0: its label centroid without itself is (0.6, 0.8); b and c are the plain centroids
    expected0 = [("label=c", 1 - 0.8), ("label=a", 1 - 0.6), ("label=b", 1 - b_plain[0])]
    # query 2: b without itself is (-1, 0)
    expected2 = [("label=a", 1 - a_plain[1]), ("label=b", 1.0), ("label=c", 1 + 0.6)]
    # query 4 is the only c: its own centroid does not exist for it; the last slot stays empty
    expected4 = [("label=a", 1 - unit([0.8, -0.6]) @ a_plain), ("label=b", 1 - unit([0.8, -0.6]) @ b_plain)]
    for q, expected in (("0.png", expected0), ("2.png", expected2), ("4.png", expected4)):
        assert [g for g, _ in got[q]] == [g for g, _ in expected]
        np.testing.assert_allclose([d for _, d in got[q]], [d for _, d in expected], atol=1e-6)
    assert results.indices[4, 2] == PAD and np.isinf(results.distances[4, 2])
    assert n_rel.tolist() == [1, 1, 1, 1, 0]
    assert (np.diff(results.distances, axis=1)[:, :2] >= 0).all()


def test_query_outside_the_gallery_sees_the_plain_centroid(tmp_path):
    vectors = [[1, 0], [0.6, 0.8], [0, 1], [0.5, 0.5]]
    table = make_table(
        tmp_path, [1, 1, 2, 1], is_query=[False, False, False, True], is_gallery=[True, True, True, False]
    )
    results, _, n_rel = search_centroids(embeddings_of(vectors), table, k=2)
    got = by_id(results, distances=True)["3.png"]
    assert got[0][0] == "label=1" and got[0][1] == pytest.approx(1 - unit([0.5, 0.5]) @ unit([0.8, 0.4]), abs=1e-6)
    assert n_rel.tolist() == [1]


def reference(vectors, labels, groups, is_query, is_gallery, k, per_sequence):
    """Brute force, one query at a time: centroid distances with the query's group left out as the module promises."""
    vectors, labels, groups = np.asarray(vectors, np.float64), np.asarray(labels), np.asarray(groups)
    g = np.flatnonzero(is_gallery)
    keys = sorted({(labels[i], groups[i] if per_sequence else -1) for i in g})
    rows = []
    for q in np.flatnonzero(is_query):
        qv = unit(vectors[q])
        dists = {}
        for label, group in keys:
            members = [i for i in g if labels[i] == label and (not per_sequence or groups[i] == group)]
            if per_sequence and group == groups[q]:
                continue
            if not per_sequence and label == labels[q]:
                members = [i for i in members if groups[i] != groups[q]]
            if members:
                dists[(label, group)] = 1 - qv @ unit(vectors[members].mean(0))
        order = sorted(dists, key=dists.get)[:k]
        rows.append([(key[0], dists[key]) for key in order])
    return rows


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("k", [4, 50])
def test_matches_a_brute_force_reference(tmp_path, per_sequence, k):
    rng = np.random.default_rng(0)
    n = 60
    labels = rng.integers(0, 8, n)
    sequences = [None if rng.random() < 0.3 else f"{lab}_c{rng.integers(0, 3)}" for lab in labels]
    is_query, is_gallery = rng.random(n) < 0.6, rng.random(n) < 0.8
    is_query[0], is_gallery[0] = True, True
    vectors = rng.standard_normal((n, 6))
    table = make_table(tmp_path, labels, sequences, is_query, is_gallery)
    ids = np.array([f"{i}.png" for i in range(n)])
    groups = np.empty(n, np.int64)
    groups[:] = exclusion_groups(table, ids, ids)[0]
    results, c_labels, n_rel = search_centroids(embeddings_of(vectors), table, k=k, per_sequence=per_sequence)
    expected = reference(vectors, labels, groups, is_query, is_gallery, k, per_sequence)
    for q, exp in enumerate(expected):
        row = results.indices[q][results.indices[q] != PAD]
        assert c_labels[row].tolist() == [lab for lab, _ in exp]
        np.testing.assert_allclose(results.distances[q][: len(row)], [d for _, d in exp], atol=1e-5)
        assert np.isinf(results.distances[q][len(row) :]).all()
    if k == 50:  # the whole ranking: relevant counts equal the relevant centroids seen
        labels_q = labels[is_query]
        seen = (c_labels[np.maximum(results.indices, 0)] == labels_q[:, None]) & (results.indices != PAD)
        assert n_rel.tolist() == seen.sum(1).tolist()


def test_query_never_sees_the_centroid_of_its_own_camera_unlike_ctl(tmp_path):
    # queries: pid 7 camera 1, pid 8 camera 2; gallery: (7, c2), (7, c1), (8, c1), (9, c1)
    labels = [7, 8, 7, 7, 8, 9]
    cams = ["c1", "c2", "c2", "c1", "c1", "c1"]
    sequences = [f"{p}_{c}" for p, c in zip(labels, cams)]
    is_query, is_gallery = [True, True, False, False, False, False], [False, False, True, True, True, True]
    vectors = [[1, 0], [0, 1], [0.8, 0.6], [0.9, 0.1], [0, 1], [-1, 0]]
    table = make_table(tmp_path, labels, sequences, is_query, is_gallery)
    results, _, n_rel = search_centroids(embeddings_of(vectors), table, k=4, per_sequence=True)
    assert results.gallery_ids.tolist() == [
        "label=7|sequence=7_c2",
        "label=7|sequence=7_c1",
        "label=8|sequence=8_c1",
        "label=9|sequence=9_c1",
    ]
    seen = by_id(results)["0.png"]
    assert "label=7|sequence=7_c2" in seen and "label=7|sequence=7_c1" not in seen
    assert len(seen) == 3 and n_rel.tolist() == [1, 1]
    # CTL's rule: the camera of gallery centroid j is looked up at position j of [query cams, gallery cams]
    q_cams, g_cams = np.array(cams[:2]), np.array(cams[2:])
    first_gallery_position = {"7_c2": 0, "7_c1": 1, "8_c1": 2, "9_c1": 3}
    ctl_cams = np.concatenate([q_cams, g_cams])
    ctl_hidden = {s for s, j in first_gallery_position.items() if int(s.split("_")[0]) == 7 and ctl_cams[j] == "c1"}
    assert ctl_hidden == {"7_c2"}  # the bug hides the other camera and shows the query's own camera
    assert seen[0] == "label=7|sequence=7_c2"  # ours: the right one, and it is the nearest


def test_per_sequence_without_sequences_is_item_search(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((12, 5))
    table = make_table(tmp_path, rng.integers(0, 3, 12))
    emb = embeddings_of(vectors)
    with pytest.warns(LookalikeWarning, match="search.k: 12 is more than the 11 gallery items a query may see"):
        cent, _, _ = search_centroids(emb, table, k=12, per_sequence=True)
        items = search_table(emb, table, k=12)
    np.testing.assert_allclose(cent.distances, items.distances, atol=1e-5)
    assert (
        cent.k == items.k == 11 and not (cent.indices == PAD).any()
    )  # one hidden item each (itself): clamped, not padded


def test_metrics_with_centroids_on_a_known_toy_set(tmp_path):
    degrees = {"a": [0, 10, 80], "b": [90, 100], "c": [180, 190]}
    labels = [lab for lab, ds in degrees.items() for _ in ds]
    angles = np.radians([d for ds in degrees.values() for d in ds])
    vectors = np.stack([np.cos(angles), np.sin(angles)], 1)
    table = make_table(tmp_path, labels)
    results, report = evaluate_centroids(embeddings_of(vectors), table, k=3, cmc_k=(1, 2), precision_k=(1,), map_k=(3,))
    # the a at 80 degrees is nearer b's centroid (95) than its own without itself (5): rank 2; all others rank 1
    assert report.per_query["cmc@1"].tolist() == [1, 1, 0, 1, 1, 1, 1]
    assert report.means["cmc@1"] == pytest.approx(6 / 7)
    assert report.means["cmc@2"] == 1.0
    assert report.means["map@all"] == pytest.approx((6 + 0.5) / 7)
    assert report.n_relevant.tolist() == [1] * 7 and report.no_relevant_ids == []
    assert results.meta["index"] == "centroids" and results.meta["centroids"] == "label"


def test_query_without_any_other_item_of_its_label_is_reported(tmp_path):
    table = make_table(tmp_path, [1, 1, 2], sequences=["s", "s", "t"])
    _, report = evaluate_centroids(
        embeddings_of([[1, 0], [0.9, 0.1], [0, 1]]), table, k=2, cmc_k=(1,), precision_k=(1,), map_k=(1,)
    )
    assert report.no_relevant_ids == ["0.png", "1.png", "2.png"]  # label 1 lives in one sequence only


@pytest.mark.parametrize("per_sequence", [False, True])
def test_k_beyond_the_number_of_centroids_is_clamped(tmp_path, per_sequence):
    """Was: padded to k columns (search.k=100 against 41 centroids: 59 columns of padding per query)."""
    table = make_table(tmp_path, [0, 0, 1, 1, 2])
    visible = 4 if per_sequence else 3  # every other item, or the other labels plus the own label without itself
    with pytest.warns(LookalikeWarning, match=rf"^search\.k: 10 is more than the {visible} gallery items"):
        results, _, _ = search_centroids(embeddings_of(np.eye(5)[:, :3] + 0.1), table, k=10, per_sequence=per_sequence)
    assert results.k == visible and results.meta["k_requested"] == 10
    assert (results.indices != PAD).sum(1).max() == visible
    assert np.isfinite(results.distances[:, :2]).all()


def test_bad_inputs(tmp_path):
    gallery = embeddings_of([[1, 0], [0, 1]])
    with pytest.raises(LookalikeError, match="labels: expected 2 gallery labels"):
        gallery_centroids(gallery, np.array([1, 2, 3]))
    with pytest.raises(LookalikeError, match="sequences: expected 2 gallery sequences"):
        gallery_centroids(gallery, np.array([1, 2]), np.array(["s"]))
    with pytest.raises(LookalikeError, match="labels: missing value at position 1"):
        gallery_centroids(gallery, np.array([1, None], dtype=object))
    with pytest.raises(LookalikeError, match="metric: expected one of"):
        search_centroids(gallery, make_table(tmp_path, [1, 2]), metric="manhattan")
