"""Exact k-NN by blocked matrix product: memory bounded by the block sizes, never a full Q x G matrix."""

from __future__ import annotations

import numpy as np
import torch

from lookalike.errors import LookalikeError
from lookalike.search.results import PAD

METRICS = ("cosine", "euclidean")


def as_tensor(x: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """A float32 tensor on `device` (or where it already lives), without copying when possible."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device or t.device, dtype=torch.float32)


def exact_knn(
    queries: np.ndarray | torch.Tensor,
    gallery: np.ndarray | torch.Tensor,
    k: int,
    metric: str = "cosine",
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    query_block: int = 1024,
    gallery_block: int = 16384,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery positions [Q, k] and ascending distances [Q, k] for every query.

    `exclude=(query_groups, gallery_groups)` (int arrays) hides gallery items whose group equals the
    query's (the item itself, or its sequence). Slots left empty hold PAD and distance inf. Extra
    memory is one query_block x gallery_block score buffer, whatever the gallery size.
    """
    if metric not in METRICS:
        raise LookalikeError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    q, g = as_tensor(queries, device), as_tensor(gallery, device)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise LookalikeError(f"search: queries {tuple(q.shape)} and gallery {tuple(g.shape)} must be [N, D] with equal D")
    if k < 1:
        raise LookalikeError(f"k: expected a positive integer, got {k}")
    g = g.to(q.device)
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
    groups = _group_tensors(exclude, q.device, len(q), len(g))
    buffer = torch.empty(min(query_block, len(q)) * min(gallery_block, len(g)), device=q.device)
    scores, indices = [], []
    with torch.inference_mode():
        for start in range(0, len(q), query_block):
            stop = min(start + query_block, len(q))
            q_groups = groups[0][start:stop] if groups else None
            s, i = _top_scores(q[start:stop], g, metric, k, gallery_block, buffer, q_groups, groups[1] if groups else None)
            scores.append(s)
            indices.append(i)
    score = torch.cat(scores) if scores else torch.empty(0, k, device=q.device)
    index = torch.cat(indices) if indices else torch.empty(0, k, dtype=torch.int64, device=q.device)
    return _to_results(score, index, q, metric, k)


def _group_tensors(exclude, device, n_q: int, n_g: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if exclude is None:
        return None
    qg, gg = (torch.tensor(np.asarray(a, dtype=np.int64), device=device) for a in exclude)
    if qg.shape != (n_q,) or gg.shape != (n_g,):
        raise LookalikeError(f"exclude: expected group arrays of length {n_q} and {n_g}, got {tuple(qg.shape)} and {tuple(gg.shape)}")
    return qg, gg


def _block_scores(q: torch.Tensor, g_block: torch.Tensor, metric: str, out: torch.Tensor) -> torch.Tensor:
    """Scores [bq, bg] written into `out` (higher = closer): cosine similarity, or 2 q.g - |g|^2 for euclidean."""
    if metric == "cosine":
        g_block = torch.nn.functional.normalize(g_block, dim=1)
    s = torch.mm(q, g_block.T, out=out)
    if metric == "euclidean":  # -|q-g|^2 + |q|^2: the same order per query
        s.mul_(2).sub_((g_block * g_block).sum(1))
    return s


def _top_scores(q, g, metric, k, gallery_block, buffer, q_groups, g_groups) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k over gallery blocks for one block of queries, sorted by descending score."""
    best_s = torch.full((len(q), 0), -torch.inf, device=q.device)
    best_i = torch.empty((len(q), 0), dtype=torch.int64, device=q.device)
    for start in range(0, len(g), gallery_block):
        stop = min(start + gallery_block, len(g))
        out = buffer[: len(q) * (stop - start)].view(len(q), stop - start)
        s = _block_scores(q, g[start:stop], metric, out)
        if q_groups is not None:
            s.masked_fill_(q_groups[:, None] == g_groups[None, start:stop], -torch.inf)
        s, i = torch.topk(s, min(k, stop - start), dim=1, sorted=False)
        best_s, best_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1)
        if best_s.shape[1] > k:
            best_s, pos = torch.topk(best_s, k, dim=1, sorted=False)
            best_i = torch.gather(best_i, 1, pos)
    best_s, pos = torch.sort(best_s, dim=1, descending=True, stable=True)
    return best_s, torch.gather(best_i, 1, pos)


def _to_results(score, index, q, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Convert scores to ascending distances, pad to k columns, mark excluded/missing slots PAD."""
    if metric == "cosine":
        dist = 1.0 - score
    else:
        dist = torch.sqrt(torch.clamp(-score + (q * q).sum(1, keepdim=True), min=0.0))
    empty = torch.isinf(score)
    dist = dist.masked_fill(empty, torch.inf)
    index = index.masked_fill(empty, PAD)
    if dist.shape[1] < k:
        pad = k - dist.shape[1]
        dist = torch.nn.functional.pad(dist, (0, pad), value=torch.inf)
        index = torch.nn.functional.pad(index, (0, pad), value=PAD)
    return index.cpu().numpy(), dist.cpu().numpy().astype(np.float32)
