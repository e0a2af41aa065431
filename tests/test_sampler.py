"""P x K sampler: batch composition, determinism, few-image modes, the DDP split, errors, use in a DataLoader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lookalike.core.errors import LookalikeError
from lookalike.data.sampler import PKSampler, decode_index


def make_labels(sizes: list[int], seed: int = 0) -> np.ndarray:
    """Label i repeated sizes[i] times, rows shuffled so labels are not contiguous."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels)


def batches_of(sampler: PKSampler, epoch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def per_label(batch: list[int], labels: np.ndarray, p: int, k: int) -> list[list[int]]:
    """Split a batch into its p groups of k indices, checking each group has one label."""
    groups = [batch[i * k : (i + 1) * k] for i in range(p)]
    for g in groups:
        assert len({labels[decode_index(i)[0]] for i in g}) == 1
    return groups


def test_every_batch_has_p_distinct_labels_of_k_images():
    labels = make_labels([6, 5, 7, 4, 9, 4, 5, 8, 4, 6, 5])
    p, k = 3, 4
    sampler = PKSampler(labels, p, k)
    batches = batches_of(sampler)
    assert len(batches) == len(sampler) == 11 // 3
    used = []
    for batch in batches:
        assert len(batch) == p * k and all(isinstance(i, int) and i >= 0 for i in batch)
        groups = per_label(batch, labels, p, k)
        batch_labels = [labels[g[0]] for g in groups]
        assert len(set(batch_labels)) == p
        for g in groups:
            assert len(set(g)) == k  # every label has >= k images: no repeats
        used += batch_labels
    assert len(set(used)) == len(used)  # each label at most once per epoch


def test_same_seed_and_epoch_repeat_other_epochs_differ():
    labels = make_labels([5] * 20)
    a, b = PKSampler(labels, 4, 3, seed=7), PKSampler(labels, 4, 3, seed=7)
    assert batches_of(a, 3) == batches_of(b, 3)
    assert batches_of(a, 3) != batches_of(a, 4)
    assert batches_of(a, 3) != batches_of(PKSampler(labels, 4, 3, seed=8), 3)
    assert batches_of(a, 3) == batches_of(a, 3)  # iterating again gives the same epoch


def test_images_and_labels_are_shuffled_over_epochs():
    labels = make_labels([10] * 8)
    sampler = PKSampler(labels, 2, 4)
    seen = {tuple(sorted(i for b in batches_of(sampler, e) for i in b)) for e in range(10)}
    assert len(seen) > 1
    first_labels = {labels[batches_of(sampler, e)[0][0]] for e in range(10)}
    assert len(first_labels) > 1


def test_repeat_fills_small_labels_from_their_own_images():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # label 1 has 2 images, label 3 has 1
    sampler = PKSampler(labels, 2, 4, few_images="repeat")
    for epoch in range(5):
        for batch in batches_of(sampler, epoch):
            assert min(batch) >= 0
            for g in per_label(batch, labels, 2, 4):
                own = np.flatnonzero(labels == labels[g[0]])
                assert set(g) <= set(own.tolist())
                assert len(set(g)) == min(4, len(own))  # all its images are used before any repeats


def test_pad_yields_negative_indices_exactly_for_the_missing_slots():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    sampler = PKSampler(labels, 2, 4, few_images="pad")
    negatives = 0
    for epoch in range(5):
        for batch in batches_of(sampler, epoch):
            for g in per_label(batch, labels, 2, 4):
                rows = [decode_index(i)[0] for i in g]
                own = np.flatnonzero(labels == labels[rows[0]])
                valid = [i for i in g if i >= 0]
                assert len(valid) == min(4, len(own)) and len(set(valid)) == len(valid)
                assert set(rows) <= set(own.tolist())
                negatives += sum(i < 0 for i in g)
    assert negatives > 0
    assert all(i >= 0 for e in range(5) for b in batches_of(PKSampler(labels, 2, 4, few_images="repeat"), e) for i in b)


def test_drop_skips_labels_with_fewer_than_k_images():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4])
    sampler = PKSampler(labels, 3, 3, few_images="drop")
    assert len(sampler) == 1
    for epoch in range(5):
        (batch,) = batches_of(sampler, epoch)
        assert {labels[i] for i in batch} == {0, 2, 3}


def test_decode_index():
    assert decode_index(5) == (5, True)
    assert decode_index(0) == (0, True)
    assert decode_index(-1) == (0, False)
    assert decode_index(-6) == (5, False)


def test_string_labels():
    labels = np.array(["cat", "dog", "cat", "dog", "eel", "eel"])
    (batch,) = batches_of(PKSampler(labels, 3, 2))
    assert sorted(labels[batch]) == ["cat", "cat", "dog", "dog", "eel", "eel"]


def test_ddp_split_two_ranks():
    labels = make_labels([4] * 23)  # 23 labels, p = 2 -> 11 batches -> 5 per rank
    single = batches_of(PKSampler(labels, 2, 3, seed=3), 2)
    ranks = [PKSampler(labels, 2, 3, seed=3, num_replicas=2, rank=r) for r in range(2)]
    r0, r1 = (batches_of(s, 2) for s in ranks)
    assert len(single) == 11 and len(r0) == len(r1) == len(ranks[0]) == len(ranks[1]) == 5
    assert {tuple(b) for b in r0}.isdisjoint({tuple(b) for b in r1})
    assert sorted(map(tuple, r0 + r1)) == sorted(map(tuple, single[:10]))
    assert r0 == single[0:10:2] and r1 == single[1:10:2]


def test_replicas_default_to_a_single_process():
    sampler = PKSampler(make_labels([3] * 6), 2, 3)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)


def test_errors_are_one_line_and_name_the_argument():
    labels = np.array([0, 0, 0, 1, 1, 2])
    with pytest.raises(LookalikeError, match=r"p: only 1 labels have >= k=3 images .* fewer than p=2"):
        PKSampler(labels, 2, 3, few_images="drop")
    with pytest.raises(LookalikeError, match=r"fewer than p=4"):
        PKSampler(labels, 4, 2)
    with pytest.raises(LookalikeError, match="few_images: expected one of repeat, pad, drop, got 'skip'"):
        PKSampler(labels, 2, 2, few_images="skip")
    with pytest.raises(LookalikeError, match="k: expected a positive integer, got 0"):
        PKSampler(labels, 2, 0)
    with pytest.raises(LookalikeError, match="rank: expected 0 <= rank < num_replicas=2, got 2"):
        PKSampler(labels, 2, 2, num_replicas=2, rank=2)
    with pytest.raises(LookalikeError, match="labels: expected at least one label"):
        PKSampler([], 1, 1)
    with pytest.raises(LookalikeError, match="labels: missing label at position 1"):
        PKSampler([0, None, 1], 1, 1)


class Rows(Dataset):
    """Returns (row, label, valid) for an index in the sampler's convention."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        row, valid = decode_index(i)
        return row, int(self.labels[row]), valid


def test_works_as_a_dataloader_batch_sampler():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4])
    sampler = PKSampler(labels, 2, 3, few_images="pad", seed=1)
    loader = DataLoader(Rows(labels), batch_sampler=sampler)
    assert len(loader) == 2
    for epoch in range(3):
        sampler.set_epoch(epoch)
        out = list(loader)
        assert len(out) == 2
        for rows, batch_labels, valid in out:
            assert rows.shape == (6,) and isinstance(valid, torch.Tensor) and valid.dtype == torch.bool
            assert len(torch.unique(batch_labels)) == 2
            assert torch.equal(batch_labels, torch.from_numpy(labels)[rows])


def test_batches_per_epoch_makes_several_passes_of_distinct_labels():
    labels = make_labels([6, 5, 7, 4, 9])
    sampler = PKSampler(labels, p=2, k=4, batches_per_epoch=7)
    batches = batches_of(sampler)
    assert len(batches) == len(sampler) == 7  # one pass gives only 5 // 2 = 2 batches
    label_sets = []
    for batch in batches:
        groups = per_label(batch, labels, 2, 4)
        label_sets.append({labels[g[0]] for g in groups})
        assert len(label_sets[-1]) == 2
    assert len(set().union(*label_sets)) == 5  # every label appears across the passes
    firsts = {tuple(sorted(g)) for b in batches for g in per_label(b, labels, 2, 4) if labels[g[0]] == 4}
    assert len(firsts) > 1  # label 4 (9 images) gets a fresh choice of images in each pass
    with pytest.raises(LookalikeError, match="batches_per_epoch: expected a positive integer"):
        PKSampler(labels, p=2, k=4, batches_per_epoch=0)
