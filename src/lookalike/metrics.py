"""Retrieval metrics with Open Metric Learning's definitions: CMC@k, precision@k, mAP@k, AP over the ranking,
R-precision.

All are pure functions of (RetrievalResults, ground truth), vectorised over queries. A query with no
relevant gallery item gets NaN, is listed in the report and is left out of every mean.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lookalike.core.atomic import write_text_atomic
from lookalike.core.errors import LookalikeError
from lookalike.core.protocol import exclusion_groups
from lookalike.core.results import RetrievalResults, ranks_everything
from lookalike.core.table import DatasetTable


@dataclass
class MetricsReport:
    """Per-query metric arrays, their means over queries with a relevant item, and per-category means."""

    per_query: dict[str, np.ndarray]
    means: dict[str, float]
    n_queries: int
    no_relevant_ids: list[str]
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    complete_ranking: bool = True
    relevance: np.ndarray | None = None  # [Q, K] bool, the ground truth the numbers came from
    n_relevant: np.ndarray | None = None  # [Q] relevant gallery items per query

    @property
    def n_evaluated(self) -> int:
        return self.n_queries - len(self.no_relevant_ids)

    def to_dict(self) -> dict:
        return {
            "means": self.means,
            "n_queries": self.n_queries,
            "n_evaluated": self.n_evaluated,
            "n_no_relevant": len(self.no_relevant_ids),
            "no_relevant_query_ids": self.no_relevant_ids,
            "per_category": self.per_category,
            "complete_ranking": self.complete_ranking,
        }

    def save(self, path: str | os.PathLike, provenance: dict | None = None) -> None:
        """Write the summary (not the per-query arrays), with the run's provenance record when given, as JSON
        atomically."""
        extra = {"provenance": provenance} if provenance else {}
        write_text_atomic(path, json.dumps({**self.to_dict(), **extra}, indent=2) + "\n")


def relevance(results: RetrievalResults, query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """Boolean [Q, K]: the retrieved item shares the query's label (empty slots are never relevant)."""
    q_codes, g_codes = _encode_labels(query_labels, gallery_labels)
    if len(q_codes) != results.n_queries or len(g_codes) != len(results.gallery_ids):
        raise LookalikeError(
            f"metrics: {len(q_codes)} query labels / {len(g_codes)} gallery labels for results of "
            f"{results.n_queries} queries / {len(results.gallery_ids)} gallery items"
        )
    retrieved = g_codes[np.maximum(results.indices, 0)]
    return results.valid & (retrieved == q_codes[:, None])


def count_relevant(
    query_labels: np.ndarray, gallery_labels: np.ndarray, exclude: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """Relevant gallery items per query: same label, minus those hidden by the query's exclusion group."""
    q_codes, g_codes = _encode_labels(query_labels, gallery_labels)
    per_label = np.bincount(g_codes, minlength=q_codes.max(initial=0) + 1)
    n_rel = per_label[q_codes]
    if exclude is not None:
        q_groups, g_groups = (np.asarray(a, dtype=np.int64) for a in exclude)
        pair_counts = pd.Series(1, index=pd.MultiIndex.from_arrays([g_codes, g_groups])).groupby(level=[0, 1]).sum()
        hidden = pair_counts.reindex(pd.MultiIndex.from_arrays([q_codes, q_groups]), fill_value=0).to_numpy()
        n_rel = n_rel - hidden
    return n_rel.astype(np.int64)


def _encode_labels(query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes shared by query and gallery labels (labels may be ints or strings)."""
    q, g = np.asarray(query_labels), np.asarray(gallery_labels)
    codes, _ = pd.factorize(
        np.concatenate([q.astype(str), g.astype(str)]) if q.dtype != g.dtype else np.concatenate([q, g])
    )
    return codes[: len(q)], codes[len(q) :]


def compute_metrics(
    results: RetrievalResults,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    cmc_k: tuple[int, ...] = (1, 5, 10),
    precision_k: tuple[int, ...] = (5, 10),
    map_k: tuple[int, ...] = (5, 10, 100),
    n_relevant: np.ndarray | None = None,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    query_categories: np.ndarray | None = None,
) -> MetricsReport:
    """CMC@k, precision@k, mAP@k, mAP@all (AP over the ranking) and R-precision for every query.

    Args:
        results: the ranked lists [Q, K].
        query_labels: label of each query [Q].
        gallery_labels: label of each gallery item [G]; same label = relevant.
        cmc_k: cut-offs of CMC@k.
        precision_k: cut-offs of precision@k.
        map_k: cut-offs of mAP@k.
        n_relevant: relevant items per query when labels cannot count them (e.g. a gallery of centroids).
        exclude: (query groups, gallery groups) that the search excluded, so they do not count as relevant.
        query_categories: a category per query for per-category means.

    Returns:
        MetricsReport: `means` ("cmc@1", "precision@5", "map@10", "map@all", "r_precision", ...), per-query arrays, and
        the queries without any relevant item (reported, left out of the means).

    Example:
        >>> import numpy as np, lookalike
        >>> indices, distances = np.array([[0, 1], [0, 1]]), np.array([[0.1, 0.5], [0.2, 0.3]])
        >>> results = lookalike.RetrievalResults(indices, distances, ["q0", "q1"], ["g0", "g1"])
        >>> report = lookalike.compute_metrics(results, ["a", "b"], ["a", "b"], cmc_k=(1, 2), map_k=(2,))
        >>> report.means["cmc@1"]
        0.5
    """
    _check_cutoffs(cmc_k=cmc_k, precision_k=precision_k, map_k=map_k)
    rel = relevance(results, query_labels, gallery_labels)
    n_rel = count_relevant(query_labels, gallery_labels, exclude) if n_relevant is None else np.asarray(n_relevant)
    hits = np.cumsum(rel, axis=1, dtype=np.int64)
    if (hits[:, -1] > n_rel).any() if hits.size else False:
        q = int(np.flatnonzero(hits[:, -1] > n_rel)[0])
        raise LookalikeError(
            f"metrics: query {results.query_ids[q]!r} retrieves {hits[q, -1]} relevant items but has only {n_rel[q]}"
        )
    per_query = _per_query(rel, hits, n_rel, cmc_k, precision_k, map_k)
    has_rel = n_rel > 0
    for values in per_query.values():
        values[~has_rel] = np.nan
    means = {name: float(np.mean(v[has_rel])) if has_rel.any() else float("nan") for name, v in per_query.items()}
    return MetricsReport(
        per_query=per_query,
        means=means,
        n_queries=results.n_queries,
        no_relevant_ids=[str(i) for i in np.asarray(results.query_ids)[~has_rel]],
        per_category=_per_category(per_query, has_rel, query_categories),
        complete_ranking=ranks_everything(results, exclude),
        relevance=rel,
        n_relevant=n_rel,
    )


def _check_cutoffs(**cutoffs: tuple[int, ...]) -> None:
    """Every cut-off k is a positive integer: cmc@0 would count an empty list as a hit."""
    for name, ks in cutoffs.items():
        bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1]
        if bad:
            raise LookalikeError(f"metrics: {name} must be positive integers, got {bad[0]!r}")


def _per_query(rel, hits, n_rel, cmc_k, precision_k, map_k) -> dict[str, np.ndarray]:
    """Each metric as a float array [Q]; columns beyond K are clamped to K."""
    n_q, K = rel.shape
    if K == 0:
        raise LookalikeError("metrics: results have K = 0 columns")
    col = lambda k: min(int(k), K) - 1  # noqa: E731
    safe_rel = np.maximum(n_rel, 1)
    precision_at_i = hits / np.arange(1, K + 1)
    ap_terms = np.cumsum(precision_at_i * rel, axis=1)
    out: dict[str, np.ndarray] = {}
    for k in cmc_k:
        out[f"cmc@{k}"] = (hits[:, col(k)] > 0).astype(np.float64)
    for k in precision_k:
        out[f"precision@{k}"] = hits[:, col(k)] / np.minimum(k, safe_rel)
    for k in map_k:
        found = hits[:, col(k)]
        out[f"map@{k}"] = np.where(found > 0, ap_terms[:, col(k)] / np.maximum(found, 1), 0.0)
    out["map@all"] = ap_terms[:, -1] / safe_rel
    r_col = np.minimum(safe_rel, K) - 1
    out["r_precision"] = hits[np.arange(n_q), r_col] / safe_rel
    return out


def _per_category(
    per_query: dict[str, np.ndarray], has_rel: np.ndarray, categories: np.ndarray | None
) -> dict[str, dict[str, float]]:
    if categories is None:
        return {}
    frame = pd.DataFrame(per_query)[has_rel]
    frame["category"] = np.asarray(categories).astype(str)[has_rel]
    return {str(c): {m: float(v) for m, v in row.items()} for c, row in frame.groupby("category").mean().iterrows()}


def evaluate_table(results: RetrievalResults, table: DatasetTable, **metric_kwargs) -> MetricsReport:
    """Metrics for results of `search_table`: labels, exclusion rules and categories come from the table.

    Args:
        results: results whose query and gallery ids are paths of the table.
        table: the dataset table (labels; `sequence` rules; optional `category`).
        **metric_kwargs: cmc_k, precision_k, map_k as `compute_metrics` takes them.

    Returns:
        MetricsReport (see `compute_metrics`).

    Example:
        >>> import numpy as np, lookalike
        >>> table = lookalike.import_folder("data/omniglot/images_background_small1/Latin", validation_fraction=1.0)
        >>> # or embed(extractor, table)
        >>> embeddings = lookalike.Embeddings(np.random.rand(len(table), 8), table.paths)
        >>> results = lookalike.search_table(embeddings, table, k=10)
        >>> sorted(lookalike.evaluate_table(results, table, map_k=(10,)).means)
        ['cmc@1', 'cmc@10', 'cmc@5', 'map@10', 'map@all', 'precision@10', 'precision@5', 'r_precision']
    """
    q_labels = table.labels_of(results.query_ids, what="results: query id")
    g_labels = table.labels_of(results.gallery_ids, what="results: gallery id")
    exclude = exclusion_groups(table, results.query_ids.astype(str), results.gallery_ids.astype(str))
    return compute_metrics(
        results,
        q_labels,
        g_labels,
        exclude=exclude,
        query_categories=table.categories_of(results.query_ids),
        **metric_kwargs,
    )


def cmc_curve(rel: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """CMC@k for k = 1..K (the share of queries with a hit within the top k), over queries with a relevant item."""
    has_rel = np.asarray(n_relevant) > 0
    if not has_rel.any():
        return np.full(rel.shape[1], np.nan)
    return (np.cumsum(rel[has_rel], axis=1) > 0).mean(axis=0)
