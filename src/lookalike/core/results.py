"""RetrievalResults: the top-K gallery rows of every query, with ascending distances, saved as one file."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from lookalike.core.atomic import atomic_path
from lookalike.core.errors import LookalikeError, LookalikeWarning

PAD = -1  # index of an empty slot when fewer than K gallery items are available
Metric = Literal["cosine", "euclidean"]  # distance of search and re-ranking: 1 - cos(q, g), or |q - g|
METRICS: tuple[str, ...] = get_args(Metric)  # the one list of metrics (the config's search.metric is a Metric)


def check_metric(metric: str) -> Metric:
    """`metric` when it is one of METRICS; else one line naming them (a config is checked at load, by its Literal)."""
    if metric not in METRICS:
        raise LookalikeError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    return metric


@dataclass(frozen=True)
class RetrievalResults:
    """For Q queries: gallery positions [Q, K] (int64, PAD when empty) and distances [Q, K] (float32, ascending)."""

    indices: np.ndarray
    distances: np.ndarray
    query_ids: np.ndarray
    gallery_ids: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        indices = np.asarray(self.indices, dtype=np.int64)
        distances = np.asarray(self.distances, dtype=np.float32)
        query_ids, gallery_ids = np.asarray(self.query_ids), np.asarray(self.gallery_ids)
        if indices.ndim != 2 or indices.shape != distances.shape:
            raise LookalikeError(
                f"results: indices {indices.shape} and distances {distances.shape} must be equal [Q, K]"
            )
        if len(query_ids) != len(indices):
            raise LookalikeError(f"results: {len(indices)} rows but {len(query_ids)} query ids")
        if indices.size and (indices.max() >= len(gallery_ids) or indices.min() < PAD):
            raise LookalikeError(f"results: indices must lie in [-1, {len(gallery_ids) - 1}]")
        for name, value in (
            ("indices", indices),
            ("distances", distances),
            ("query_ids", query_ids),
            ("gallery_ids", gallery_ids),
        ):
            object.__setattr__(self, name, value)

    @property
    def n_queries(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @property
    def valid(self) -> np.ndarray:
        """Mask [Q, K] of filled slots."""
        return self.indices != PAD

    def top(self, k: int) -> RetrievalResults:
        """The first k columns."""
        return RetrievalResults(
            self.indices[:, :k], self.distances[:, :k], self.query_ids, self.gallery_ids, dict(self.meta)
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write everything into one .npz file atomically."""
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    indices=self.indices,
                    distances=self.distances,
                    query_ids=self.query_ids.astype(str),
                    gallery_ids=self.gallery_ids.astype(str),
                    meta=np.array(json.dumps(self.meta)),
                )

    @classmethod
    def load(cls, path: str | os.PathLike) -> RetrievalResults:
        """Read results written by `save`."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(
                    data["indices"],
                    data["distances"],
                    data["query_ids"],
                    data["gallery_ids"],
                    json.loads(str(data["meta"])),
                )
        except FileNotFoundError:
            raise LookalikeError(f"{path}: no such results file") from None
        except (KeyError, ValueError, OSError) as exc:
            raise LookalikeError(f"{path}: not a results file written by lookalike ({exc})") from None


def hidden_counts(exclude: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Gallery items each query hides [Q] under `exclude=(query_groups, gallery_groups)`: those of its own group."""
    qg, gg = (np.asarray(a, dtype=np.int64) for a in exclude)
    groups, counts = np.unique(gg, return_counts=True)
    if not len(groups):
        return np.zeros(len(qg), dtype=np.int64)
    pos = np.minimum(np.searchsorted(groups, qg), len(groups) - 1)
    return np.where(groups[pos] == qg, counts[pos], 0).astype(np.int64)


def max_hidden(exclude: tuple[np.ndarray, np.ndarray]) -> int:
    """The largest number of gallery items any query hides under `exclude=(query_groups, gallery_groups)`."""
    return int(hidden_counts(exclude).max(initial=0))


def visible_counts(n_gallery: int, n_queries: int, exclude: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Gallery items each query may see [Q]: all of them but its own group's (itself, its sequence)."""
    if exclude is None:
        return np.full(n_queries, n_gallery, dtype=np.int64)
    return n_gallery - hidden_counts(exclude)


def clamp_k(k: int, n_gallery: int, n_queries: int, exclude: tuple[np.ndarray, np.ndarray] | None = None) -> int:
    """k, or the most gallery items any query may see when k is larger (with a one-line LookalikeWarning saying so):
    the extra columns could hold nothing but padding."""
    limit = int(visible_counts(n_gallery, n_queries, exclude).max(initial=0))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= limit or limit < 1:
        return k
    seen = " a query may see" if exclude is not None else ""
    warnings.warn(
        LookalikeWarning(f"search.k: {k} is more than the {limit} gallery items{seen}; the lists hold {limit}"),
        stacklevel=3,
    )
    return limit


def ranks_everything(results: RetrievalResults, exclude: tuple[np.ndarray, np.ndarray] | None) -> bool:
    """Whether every query's list holds all the gallery items it may see (a row with empty slots ran out of them)."""
    n_valid = results.valid.sum(1)
    visible = visible_counts(len(results.gallery_ids), results.n_queries, exclude)
    return bool(((n_valid >= visible) | (n_valid < results.k)).all())


def drop_hidden(
    index: np.ndarray, dist: np.ndarray, exclude: tuple[np.ndarray, np.ndarray] | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a search run without `exclude` for k + max_hidden items: the hidden ones removed, the rest moved up
    in order, cut or padded (PAD, inf) to k columns."""
    empty = index < 0
    if exclude is not None:
        qg, gg = (np.asarray(a, dtype=np.int64) for a in exclude)
        empty |= gg[np.maximum(index, 0)] == qg[:, None]
    if index.shape[1] > k and (np.count_nonzero(empty, axis=1) <= 1).all():  # one slot at most to skip per row (the
        columns = np.arange(k)  # common self-exclusion): each row's first k columns, past its empty one if any
        skip = np.where(empty.any(1), empty.argmax(1), k)[:, None]
        keep = columns + (columns >= skip)
        return np.take_along_axis(index, keep, 1), np.take_along_axis(dist, keep, 1)
    index = np.where(empty, PAD, index)
    order = np.argsort(empty, axis=1, kind="stable")
    index, dist = np.take_along_axis(index, order, 1), np.take_along_axis(dist, order, 1)
    empty = index < 0
    dist[empty] = np.inf
    index[empty] = PAD
    if index.shape[1] < k:
        pad = ((0, 0), (0, k - index.shape[1]))
        index, dist = np.pad(index, pad, constant_values=PAD), np.pad(dist, pad, constant_values=np.inf)
    return index[:, :k], dist[:, :k]
