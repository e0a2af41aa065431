"""Metric-learning losses against hand-computed values and gradients: distances, miners, triplet (+ memory), CTL, center
loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lookalike.core.errors import LookalikeError
from lookalike.losses import CenterLoss, CentroidTripletLoss, TripletLoss, mine_triplets, pairwise_euclidean

# Miner fixture: six points on a line, no ties in any ranking; label 2 has a single member.
X = torch.tensor([0.0, 1.0, 2.5, 4.5, 7.0, 11.0], dtype=torch.float64)
Y = torch.tensor([0, 1, 0, 1, 0, 2])
D = (X[:, None] - X[None, :]).abs()
EYE = torch.eye(6, dtype=torch.bool)
# per anchor, by hand: positives (other members of its label) and negatives
POS = {0: [2, 4], 1: [3], 2: [0, 4], 3: [1], 4: [0, 2], 5: []}
NEG = {0: [1, 3, 5], 1: [0, 2, 4, 5], 2: [1, 3, 5], 3: [0, 2, 4, 5], 4: [1, 3, 5], 5: [0, 1, 2, 3, 4]}


def triples(mined) -> list[tuple[int, int, int]]:
    return sorted(zip(*(t.tolist() for t in mined)))


def column(values) -> torch.Tensor:
    """1-D points as a [B, 1] float64 leaf that records gradients."""
    return torch.tensor(values, dtype=torch.float64)[:, None].requires_grad_(True)


# ---------------------------------------------------------------- distances


def test_pairwise_euclidean_matches_cdist():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g)
    torch.testing.assert_close(pairwise_euclidean(x, y), torch.cdist(x, y), atol=1e-5, rtol=1e-5)
    assert pairwise_euclidean(x, y).shape == (7, 9)


def test_pairwise_euclidean_gradient_finite_where_points_coincide():
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    d = pairwise_euclidean(x, x)
    assert torch.all(d.diagonal() == 0)
    d.sum().backward()
    assert torch.isfinite(x.grad).all()
    # off-diagonal terms only: each point is pushed away from the other along the unit vector, from both (i,j) and (j,i)
    u = (x[0] - x[1]).detach() / (x[0] - x[1]).detach().norm()
    torch.testing.assert_close(x.grad, torch.stack([2 * u, -2 * u]))


# ---------------------------------------------------------------- miners


def test_all_strategy_mines_every_valid_triple():
    expected = sorted((a, p, n) for a in POS for p in POS[a] for n in NEG[a])
    assert len(expected) == 26
    assert triples(mine_triplets(D, Y, Y, "all", same_item=EYE)) == expected


def test_batch_hard_takes_farthest_positive_and_closest_negative():
    expected = [(0, 4, 1), (1, 3, 0), (2, 4, 1), (3, 1, 2), (4, 0, 3)]  # anchor 5 has no positive
    assert triples(mine_triplets(D, Y, Y, "batch_hard", same_item=EYE)) == expected


def test_n_hard_takes_all_combinations_of_the_hardest():
    hardest = {  # up to 2 farthest positives x 2 closest negatives, by hand
        0: ([4, 2], [1, 3]),
        1: ([3], [0, 2]),
        2: ([4, 0], [1, 3]),
        3: ([1], [2, 4]),
        4: ([0, 2], [3, 5]),
    }
    expected = sorted((a, p, n) for a, (ps, ns) in hardest.items() for p, n in itertools.product(ps, ns))
    assert triples(mine_triplets(D, Y, Y, "n_hard", n_positives=2, n_negatives=2, same_item=EYE)) == expected


def test_same_item_is_never_a_positive():
    without = triples(mine_triplets(D, Y, Y, "all"))
    assert (5, 5, 0) in without and (0, 0, 1) in without  # with no same_item, the anchor's own column is a positive
    assert all(a != p for a, p, _ in triples(mine_triplets(D, Y, Y, "all", same_item=EYE)))
    same = EYE.clone()
    same[0, 4] = True  # column 4 declared to be anchor 0 itself: its farthest positive becomes 2
    mined = triples(mine_triplets(D, Y, Y, "batch_hard", same_item=same))
    assert mined[0] == (0, 2, 1) and mined[1:] == [(1, 3, 0), (2, 4, 1), (3, 1, 2), (4, 0, 3)]


def test_candidate_valid_columns_are_never_mined():
    keep = torch.tensor([True, False, True, True, True, True])
    mined = triples(mine_triplets(D, Y, Y, "batch_hard", same_item=EYE, candidate_valid=keep))
    # column 1 gone: anchors 0 and 2 fall back to negative 3; anchor 3 loses its only positive; anchor 1 still anchors
    assert mined == [(0, 4, 3), (1, 3, 0), (2, 4, 3), (4, 0, 3)]
    everything = triples(mine_triplets(D, Y, Y, "all", same_item=EYE, candidate_valid=keep))
    assert all(1 not in (p, n) for _, p, n in everything)


def test_rectangular_distances_index_columns():
    # two anchors against four candidates: columns are candidates, rows anchors
    dist = torch.tensor([[0.5, 3.0, 1.0, 2.0], [4.0, 0.2, 0.3, 9.0]])
    mined = mine_triplets(dist, torch.tensor([0, 1]), torch.tensor([0, 1, 1, 0]), "batch_hard")
    assert triples(mined) == [(0, 3, 2), (1, 2, 0)]
    assert all(t.dtype == torch.long for t in mined)


def test_miner_rejects_unknown_strategy_and_bad_shapes():
    with pytest.raises(LookalikeError, match="all, batch_hard, n_hard"):
        mine_triplets(D, Y, Y, "hardest")
    with pytest.raises(LookalikeError, match="same_item"):
        mine_triplets(D, Y, Y, same_item=EYE[:5])
    with pytest.raises(LookalikeError, match="candidate_labels"):
        mine_triplets(D, Y, Y[:4])
    with pytest.raises(LookalikeError, match="candidate_valid"):
        mine_triplets(D, Y, Y, candidate_valid=torch.ones(3, dtype=torch.bool))
    with pytest.raises(LookalikeError, match="pairwise_euclidean"):
        pairwise_euclidean(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------- triplet loss
# Batch x = [0, 1, 1.5, 4], labels [0, 0, 1, 1]. Batch-hard triples: (0,1,2) d_ap 1 d_an 1.5; (1,0,2) 1, 0.5;
# (2,3,1) 2.5, 0.5; (3,2,1) 2.5, 3. Gaps d_ap - d_an = [-0.5, 0.5, 2, -0.5].
BATCH, LABELS = [0.0, 1.0, 1.5, 4.0], torch.tensor([0, 0, 1, 1])


def test_triplet_margin_value_gradient_and_stats():
    x = column(BATCH)
    out = TripletLoss(margin=0.2)(x, LABELS)
    assert out.loss.item() == pytest.approx((0.7 + 2.2) / 4)  # relu(gap + 0.2) = [0, 0.7, 2.2, 0]
    out.loss.backward()
    # active triples (1,0,2): d(x1,x0) - d(x1,x2) and (2,3,1): d(x2,x3) - d(x2,x1); d|a-b|/da = sign(a-b)
    torch.testing.assert_close(x.grad[:, 0], torch.tensor([-1.0, 3.0, -3.0, 1.0], dtype=torch.float64) / 4)
    stats = {k: v.item() for k, v in out.stats.items()}
    assert stats == pytest.approx({"active": 0.5, "pos_dist": 1.75, "neg_dist": 1.375, "triplets": 4.0})
    assert all(not v.requires_grad for v in out.stats.values())


def test_triplet_soft_margin_value_gradient_and_stats():
    x = column(BATCH)
    out = TripletLoss(margin=None)(x, LABELS)
    sp = lambda z: math.log1p(math.exp(z))  # noqa: E731
    sg = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert out.loss.item() == pytest.approx((sp(-0.5) + sp(0.5) + sp(2) + sp(-0.5)) / 4)
    out.loss.backward()
    s0, s1, s2, s3 = sg(-0.5), sg(0.5), sg(2.0), sg(-0.5)
    expected = torch.tensor([-s1, s0 + 2 * s1 + s2 + s3, -s0 - s1 - 2 * s2 - s3, s2], dtype=torch.float64) / 4
    torch.testing.assert_close(x.grad[:, 0], expected)
    assert out.stats["active"].item() == pytest.approx(0.5)  # fraction with d_ap > d_an


def test_triplet_gradient_in_two_dimensions():
    p = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 0.0], [0.0, 8.0]], dtype=torch.float64, requires_grad=True)
    out = TripletLoss(margin=1.0)(p, LABELS)
    mined = [(0, 1, 2), (1, 0, 2), (2, 3, 0), (3, 2, 1)]  # by hand from the 3-4-5 distances; every one active
    r73 = math.sqrt(73)
    assert out.loss.item() == pytest.approx(((5 - 3 + 1) + (5 - 4 + 1) + (r73 - 3 + 1) + (r73 - 5 + 1)) / 4)
    out.loss.backward()
    q = p.detach()
    unit = lambda i, j: (q[i] - q[j]) / (q[i] - q[j]).norm()  # noqa: E731  d||qi - qj|| / dqi
    expected = torch.zeros_like(q)
    for a, pos, neg in mined:
        expected[a] += (unit(a, pos) - unit(a, neg)) / 4
        expected[pos] -= unit(a, pos) / 4
        expected[neg] += unit(a, neg) / 4
    torch.testing.assert_close(p.grad, expected)


@pytest.mark.parametrize(("miner", "count"), [("all", 26), ("batch_hard", 5), ("n_hard", 16)])
def test_triplet_loss_uses_its_miner_and_skips_self(miner, count):
    out = TripletLoss(miner=miner, n_positives=2, n_negatives=2)(X[:, None], Y)
    assert out.stats["triplets"].item() == count


def test_invalid_rows_are_neither_anchors_nor_candidates():
    x = column(BATCH + [0.9])  # a mock that would be every anchor's closest negative (label 1) if it counted
    out = TripletLoss(margin=0.2)(x, torch.tensor([0, 0, 1, 1, 1]), torch.tensor([True] * 4 + [False]))
    assert out.loss.item() == pytest.approx(0.725) and out.stats["triplets"].item() == 4
    out.loss.backward()
    assert x.grad[4, 0].item() == 0.0


def test_no_triplet_gives_zero_loss_connected_to_the_graph():
    x = column([0.0, 1.0, 2.0])
    out = TripletLoss()(x, torch.tensor([0, 1, 2]))  # no positives anywhere
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(x.grad == 0)
    assert {k: v.item() for k, v in out.stats.items()} == {
        "active": 0.0,
        "pos_dist": 0.0,
        "neg_dist": 0.0,
        "triplets": 0.0,
    }


def test_triplet_rejects_bad_inputs():
    loss = TripletLoss()
    with pytest.raises(LookalikeError, match="labels"):
        loss(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(LookalikeError, match="labels"):
        loss(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(LookalikeError, match="valid"):
        loss(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.ones(5, dtype=torch.bool))
    with pytest.raises(LookalikeError, match="embeddings"):
        loss(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(LookalikeError, match="batch_hard"):
        TripletLoss(miner="semihard")


# ---------------------------------------------------------------- cross-batch memory


def test_memory_supplies_negatives_from_earlier_batches():
    xbm = TripletLoss(margin=0.2, memory_size=8)
    first = xbm(column([0.3, 9.0]), torch.tensor([1, 2]))  # nothing to mine yet; stored afterwards
    assert first.stats["triplets"].item() == 0
    assert xbm.memory_filled.sum().item() == 2
    torch.testing.assert_close(xbm.memory_embeddings[:2, 0], torch.tensor([0.3, 9.0], dtype=torch.float64))

    x = column([0.0, 1.0])  # one label only: no negative inside this batch
    assert TripletLoss(margin=0.2)(x, torch.tensor([0, 0])).stats["triplets"].item() == 0
    out = xbm(x, torch.tensor([0, 0]))
    # the negative 0.3 lives only in the memory: (x0: 1 - 0.3 + 0.2) and (x1: 1 - 0.7 + 0.2)
    assert out.loss.item() == pytest.approx((0.9 + 0.5) / 2)
    assert out.stats["triplets"].item() == 2 and out.stats["neg_dist"].item() == pytest.approx(0.5)
    out.loss.backward()
    torch.testing.assert_close(x.grad[:, 0], torch.tensor([-0.5, 0.5], dtype=torch.float64))  # memory is detached
    assert xbm.memory_filled.sum().item() == 4


def test_memory_ring_wraps_and_skips_invalid_rows():
    xbm = TripletLoss(memory_size=3)

    def step(values, labels, valid=None):
        xbm(column(values), torch.tensor(labels), None if valid is None else torch.tensor(valid))
        return xbm.memory_embeddings[:, 0].tolist(), xbm.memory_labels.tolist(), xbm.memory_filled.tolist()

    assert step([1.0, 2.0], [1, 2], [True, True]) == ([1.0, 2.0, 0.0], [1, 2, 0], [True, True, False])
    assert step([3.0, 4.0], [3, 4]) == ([4.0, 2.0, 3.0], [4, 2, 3], [True] * 3)  # wrapped: 4 overwrote the oldest
    assert step([5.0, 6.0, 7.0], [5, 6, 7], [True, False, True]) == ([4.0, 5.0, 7.0], [4, 5, 7], [True] * 3)
    assert xbm.memory_ptr.item() == 0
    assert step([10.0, 11.0, 12.0, 13.0, 14.0], [1, 1, 2, 2, 3]) == ([12.0, 13.0, 14.0], [2, 2, 3], [True] * 3)

    fresh = TripletLoss(memory_size=4)
    fresh(column([1.0, 2.0]), torch.tensor([0, 0]), torch.tensor([False, True]))
    assert fresh.memory_filled.tolist() == [True, False, False, False] and fresh.memory_embeddings[0, 0].item() == 2.0


def test_memory_is_a_buffer_and_idle_in_eval_mode():
    xbm = TripletLoss(memory_size=4)
    xbm(column([0.3, 9.0]), torch.tensor([1, 2]))
    state = xbm.state_dict()
    assert {"memory_embeddings", "memory_labels", "memory_filled", "memory_ptr"} <= set(state)
    restored = TripletLoss(memory_size=4)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.memory_embeddings, xbm.memory_embeddings)
    restored.eval()
    out = restored(column([0.0, 1.0]), torch.tensor([0, 0]))
    assert out.stats["triplets"].item() == 0 and restored.memory_filled.sum().item() == 2
    assert TripletLoss().state_dict() == {}
    sized = TripletLoss(memory_size=4, dim=2)
    assert sized.memory_embeddings.shape == (4, 2)  # allocated before any batch
    with pytest.raises(LookalikeError, match="embeddings: width 3"):
        sized(torch.zeros(2, 3), torch.tensor([0, 1]))


# ---------------------------------------------------------------- centroid triplet loss
# Valid: label 0 at {0, 4}, label 1 at {3, 7, 8}, label 2 at {13}; centroids 2, 6, 13. Mocks: label 1 at 100
# (would move centroid 1) and label 3 at 3.5 (would be anchor 2's closest negative).
CTL_X = [0.0, 4.0, 3.0, 7.0, 8.0, 13.0, 100.0, 3.5]
CTL_Y = torch.tensor([0, 0, 1, 1, 1, 2, 1, 3])
CTL_VALID = torch.tensor([True] * 6 + [False] * 2)


def test_ctl_value_gradient_and_stats():
    x = column(CTL_X)
    out = CentroidTripletLoss(margin=0.5, mode="equation")(x, CTL_Y, CTL_VALID)
    # anchors 0..4 (label 2 has one member). (leave-one-out positive, closest other centroid):
    # a0 (4, 6) a1 (4, 2) a2 (|3 - 7.5| = 4.5, 1) a3 (|7 - 5.5| = 1.5, 5) a4 (3, 5): active a1 = 2.5, a2 = 4
    assert out.loss.item() == pytest.approx((2.5 + 4.0) / 5)
    stats = {k: v.item() for k, v in out.stats.items()}
    assert stats == pytest.approx({"active": 0.4, "pos_dist": 3.4, "neg_dist": 3.8, "anchors": 5.0})
    out.loss.backward()
    # a1: |x1 - x0| - |x1 - (x2 + x3 + x4)/3|;  a2: |x2 - (x3 + x4)/2| - |x2 - (x0 + x1)/2|
    a1 = torch.tensor([-1, 2, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0], dtype=torch.float64)
    a2 = torch.tensor([1 / 2, 1 / 2, -2, 1 / 2, 1 / 2, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(x.grad[:, 0], (a1 + a2) / 5)


def test_ctl_mock_instances_change_nothing():
    ctl = CentroidTripletLoss(margin=0.5, mode="equation")
    x, moved = column(CTL_X), column(CTL_X[:6] + [-2.0, 4.1])
    out, out_moved = ctl(x, CTL_Y, CTL_VALID), ctl(moved, CTL_Y, CTL_VALID)
    (out.loss + out_moved.loss).backward()
    assert out.loss.item() == out_moved.loss.item()
    torch.testing.assert_close(x.grad, moved.grad)
    assert torch.all(x.grad[6:] == 0)
    assert ctl(column(CTL_X), CTL_Y).loss.item() != pytest.approx(
        out.loss.item()
    )  # the same rows counted as valid do matter


def test_ctl_label_with_one_valid_instance_is_no_anchor():
    ctl = CentroidTripletLoss(margin=0.5, mode="equation")
    x = column([0.0, 1.0, 5.0, 5.5])
    out = ctl(x, torch.tensor([0, 0, 1, 1]), torch.tensor([True, True, True, False]))
    assert out.stats["anchors"].item() == 2 and out.stats["pos_dist"].item() == pytest.approx(1.0)
    assert torch.isfinite(out.loss)
    alone = ctl(x, torch.tensor([0, 1, 2, 3]))
    alone.loss.backward()
    assert alone.loss.item() == 0.0 and alone.stats["anchors"].item() == 0 and torch.all(x.grad == 0)


def official_ctl_reference(x: torch.Tensor, y: torch.Tensor, k: int, margin: float) -> torch.Tensor:
    """The official centroids-reid procedure written out loop by loop for a P x K batch (labels in blocks of k):
    round i takes instance i of every label as query and the mean of the label's other k - 1 as centroid, stacks
    queries and centroids, and takes per row the farthest same-label and the closest other-label entry."""
    p = len(x) // k
    rounds = []
    for i in range(k):
        queries = [x[c * k + i] for c in range(p)]
        centroids = [torch.stack([x[c * k + j] for j in range(k) if j != i]).mean(0) for c in range(p)]
        points, labels = queries + centroids, [y[c * k] for c in range(p)] * 2
        hinge = []
        for a in range(2 * p):
            d = [torch.sqrt(((points[a] - points[b]) ** 2).sum().clamp_min(1e-12)) for b in range(2 * p)]
            d_ap = max(d[b] for b in range(2 * p) if labels[b] == labels[a])
            d_an = min(d[b] for b in range(2 * p) if labels[b] != labels[a])
            hinge.append(torch.relu(d_ap - d_an + margin))
        rounds.append(torch.stack(hinge).mean())
    return torch.stack(rounds).mean()


def test_ctl_official_hand_worked_batch():
    # 1-D, labels A = {0, 1}, B = {3, 5}. Round 0: queries 0, 3, centroids 1, 5 -> anchor 3 has positive 5 (2) and
    # negative centroid 1 (2): 0.5; the other three anchors 0. Round 1: queries 1, 5, centroids 0, 3 -> centroid 3 has
    # positive 5 (2) and negative query 1 (2): 0.5. Loss (0.5 / 4 + 0.5 / 4) / 2 = 0.125. The equation gives 0: every
    # instance is closer to its leave-one-out centroid than to the other label's full centroid by more than the margin.
    x, y = column([0.0, 1.0, 3.0, 5.0]), torch.tensor([0, 0, 1, 1])
    out = CentroidTripletLoss(margin=0.5)(x, y)
    assert out.loss.item() == pytest.approx(0.125)
    assert {k: v.item() for k, v in out.stats.items()} == pytest.approx(
        {"active": 0.25, "pos_dist": 1.5, "neg_dist": 2.75, "anchors": 8.0}
    )
    assert CentroidTripletLoss(margin=0.5, mode="equation")(x, y).loss.item() == 0.0
    out.loss.backward()  # both active terms are d(x2, x3) - d(x2, x1) = x3 - 2 x2 + x1, each weighted 1 / 8
    torch.testing.assert_close(x.grad[:, 0], torch.tensor([0.0, 2.0, -4.0, 2.0], dtype=torch.float64) / 8)


@pytest.mark.parametrize("margin", [0.5, 0.3])
def test_ctl_official_matches_the_loop_reference_on_p4_k4_batches(margin):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(4)
    for scale in (0.3, 1.0, 3.0):
        x = (torch.randn(16, 8, generator=g, dtype=torch.float64) * scale).requires_grad_()
        ref_x = x.detach().clone().requires_grad_()
        out, ref = CentroidTripletLoss(margin)(x, y), official_ctl_reference(ref_x, y, 4, margin)
        assert out.loss.item() == pytest.approx(ref.item(), rel=1e-9)
        (out.loss + ref).backward()
        torch.testing.assert_close(x.grad, ref_x.grad)
        interleaved = (
            torch.arange(16).view(4, 4).T.reshape(-1)
        )  # labels 0 1 2 3 0 1 2 3 ...: rounds follow each label's order
        assert CentroidTripletLoss(margin)(x[interleaved], y[interleaved]).loss.item() == pytest.approx(
            ref.item(), rel=1e-9
        )


def test_ctl_official_distances_in_float32_for_half_precision_features():
    x, y = torch.tensor([[0.0], [1.0], [3.0], [5.0]], dtype=torch.bfloat16), torch.tensor([0, 0, 1, 1])
    out = CentroidTripletLoss(margin=0.5)(x, y)
    assert out.loss.dtype == torch.float32 and out.loss.item() == pytest.approx(0.125)


def test_ctl_official_mocks_and_lonely_labels():
    # label 0 has 3 valid + 1 mock, label 1 has 2 valid, label 2 one valid: round 2 holds label 0 only and is skipped
    x = column([0.0, 1.0, 2.0, 50.0, 3.0, 4.0, 9.0])
    y, valid = torch.tensor([0, 0, 0, 0, 1, 1, 2]), torch.tensor([True, True, True, False, True, True, True])
    ctl = CentroidTripletLoss(margin=0.5)
    out = ctl(x, y, valid)
    moved = ctl(column([0.0, 1.0, 2.0, -7.0, 3.0, 4.0, 9.0]), y, valid)
    assert out.loss.item() == moved.loss.item() and out.stats["anchors"].item() == 8.0
    # round 0: queries 0, 3; centroids 1.5, 4; round 1: queries 1, 4; centroids 1, 3 (two rounds of 4 anchors)
    r0 = [max(0, 1.5 - 3 + 0.5), max(0, 1 - 1.5 + 0.5), max(0, 1.5 - 1.5 + 0.5), max(0, 1 - 2.5 + 0.5)]
    r1 = [max(0, 0 - 2 + 0.5), max(0, 1 - 3 + 0.5), max(0, 0 - 2 + 0.5), max(0, 1 - 2 + 0.5)]
    assert out.loss.item() == pytest.approx((sum(r0) / 4 + sum(r1) / 4) / 2)
    assert ctl(column([0.0, 1.0]), torch.tensor([0, 0])).loss.item() == 0.0  # one label: no round to learn from


def test_ctl_soft_margin_and_bad_mode():
    x, y = column([0.0, 1.0, 3.0, 5.0]), torch.tensor([0, 0, 1, 1])
    soft = CentroidTripletLoss(margin=None)(x, y).loss.item()
    # round 0 gaps (d_pos - d_neg): q0 1-3, q3 2-2, c1 1-2, c5 2-4; round 1: q1 1-2, q5 2-4, c0 1-3, c3 2-2
    gaps = torch.tensor([-2.0, 0.0, -1.0, -2.0, -1.0, -2.0, -2.0, 0.0])
    assert soft == pytest.approx(torch.nn.functional.softplus(gaps).mean().item())
    with pytest.raises(LookalikeError, match="centroid mode: expected one of official, equation"):
        CentroidTripletLoss(mode="paper")


# ---------------------------------------------------------------- center loss


def test_center_loss_value_and_gradients():
    center = CenterLoss(num_classes=2, dim=2).double()
    with torch.no_grad():
        center.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
    x = torch.tensor([[1.0, 1.0], [3.0, 2.0], [7.0, 7.0]], dtype=torch.float64, requires_grad=True)
    out = center(x, torch.tensor([0, 1, -1]), torch.tensor([True, True, False]))  # the mock's label is never looked up
    assert out.loss.item() == pytest.approx(0.5 * (2.0 + 4.0) / 2) and out.stats == {}
    out.loss.backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(center.centers.grad, torch.tensor([[-0.5, -0.5], [-1.0, 0.0]], dtype=torch.float64))


def test_center_loss_scale_one_is_the_official_ctl_definition():
    # official CTL: sum over the batch of ||x - c||^2 / batch size (no 1/2): (2 + 4) / 2 = 3
    center = CenterLoss(num_classes=2, dim=2, scale=1.0).double()
    with torch.no_grad():
        center.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
    x = torch.tensor([[1.0, 1.0], [3.0, 2.0]], dtype=torch.float64, requires_grad=True)
    out = center(x, torch.tensor([0, 1]))
    assert out.loss.item() == pytest.approx(3.0)
    out.loss.backward()
    torch.testing.assert_close(center.centers.grad, torch.tensor([[-1.0, -1.0], [-2.0, 0.0]], dtype=torch.float64))
    with pytest.raises(LookalikeError, match="center scale"):
        CenterLoss(2, 2, scale=0.0)


def test_center_loss_rejects_bad_labels_and_width():
    center = CenterLoss(num_classes=2, dim=2)
    with pytest.raises(LookalikeError, match="labels"):
        center(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(LookalikeError, match="embeddings"):
        center(torch.zeros(2, 3), torch.tensor([0, 1]))
    assert isinstance(center.centers, torch.nn.Parameter) and center.centers.shape == (2, 2)
