"""Row helpers for the sorts of search and re-ranking: order-preserving integer codes of floats, to sort
(value, position) pairs as single int64 values with numpy's AVX-512 sort; and ragged per-row entries
packed into padded [rows, width] tensors."""

from __future__ import annotations

import numpy as np
import torch


def sortable_bits(x: np.ndarray) -> np.ndarray:
    """int64 codes of floats, rounded to float32, whose integer order is the float order (-inf < ... < -0 < 0
    < ... < inf < NaN, NaNs made positive first); they fit 32 bits, leaving the upper half of a key free.
    Computed with torch's elementwise ops, which use every core."""
    x32 = torch.from_numpy(np.ascontiguousarray(x)).float()
    if torch.isnan(x32).any():
        x32 = torch.where(torch.isnan(x32), torch.nan, x32)
    bits = x32.view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long().numpy()  # negatives: all bits but the sign flipped


def float_from_sortable_bits(code: np.ndarray) -> np.ndarray:
    """The float32 values of sortable_bits codes (a 32-bit field as int64)."""
    bits = code.astype(np.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(np.float32)


def sort_by_value(values: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's positions (non-negative, < 2**32; broadcast to `values`) ordered by float32-rounded value,
    equal values by position, and the sortable_bits codes in that order: one numpy sort of int64 (code above,
    position below)."""
    keys = (torch.from_numpy(sortable_bits(values)) << 32) | torch.from_numpy(np.ascontiguousarray(positions))
    keys = torch.from_numpy(np.sort(keys.numpy(), axis=1))
    return (keys & 0xFFFFFFFF).numpy(), (keys >> 32).numpy()  # torch's elementwise ops: every core


def pack_rows(rows: torch.Tensor, n_rows: int, *fields: tuple[torch.Tensor, float]) -> list[torch.Tensor]:
    """Per-entry values, entries sorted by row, as [n_rows, most entries in a row] tensors, one per
    (values, fill) field, each row's entries first and the rest of the row filled with `fill`."""
    counts = torch.bincount(rows, minlength=n_rows)
    width = int(counts.max()) if len(rows) else 0
    slot = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts).index_select(0, rows)
    packed = []
    for values, fill in fields:
        out = torch.full((n_rows, width), fill, dtype=values.dtype, device=values.device)
        out[rows, slot] = values
        packed.append(out)
    return packed
