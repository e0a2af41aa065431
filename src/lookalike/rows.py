"""Row-parallel numpy sorts: numpy's AVX-512 sort and partition beat torch's on the CPU but use one core;
they release the GIL, so blocks of rows sorted on torch's thread count of Python threads use them all.
Order-preserving integer codes of floats, to sort (value, position) pairs as single int64 values; and
ragged per-row entries packed into padded [rows, width] tensors."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

MIN_ELEMENTS_PER_THREAD = 1 << 16  # below this a thread costs more than it saves

_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """One lazily made pool per thread count, reused across calls."""
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lookalike-rows")
    return _pools[threads]


def map_rows(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """fn(x) for a row-wise fn (each output row depends on its input row only), on blocks of rows in parallel."""
    threads = min(torch.get_num_threads(), len(x), max(1, x.size // MIN_ELEMENTS_PER_THREAD))
    if threads <= 1:
        return fn(x)
    bounds = np.linspace(0, len(x), threads + 1).astype(int)
    parts = [_pool(threads).submit(fn, x[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return np.concatenate([part.result() for part in parts])


def argpartition_rows(x: np.ndarray, kth: int) -> np.ndarray:
    """np.argpartition(x, kth, axis=1), rows in parallel."""
    return map_rows(lambda block: np.argpartition(block, kth, axis=1), x)


def partition_rows(x: np.ndarray, kth: int) -> np.ndarray:
    """np.partition(x, kth, axis=1), rows in parallel."""
    return map_rows(lambda block: np.partition(block, kth, axis=1), x)


def sort_rows(x: np.ndarray) -> np.ndarray:
    """np.sort(x, axis=1), rows in parallel."""
    return map_rows(lambda block: np.sort(block, axis=1), x)


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
