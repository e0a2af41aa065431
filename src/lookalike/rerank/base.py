"""The re-ranker interface: RetrievalResults in, RetrievalResults out; re-rankers chain.

A re-ranker re-orders (and re-scores) the first columns of each query's list. Whatever it does not touch
keeps its order after them, and distances stay ascending along every row. What a re-ranker may need
beyond the list (embeddings, gallery-gallery neighbours, images) comes in a RerankContext.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.results import RetrievalResults
from lookalike.core.table import DatasetTable


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

    def require(self, *names: str, by: str) -> None:
        """Fail with one line when a field a re-ranker needs is missing."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise LookalikeError(
                f"rerank {by}: needs {', '.join(missing)} (embeddings of the queries/gallery of the results)"
            )


class Reranker(ABC):
    """Re-orders the top of every query's list; `name` is its key in the registry and in configs."""

    name: ClassVar[str]
    first_only: ClassVar[bool] = False  # must be the chain's first stage (it replaces the gallery the others rank)
    uses_embeddings: ClassVar[bool] = True  # reads context.queries / context.gallery (False: e.g. images only)

    @abstractmethod
    def rerank(self, results: RetrievalResults, context: RerankContext) -> RetrievalResults:
        """New results over the same queries (the gallery may change, e.g. to centroids)."""


RERANKERS: dict[str, type[Reranker]] = {}


def register(cls: type[Reranker]) -> type[Reranker]:
    """Class decorator: make a re-ranker available by its `name` (timm-style registry)."""
    RERANKERS[cls.name] = cls
    return cls


def list_rerankers() -> list[str]:
    """The names `create_reranker` and a config's `rerank:` chain accept, sorted.

    Returns:
        Every registered re-ranker's name.

    Example:
        >>> import lookalike
        >>> lookalike.list_rerankers()
        ['centroids', 'dba', 'icfrr', 'kreciprocal', 'pairwise', 'qe']
    """
    return sorted(RERANKERS)


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
