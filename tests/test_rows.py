"""Order-preserving float codes and packing ragged rows."""

from __future__ import annotations

import numpy as np
import torch

from lookalike.rows import float_from_sortable_bits, pack_rows, sortable_bits


def test_pack_rows_pads_each_row_after_its_entries():
    rows = torch.tensor([0, 0, 2, 2, 2])
    values, index = pack_rows(
        rows, 4, (torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), -torch.inf), (torch.tensor([7, 8, 9, 10, 11]), -1)
    )
    assert values.tolist() == [[1.0, 2.0, -np.inf], [-np.inf] * 3, [3.0, 4.0, 5.0], [-np.inf] * 3]
    assert index.tolist() == [[7, 8, -1], [-1, -1, -1], [9, 10, 11], [-1, -1, -1]] and index.dtype == torch.int64
    assert pack_rows(torch.empty(0, dtype=torch.int64), 2, (torch.empty(0), 0.0))[0].shape == (2, 0)


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
