"""Row-parallel numpy sorts and order-preserving float codes."""

from __future__ import annotations

import numpy as np
import torch

from lookalike.rows import argpartition_rows, float_from_sortable_bits, partition_rows, sort_rows, sortable_bits


def test_parallel_rows_equal_numpy_on_one_thread(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((301, 700)).astype(np.float32)  # big enough to split, odd so blocks are uneven
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    np.testing.assert_array_equal(sort_rows(x), np.sort(x, axis=1))
    np.testing.assert_array_equal(partition_rows(x, 650)[:, 650], np.sort(x, axis=1)[:, 650])
    top = argpartition_rows(x, 650)[:, 650:]
    np.testing.assert_array_equal(np.sort(np.take_along_axis(x, top, 1), 1), np.sort(x, axis=1)[:, 650:])


def test_sortable_bits_keep_the_float_order():
    values = np.array([np.nan, np.inf, 1.5, 1e-40, 0.0, -0.0, -1e-40, -2.0, -np.inf, -np.nan], np.float32)
    codes = sortable_bits(values)
    assert codes.dtype == np.int64 and codes.min() >= -(2**31) and codes.max() < 2**31
    order = np.argsort(codes, kind="stable")
    assert values[order][:8].tolist() == [-np.inf, -2.0, np.float32(-1e-40), -0.0, 0.0, np.float32(1e-40), 1.5, np.inf]
    assert np.isnan(values[order][8:]).all() and codes[0] == codes[-1]  # both NaNs last, made equal
    np.testing.assert_array_equal(float_from_sortable_bits(codes)[:9], values[:9])
    x64 = np.array([1.0, 1.0 + 1e-12, -3.0])  # float64 rounds to float32 first: order kept, fine ties merged
    assert sortable_bits(x64)[0] == sortable_bits(x64)[1] and sortable_bits(x64)[2] < sortable_bits(x64)[0]
