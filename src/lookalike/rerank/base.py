"""The re-ranker interface: RetrievalResults in, RetrievalResults out; re-rankers chain.

A re-ranker re-orders (and re-scores) the first columns of each query's list. Whatever it does not touch
keeps its order after them, and distances stay ascending along every row. What a re-ranker may need
beyond the list (embeddings, gallery-gallery neighbours, images) comes in a RerankContext.
"""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.results import PAD, RetrievalResults, check_metric
from lookalike.core.table import DatasetTable

MERGE_GAP = np.float32(1000 * np.finfo(np.float32).eps)  # relative gap kept below the first untouched distance
CAPABILITIES = ("needs_vectors", "needs_images", "needs_labels", "needs_model", "first_only", "servable")


@dataclass
class RerankContext:
    """What re-rankers may use besides the list. Embeddings are in the row order of the results' ids."""

    queries: Embeddings | None = None  # one vector per results.query_ids
    gallery: Embeddings | None = None  # one vector per results.gallery_ids
    metric: str = "cosine"
    exclude: tuple[np.ndarray, np.ndarray] | None = (
        None  # (query groups, gallery groups): never a match (self, sequence)
    )
    gallery_distances: np.ndarray | None = None  # optional dense [G, G] distances (e.g. an imported ICFRR cache)
    table: DatasetTable | None = None  # the dataset table the ids come from (labels, sequences)
    query_labels: np.ndarray | None = None  # ground truth for per-stage metrics
    gallery_labels: np.ndarray | None = None  # replaced when a stage changes the gallery (centroids)
    n_relevant: np.ndarray | None = None  # relevant gallery items per query when they cannot be counted from labels
    cache: dict[str, Any] = field(default_factory=dict)  # shared between stages (e.g. gallery k-NN lists)

    @classmethod
    def over_candidates(
        cls, results: RetrievalResults, queries: Embeddings, backend: Any, **fields: Any
    ) -> RerankContext:
        """A context over the candidates of `results` from a gallery backend that stores the vectors (Milvus).

        Args:
            results: what the backend's `search` returned (its gallery ids are the candidates).
            queries: the query vectors, one per results.query_ids.
            backend: has `vectors(ids) -> [n, D]` and `metric` (e.g. lookalike.search.milvus.MilvusGallery).
            **fields: further context fields (exclude, table, labels, cache).

        Returns:
            The context that re-rankers reading gallery vectors (qe, dba, kreciprocal, icfrr, centroids) need.
        """
        gallery = Embeddings(backend.vectors(results.gallery_ids), results.gallery_ids)
        return cls(queries=queries, gallery=gallery, metric=backend.metric, **fields)

    def require(self, *names: str, by: str) -> None:
        """Fail with one line when a field a re-ranker needs is missing."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise LookalikeError(
                f"rerank {by}: needs {', '.join(missing)} (embeddings of the queries/gallery of the results)"
            )


class Reranker(ABC):
    """Re-orders the top of every query's list; `name` is its key in the registry and in configs.

    The class attributes declare what it needs and where it may run, so callers (the chain, the web app) read them
    instead of keeping lists of names.
    """

    name: ClassVar[str]
    needs_vectors: ClassVar[bool] = True  # reads context.queries / context.gallery (False: e.g. images only)
    needs_images: ClassVar[bool] = False  # reads the images of the list's pairs (context.table's paths)
    needs_labels: ClassVar[bool] = False  # reads context.table's labels (e.g. one centroid per label)
    needs_model: ClassVar[bool] = False  # loads trained weights (`load()` loads and checks them up front)
    first_only: ClassVar[bool] = False  # must be the chain's first stage (it replaces the gallery the others rank)
    servable: ClassVar[bool] = True  # can re-rank the list of an uploaded query (web app)

    @abstractmethod
    def rerank(self, results: RetrievalResults, context: RerankContext) -> RetrievalResults:
        """New results over the same queries (the gallery may change, e.g. to centroids)."""

    @property
    def head(self) -> int | None:
        """How many leading items of each list it re-orders (the rest stay after them); None: the whole list."""
        return None

    def params(self) -> dict[str, Any]:
        """The constructor's parameters as given, JSON-safe (paths and objects as text): what `meta` records."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {n: _json_safe(getattr(self, n)) for n in names if hasattr(self, n)}

    def load(self) -> None:
        """Load what it needs before the first list (trained weights), so a bad file fails now; nothing by default."""
        return None

    def recorded(self, results: RetrievalResults, **extra: Any) -> RetrievalResults:
        """The results (a fresh output: its meta is changed in place) with this stage's record ({name, parameters,
        extra}) appended to meta["rerank"]."""
        record = {"name": self.name, **self.params(), **extra}
        results.meta["rerank"] = [*results.meta.get("rerank", []), record]
        return results


def _json_safe(value: Any) -> Any:
    """A parameter value as meta can store it: plain values as they are, paths and objects as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return os.fspath(value) if isinstance(value, os.PathLike) else type(value).__name__


RERANKERS: dict[str, type[Reranker]] = {}


def register(cls: type[Reranker]) -> type[Reranker]:
    """Class decorator: make a re-ranker available by its `name` (timm-style registry); a name taken by another
    class is an error (the same class imported again, e.g. by a module reload, replaces itself)."""
    known = RERANKERS.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise LookalikeError(
            f"rerank: the name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}; "
            f"give {cls.__module__}.{cls.__qualname__} another name"
        )
    RERANKERS[cls.name] = cls
    return cls


def list_rerankers(**capabilities: bool) -> list[str]:
    """The names `create_reranker` and a config's `rerank:` chain accept, sorted; optionally only those with the
    given capabilities (e.g. servable=True).

    Args:
        **capabilities: class attributes to match (CAPABILITIES), e.g. needs_images=False.

    Returns:
        The matching registered re-rankers' names.

    Example:
        >>> import lookalike
        >>> lookalike.list_rerankers()
        ['centroids', 'dba', 'icfrr', 'kreciprocal', 'pairwise', 'qe']
    """
    unknown = set(capabilities) - set(CAPABILITIES)
    if unknown:
        raise LookalikeError(f"rerank: unknown capability {sorted(unknown)[0]!r}; expected one of {CAPABILITIES}")
    return sorted(n for n, cls in RERANKERS.items() if all(getattr(cls, k) == v for k, v in capabilities.items()))


def create_reranker(name: str, **params: Any) -> Reranker:
    """The re-ranker registered under `name`, built with `params`; unknown names and parameters are one-line errors.

    Args:
        name: a registered name (`list_rerankers()`).
        **params: the re-ranker's parameters (README, "Re-ranking"), e.g. kg=10 for icfrr.

    Returns:
        The re-ranker; `rerank(results, RerankContext(...))` gives new RetrievalResults over the same queries.

    Example:
        >>> import lookalike
        >>> lookalike.create_reranker("qe", n=3).name
        'qe'
    """
    if name not in RERANKERS:
        raise LookalikeError(f"rerank: unknown re-ranker {name!r}; expected one of {', '.join(sorted(RERANKERS))}")
    try:
        return RERANKERS[name](**params)
    except TypeError as exc:
        raise LookalikeError(f"rerank {name}: {exc}") from None


def check_ascending(results: RetrievalResults) -> None:
    """Every row's filled distances ascend (the contract of a re-ranker's output)."""
    d = np.where(results.valid, results.distances, np.finfo(np.float32).max)  # empty slots last, no inf - inf
    if d.shape[1] > 1 and (np.diff(d, axis=1) < -1e-6).any():
        raise LookalikeError("rerank: distances must stay ascending along each row")


def positive_int(value: int, name: str, by: str) -> int:
    """`value` as an int >= 1, or a one-line error naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise LookalikeError(f"rerank {by}: {name} must be a positive integer, got {value!r}")
    return int(value)


# ---- helpers shared by re-rankers that re-sort or re-score the head of each list ----


def context_vectors(results: RetrievalResults, context: RerankContext, by: str) -> tuple[np.ndarray, np.ndarray]:
    """Query and gallery vectors of the context, checked against the results' sizes."""
    context.require("queries", "gallery", by=by)
    queries, gallery = context.queries.vectors, context.gallery.vectors
    if len(queries) != results.n_queries or len(gallery) != len(results.gallery_ids):
        raise LookalikeError(
            f"rerank {by}: context has {len(queries)} query / {len(gallery)} gallery vectors for results of "
            f"{results.n_queries} queries / {len(results.gallery_ids)} gallery items"
        )
    if queries.shape[1] != gallery.shape[1]:
        raise LookalikeError(f"rerank {by}: query dim {queries.shape[1]} differs from gallery dim {gallery.shape[1]}")
    check_metric(context.metric)
    return queries, gallery


def drop_excluded(results: RetrievalResults, exclude: tuple[np.ndarray, np.ndarray] | None) -> RetrievalResults:
    """The results without items of the query's exclusion group (self, same sequence): they become PAD at the end."""
    if exclude is None:
        return results
    q_groups, g_groups = (np.asarray(a, dtype=np.int64) for a in exclude)
    if q_groups.shape != (results.n_queries,) or g_groups.shape != (len(results.gallery_ids),):
        raise LookalikeError(
            f"exclude: expected group arrays of length {results.n_queries} and {len(results.gallery_ids)}, "
            f"got {q_groups.shape} and {g_groups.shape}"
        )
    valid = results.valid
    keep = valid & (g_groups[np.where(valid, results.indices, 0)] != q_groups[:, None])
    if keep.sum() == valid.sum():
        return results
    order = np.argsort(~keep, axis=1, kind="stable")
    indices = np.take_along_axis(np.where(keep, results.indices, PAD), order, 1)
    distances = np.take_along_axis(np.where(keep, results.distances, np.inf), order, 1)
    return RetrievalResults(indices, distances, results.query_ids, results.gallery_ids, dict(results.meta))


def pair_sqdist(a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int) -> np.ndarray:
    """Squared euclidean distances |a[rows] - b[cols]|^2 in float64, `chunk` pairs at a time."""
    out = np.empty(len(rows), dtype=np.float64)
    for s in range(0, len(rows), chunk):
        diff = a[rows[s : s + chunk]].astype(np.float64) - b[cols[s : s + chunk]]
        out[s : s + chunk] = np.einsum("pd,pd->p", diff, diff)
    return out


# ---- the merge rule: a re-scored head fitted back into its list (every re-ranker with a head uses it) ----


def merge_head(results: RetrievalResults, head_distances: np.ndarray) -> RetrievalResults:
    """Sort each row's first n = head_distances.shape[1] items by their new distances and keep the rest in place.

    Open Metric Learning's rule (its PairwiseReranker, so STIR's rankings are the same): the head is sorted by the
    new distances, ties in their old order; everything after it keeps its place and its distances. When the largest
    new distance exceeds the row's next original distance t, the new distances are moved below t: scaled by
    m / max(d) with m = t (1 - MERGE_GAP) when t > 0 (OML subtracts an absolute 1000 epsilons after scaling to t,
    which turns them negative when t < ~1e-4; here they stay in [0, t)), shifted by m - max(d) with
    m = t - MERGE_GAP |t| when t <= 0 (a negative ratio would flip them). A head already ascending is not re-sorted
    (the same result, without the sort).

    Args:
        results: the incoming list.
        head_distances: new distances [Q, n] of each row's first n items, in their incoming order (PAD slots ignored).

    Returns:
        The merged results (meta copied); distances ascend along every row.
    """
    n = head_distances.shape[1]
    head = results.indices[:, :n]
    new = np.where(head == PAD, np.inf, head_distances).astype(np.float32)
    with np.errstate(invalid="ignore"):  # inf - inf on PAD slots: nan, not a descent
        unsorted = np.isnan(new).any() or (np.diff(new, axis=1) < 0).any()
    if unsorted:
        order = np.argsort(new, axis=1, kind="stable")
        head, new = np.take_along_axis(head, order, 1), np.take_along_axis(new, order, 1)
    if results.k > n > 0:
        new = _below_next(new, np.where(results.indices[:, n] != PAD, results.distances[:, n], np.inf))
    return RetrievalResults(
        np.concatenate([head, results.indices[:, n:]], 1),
        np.concatenate([new, results.distances[:, n:]], axis=1),
        results.query_ids,
        results.gallery_ids,
        dict(results.meta),
    )


def _below_next(new: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Sorted new head distances [Q, n] moved below each row's next original distance nxt [Q] where they exceed it:
    their largest becomes m = t - gap |t| (at least one float32 step below t), by scaling d * m / max(d) when t > 0
    and by shifting d - (max(d) - m) otherwise."""
    finite = np.isfinite(new)
    top = np.where(finite, new, -np.inf).max(axis=1)
    need = np.isfinite(top) & (top > nxt)
    t = np.where(need, nxt, 1.0).astype(np.float32)
    m = np.minimum(t - MERGE_GAP * np.abs(t), np.nextafter(t, np.float32(-np.inf)))
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = new * (m / np.where(need, top, 1.0))[:, None]
    moved = np.where((t > 0)[:, None], scaled, new - (top - m)[:, None])
    moved = np.minimum(moved, m[:, None])  # float32 rounding never lifts a moved distance above m
    return np.where(need[:, None] & finite, moved, new).astype(np.float32)
