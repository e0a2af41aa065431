"""Exact k-NN by blocked matrix product: memory bounded by the block sizes, never a full Q x G matrix."""

from __future__ import annotations

import numpy as np
import torch

from lookalike.core.errors import LookalikeError
from lookalike.core.results import PAD, check_metric, drop_hidden, max_hidden
from lookalike.devices import resolve_device
from lookalike.progress import Progress
from lookalike.rows import float_from_sortable_bits, pack_rows, sort_by_value

CHUNK = 8  # most columns per chunk in the top-k candidate filter
MIN_CHUNK = 4  # fewer columns per chunk than this: a direct selection is faster than the filter
COARSE_WIDTH = 4  # coarse chunk maxima per wanted neighbour when bounding the k-th score


def as_tensor(x: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """A float32 tensor on `device` (auto: the best present; None: where it already lives), without copying when
    possible."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=resolve_device(device, "search.device") if device is not None else t.device, dtype=torch.float32)


def exact_knn(
    queries: np.ndarray | torch.Tensor,
    gallery: np.ndarray | torch.Tensor,
    k: int,
    metric: str = "cosine",
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    query_block: int = 1024,
    gallery_block: int = 16384,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery positions [Q, k] and ascending distances [Q, k] for every query; equal distances in
    gallery order (which of several items tied at the k-th distance stay in is left open).

    `exclude=(query_groups, gallery_groups)` (int arrays) hides gallery items whose group equals the
    query's (the item itself, or its sequence). Slots left empty hold PAD and distance inf. Extra
    memory is one query_block x gallery_block score block, whatever the gallery size. `progress(blocks, total)`
    may wrap the loop over query blocks.
    """
    check_metric(metric)
    q, g = as_tensor(queries, device), as_tensor(gallery, device)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise LookalikeError(
            f"search: queries {tuple(q.shape)} and gallery {tuple(g.shape)} must be [N, D] with equal D"
        )
    if k < 1:
        raise LookalikeError(f"k: expected a positive integer, got {k}")
    groups = _group_tensors(exclude, q.device, len(q), len(g))
    n_hidden = max_hidden(exclude) if groups is not None and len(g) else None
    if n_hidden is not None and n_hidden <= k:  # few hidden: search k + that many unmasked, then drop them
        index, dist = exact_knn(
            queries, gallery, min(k + n_hidden, len(g)), metric, None, query_block, gallery_block, device, progress
        )
        return drop_hidden(index, dist, exclude, k)
    g = g.to(q.device)
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
    buffer = (
        None if _uses_onednn(q) else torch.empty(min(query_block, len(q)) * min(gallery_block, len(g)), device=q.device)
    )
    index, dist = np.empty((len(q), k), np.int64), np.empty((len(q), k), np.float32)
    with torch.inference_mode():
        blocks = range(0, len(q), query_block)
        for start in progress(blocks, len(blocks)) if progress else blocks:
            stop = min(start + query_block, len(q))
            q_groups = groups[0][start:stop] if groups else None
            s, i = _top_scores(
                q[start:stop], g, metric, k, gallery_block, buffer, q_groups, groups[1] if groups else None
            )
            index[start:stop], dist[start:stop] = _to_results(s, i, q[start:stop], metric)
    return index, dist


def _group_tensors(exclude, device, n_q: int, n_g: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if exclude is None:
        return None
    qg, gg = (torch.tensor(np.asarray(a, dtype=np.int64), device=device) for a in exclude)
    if qg.shape != (n_q,) or gg.shape != (n_g,):
        raise LookalikeError(
            f"exclude: expected group arrays of length {n_q} and {n_g}, got {tuple(qg.shape)} and {tuple(gg.shape)}"
        )
    return qg, gg


def _onednn_linear():
    """torch's oneDNN fp32 linear kernel, or None on builds without it."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


ONEDNN_LINEAR = _onednn_linear()


def _uses_onednn(x: torch.Tensor) -> bool:
    """Whether products with `x` go through oneDNN (fp32 on the CPU, torch built with it)."""
    return ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32


def _matmul_nt(a: torch.Tensor, b: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """a @ b.T in fp32. On the CPU through oneDNN, whose kernels follow the CPU's instruction set
    where MKL's sgemm (torch.mm) stays on AVX2 on AMD processors: 1.6x faster on this machine's EPYC
    (docs/benchmarks.md). Elsewhere torch.mm into the reused `buffer`."""
    if _uses_onednn(a):
        return ONEDNN_LINEAR(a.contiguous(), b.contiguous(), None, "none", [], "")
    return torch.mm(a, b.T, out=buffer[: len(a) * len(b)].view(len(a), len(b)))


def _block_scores(q: torch.Tensor, g_block: torch.Tensor, metric: str, buffer: torch.Tensor | None) -> torch.Tensor:
    """Scores [bq, bg] (higher = closer): cosine similarity, or 2 q.g - |g|^2 for euclidean."""
    if metric == "cosine":
        g_block = torch.nn.functional.normalize(g_block, dim=1)
    s = _matmul_nt(q, g_block, buffer)
    if metric == "euclidean":  # -|q-g|^2 + |q|^2: the same order per query
        s.mul_(2).sub_((g_block * g_block).sum(1))
    return s


def _top_scores(q, g, metric, k, gallery_block, buffer, q_groups, g_groups) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k scores and gallery positions over gallery blocks for one block of queries, unordered."""
    best_s = torch.full((len(q), 0), -torch.inf, device=q.device)
    best_i = torch.full((len(q), 0), PAD, dtype=torch.int64, device=q.device)
    for start in range(0, len(g), gallery_block):
        stop = min(start + gallery_block, len(g))
        s = _block_scores(q, g[start:stop], metric, buffer)
        if q_groups is not None:
            s.masked_fill_(q_groups[:, None] == g_groups[None, start:stop], -torch.inf)
        floor = best_s.amin(1) if best_s.shape[1] == k else torch.full((len(q),), -torch.inf, device=q.device)
        cand_s, cand_i = _candidates(s, k, floor)
        best_s, best_i = _keep_top_k(torch.cat([best_s, cand_s], 1), torch.cat([best_i, cand_i + start], 1), k)
        del s, cand_s, cand_i  # free this block's scores before the next one is allocated
    return _keep_top_k(best_s, best_i, k)  # padded to k columns when the gallery has fewer items


def _keep_top_k(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (score, index) columns of each row, unordered; padded with (-inf, PAD) when there are fewer."""
    if scores.shape[1] > k:
        scores, pos = _top_k(scores, k)
        return scores, torch.gather(index, 1, pos)
    pad = k - scores.shape[1]
    return torch.nn.functional.pad(scores, (0, pad), value=-torch.inf), torch.nn.functional.pad(
        index, (0, pad), value=PAD
    )


def _top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest values and their positions, unordered. On the CPU numpy's AVX-512
    partition: 1.3-4x faster than torch.topk on both cores (docs/benchmarks.md)."""
    if x.device.type != "cpu":
        return torch.topk(x, k, dim=1, sorted=False)
    width = x.shape[1]
    pos = torch.from_numpy(np.ascontiguousarray(np.argpartition(x.numpy(), width - k, axis=1)[:, width - k :]))
    return x.gather(1, pos), pos


def _kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k-th largest value."""
    if x.device.type != "cpu":
        return torch.topk(x, k, dim=1, sorted=False).values.amin(1)
    return torch.from_numpy(np.partition(x.numpy(), x.shape[1] - k, axis=1)[:, x.shape[1] - k])


def _candidates(s: torch.Tensor, k: int, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [bq, w] and block columns of a superset of each row's top-k in `s`, padded with -inf.

    Why: a full top-k over every score row costs as much again as its matrix product. Each row's
    k-th best score is bounded from below by the k-th largest maximum over disjoint column chunks
    (and by `floor`, the k-th best of earlier blocks), so only chunks reaching that bound can hold a
    top-k score: a pass of maxima, then a few hundred candidates per row instead of the whole row.
    """
    n_rows, width = s.shape
    chunk = min(CHUNK, width // (2 * COARSE_WIDTH * k))  # at least 4k coarse chunks of 2 fine ones
    columns = torch.arange(width, device=s.device)
    if chunk < MIN_CHUNK:  # k too large a share of the row for the filter to pay: select directly
        return _top_k(s, k) if width > k else (s, columns.expand(n_rows, -1))
    n_chunks = width // chunk
    fine = _strided_max(s, chunk)  # [bq, n_chunks]; chunk j holds columns j, j + n_chunks, ...
    bound = floor
    if torch.isinf(floor).any():  # a row has no k-th score yet: bound it from this block's chunks
        coarse = _strided_max(fine, max(1, n_chunks // (COARSE_WIDTH * k)))
        bound = torch.maximum(_kth_largest(coarse, k), floor)
    rows, chunks = (fine >= bound[:, None]).nonzero(as_tuple=True)
    if len(rows) * chunk > s.numel() // 4:  # many ties at the bound (duplicates): select directly
        return _top_k(s, k)
    cols = chunks[:, None] + torch.arange(0, chunk * n_chunks, n_chunks, device=s.device)  # [N, chunk]
    values = s.reshape(-1).index_select(0, ((rows * width)[:, None] + cols).reshape(-1))
    keep = (values.view(-1, chunk) >= bound.index_select(0, rows)[:, None]).reshape(-1).nonzero().squeeze(1)
    rows, cols, values = (
        rows.index_select(0, keep // chunk),
        cols.reshape(-1).index_select(0, keep),
        values.index_select(0, keep),
    )
    packed_s, packed_i = pack_rows(rows, n_rows, (values, -torch.inf), (cols, PAD))
    tail = slice(chunk * n_chunks, width)  # the last width % chunk columns belong to no chunk
    return torch.cat([packed_s, s[:, tail]], 1), torch.cat([packed_i, columns[tail].expand(n_rows, -1)], 1)


def _strided_max(s: torch.Tensor, size: int) -> torch.Tensor:
    """Row maxima over chunks of `size` columns taken `width // size` apart: one vectorised pass."""
    n = s.shape[1] // size
    return s[:, : n * size].view(len(s), size, n).amax(1)


def _to_results(score, index, q, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Distances from scores, excluded/missing slots as PAD and inf, each row by ascending distance then position."""
    if metric == "cosine":
        dist = 1.0 - score
    else:
        dist = torch.sqrt(torch.clamp(-score + (q * q).sum(1, keepdim=True), min=0.0))
    empty = torch.isinf(score)
    dist = dist.masked_fill(empty, torch.inf).cpu().numpy().astype(np.float32)
    return order_by_distance(index.masked_fill(empty, PAD).cpu().numpy(), dist)


def order_by_distance(index: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (gallery position, float32 distance) sorted by distance, equal distances by position.

    One sort of int64 keys (distance bits above, position below) instead of a two-key lexsort: 10x faster.
    """
    shifted, codes = sort_by_value(dist, index + 1)  # + 1: PAD (-1) becomes 0
    return shifted - 1, float_from_sortable_bits(codes)
