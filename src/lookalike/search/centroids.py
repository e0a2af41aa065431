"""Retrieval against gallery centroids, one per label or per (label, sequence), as in CTL.

CTL ("On the Unreasonable Effectiveness of Centroids in Image Retrieval") replaces the gallery by the
mean embedding of each label. The table's exclusion rules still hold: with `per_sequence=True` there is
one centroid per (label, exclusion group) and a query never sees the centroids of its own group (the
re-ID "same camera" rule). With one centroid per label, the query's own label centroid is recomputed
without the gallery items of the query's group (leave-one-out when query and gallery share rows), so
the query never matches itself; centroids of other labels are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.protocol import exclusion_groups, query_gallery_ids
from lookalike.core.results import PAD, RetrievalResults, clamp_k
from lookalike.core.table import DatasetTable
from lookalike.metrics import MetricsReport, compute_metrics, count_relevant
from lookalike.search.exact import exact_knn

_SUM_BLOCK = 65536  # gallery rows summed at a time: bounds the float64 copy


@dataclass
class Centroids:
    """One normalised vector per label (or per label and sequence), with the label, group and size of each."""

    embeddings: Embeddings  # ids "label=<label>" or "label=<label>|sequence=<sequence>"
    labels: np.ndarray  # label of each centroid
    groups: np.ndarray  # exclusion group of each per-sequence centroid; -1 for per-label centroids
    counts: np.ndarray  # gallery items averaged into each centroid


def gallery_centroids(
    gallery: Embeddings, labels: np.ndarray, sequences: np.ndarray | None = None, normalize: bool = True
) -> Centroids:
    """Mean of the raw gallery vectors of each label (or each (label, sequence)), then L2-normalised.

    Integer `sequences` are used as group codes as they are (pass exclusion_groups' gallery codes to get
    centroids whose `groups` match the query codes); other values are coded in order of appearance, and a
    missing sequence makes the item its own group. Centroids come in order of first appearance.
    """
    labels = np.asarray(labels)
    if labels.shape != (len(gallery),):
        raise LookalikeError(f"labels: expected {len(gallery)} gallery labels, got shape {labels.shape}")
    if len(gallery) == 0:
        raise LookalikeError("gallery: expected at least one gallery embedding, got none")
    label_codes = _codes(labels, "labels")
    groups = None if sequences is None else _sequence_groups(sequences, len(gallery))
    codes = label_codes if groups is None else _pair_codes(label_codes, groups)[0]
    sums, counts, first = _sum_by(codes, gallery.vectors)
    means = sums / counts[:, None]
    if normalize:
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    c_labels = labels[first]
    c_groups = np.full(len(first), -1, dtype=np.int64) if groups is None else groups[first]
    names = None if sequences is None else _sequence_names(np.asarray(sequences)[first], gallery.ids[first])
    meta = {"centroids": "label" if sequences is None else "label+sequence", "normalized": normalize}
    return Centroids(
        Embeddings(means.astype(np.float32), _centroid_ids(c_labels, names), meta), c_labels, c_groups, counts
    )


def search_centroids(
    embeddings: Embeddings, table: DatasetTable, k: int = 100, per_sequence: bool = False, metric: str = "cosine"
) -> tuple[RetrievalResults, np.ndarray, np.ndarray]:
    """Validation queries against centroids of the validation gallery, with the table's exclusion rules.

    Returns the results (gallery_ids are centroid ids), the label of each centroid, and per query the
    number of relevant centroids it can see; pass the last two to `compute_metrics`.
    """
    query_ids, gallery_ids = query_gallery_ids(table)
    q_groups, g_groups = exclusion_groups(table, query_ids, gallery_ids)
    q_labels, g_labels = table.labels_of(query_ids), table.labels_of(gallery_ids)
    queries, gallery = embeddings.select(query_ids), embeddings.select(gallery_ids)
    requested = k
    if per_sequence:
        cents = gallery_centroids(gallery, g_labels, g_groups)
        cents.embeddings = Embeddings(
            cents.embeddings.vectors, _table_centroid_ids(cents, table, gallery_ids, g_groups), cents.embeddings.meta
        )
        exclude = (q_groups, cents.groups)
        k = clamp_k(k, len(cents.labels), len(query_ids), exclude)
        idx, dist = exact_knn(queries.vectors, cents.embeddings.vectors, k, metric, exclude=exclude)
        n_relevant = _visible_relevant(q_labels, q_groups, cents)
    else:
        cents = gallery_centroids(gallery, g_labels)
        k = clamp_k(k, len(cents.labels), len(query_ids))
        idx, dist, n_relevant = _search_leave_group_out(
            queries, gallery, g_labels, g_groups, q_labels, q_groups, cents, k, metric
        )
    meta = {"metric": metric, "index": "centroids", "k": k, "centroids": cents.embeddings.meta["centroids"]}
    meta |= {"k_requested": requested} if k != requested else {}
    return RetrievalResults(idx, dist, query_ids, cents.embeddings.ids, meta), cents.labels, n_relevant


def table_centroids(embeddings: Embeddings, table: DatasetTable, per_sequence: bool = False) -> Centroids:
    """The validation gallery's centroids exactly as `search_centroids` ranks them (same order and ids)."""
    _, gallery_ids = query_gallery_ids(table)
    gallery, g_labels = embeddings.select(gallery_ids), table.labels_of(gallery_ids)
    if not per_sequence:
        return gallery_centroids(gallery, g_labels)
    g_groups = exclusion_groups(table, gallery_ids[:0], gallery_ids)[1]
    cents = gallery_centroids(gallery, g_labels, g_groups)
    cents.embeddings = Embeddings(
        cents.embeddings.vectors, _table_centroid_ids(cents, table, gallery_ids, g_groups), cents.embeddings.meta
    )
    return cents


def evaluate_centroids(
    embeddings: Embeddings,
    table: DatasetTable,
    k: int = 100,
    per_sequence: bool = False,
    metric: str = "cosine",
    **metric_kwargs,
) -> tuple[RetrievalResults, MetricsReport]:
    """`search_centroids` followed by `compute_metrics` with the right relevant counts and the table's categories."""
    results, c_labels, n_relevant = search_centroids(embeddings, table, k, per_sequence, metric)
    report = compute_metrics(
        results,
        table.labels_of(results.query_ids),
        c_labels,
        n_relevant=n_relevant,
        query_categories=table.categories_of(results.query_ids),
        **metric_kwargs,
    )
    return results, report


def _search_leave_group_out(
    queries: Embeddings,
    gallery: Embeddings,
    g_labels: np.ndarray,
    g_groups: np.ndarray,
    q_labels: np.ndarray,
    q_groups: np.ndarray,
    cents: Centroids,
    k: int,
    metric: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-NN over the other labels' centroids, merged with each query's own-label centroid built without its group."""
    n_cents = len(cents.labels)
    q_codes = pd.Index(cents.labels).get_indexer(q_labels)  # -1: label absent from the gallery
    idx, dist = exact_knn(queries.vectors, cents.embeddings.vectors, k, metric, exclude=(q_codes, np.arange(n_cents)))
    own = _own_label_centroids(gallery, g_labels, g_groups, q_labels, q_groups, cents)
    own_dist = _distances(queries.vectors, own, metric)
    exists = ~np.isnan(own).any(1)
    own_dist = np.where(exists, own_dist, np.inf).astype(np.float32)
    idx, dist = _merge(idx, dist, np.where(exists, q_codes, PAD), own_dist)
    return idx, dist, exists.astype(np.int64)


def _own_label_centroids(
    gallery: Embeddings,
    g_labels: np.ndarray,
    g_groups: np.ndarray,
    q_labels: np.ndarray,
    q_groups: np.ndarray,
    cents: Centroids,
) -> np.ndarray:
    """Per query, the normalised mean of its label's gallery items outside its group [Q, D]; NaN rows where none
    remain."""
    label_codes = pd.Index(cents.labels).get_indexer(g_labels)
    pair_codes, pairs = _pair_codes(label_codes, g_groups)
    pair_sums, pair_counts, _ = _sum_by(pair_codes, gallery.vectors)
    label_sums = _sum_by(pairs.get_level_values(0).to_numpy(np.int64), pair_sums)[0]
    q_codes = pd.Index(cents.labels).get_indexer(q_labels)  # -1: label absent from the gallery
    q_pairs = pairs.get_indexer(
        pd.MultiIndex.from_arrays([q_codes, q_groups])
    )  # -1: no gallery item in the query's group
    has_pair, has_label = q_pairs >= 0, q_codes >= 0
    sums = label_sums[np.maximum(q_codes, 0)] - np.where(has_pair[:, None], pair_sums[np.maximum(q_pairs, 0)], 0.0)
    counts = np.where(has_label, cents.counts[np.maximum(q_codes, 0)], 0) - np.where(
        has_pair, pair_counts[np.maximum(q_pairs, 0)], 0
    )
    means = np.where((counts > 0)[:, None], sums / np.maximum(counts, 1)[:, None], np.nan)
    return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def _distances(queries: np.ndarray, centroids: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise distance of each query to its own centroid, with exact_knn's definitions."""
    q = queries.astype(np.float64)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return 1.0 - np.einsum("ij,ij->i", q, np.nan_to_num(centroids))
    return np.linalg.norm(q - np.nan_to_num(centroids), axis=1)


def _merge(
    idx: np.ndarray, dist: np.ndarray, extra_idx: np.ndarray, extra_dist: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Insert one (index, distance) per row into its ascending row, keeping the first K columns."""
    k = idx.shape[1]
    pos = (dist < extra_dist[:, None]).sum(1)  # insertion point in each sorted row
    cols = np.arange(k + 1)[None, :]
    src = np.clip(np.where(cols > pos[:, None], cols - 1, cols), 0, k - 1)
    take = cols == pos[:, None]
    out_idx = np.where(take, extra_idx[:, None], np.take_along_axis(idx, src, 1))
    out_dist = np.where(take, extra_dist[:, None], np.take_along_axis(dist, src, 1))
    return out_idx[:, :k], out_dist[:, :k].astype(np.float32)


def _visible_relevant(q_labels: np.ndarray, q_groups: np.ndarray, cents: Centroids) -> np.ndarray:
    """Centroids of the query's label outside its group."""
    return count_relevant(q_labels, cents.labels, exclude=(q_groups, cents.groups))


def _codes(values: np.ndarray, name: str) -> np.ndarray:
    """Integer codes in order of first appearance; a missing value is an error naming its position."""
    codes, _ = pd.factorize(np.asarray(values, dtype=object))
    if (codes < 0).any():
        raise LookalikeError(f"{name}: missing value at position {int(np.flatnonzero(codes < 0)[0])}")
    return codes.astype(np.int64)


def _sequence_groups(sequences: np.ndarray, n: int) -> np.ndarray:
    """Group code per item: integers as given, other values coded, a missing value its own new group."""
    seq = np.asarray(sequences)
    if seq.shape != (n,):
        raise LookalikeError(f"sequences: expected {n} gallery sequences, got shape {seq.shape}")
    if seq.dtype.kind in "iu":
        return seq.astype(np.int64)
    codes, _ = pd.factorize(seq.astype(object))
    missing = codes < 0
    codes[missing] = codes.max(initial=-1) + 1 + np.arange(int(missing.sum()))
    return codes.astype(np.int64)


def _pair_codes(label_codes: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, pd.MultiIndex]:
    """Dense codes of (label, group) pairs in order of first appearance, and the pairs themselves."""
    codes, pairs = pd.factorize(pd.MultiIndex.from_arrays([label_codes, groups]))
    return codes.astype(np.int64), pairs


def _sum_by(codes: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 sums and counts of the rows of each code 0..n-1 (all present), and each code's first row."""
    n = int(codes.max()) + 1
    sums = torch.zeros(n, vectors.shape[1], dtype=torch.float64)
    index = torch.tensor(codes, dtype=torch.int64)
    for start in range(0, len(codes), _SUM_BLOCK):  # blocks of rows bound the float64 copy
        block = torch.tensor(vectors[start : start + _SUM_BLOCK], dtype=torch.float64)
        sums.index_add_(0, index[start : start + _SUM_BLOCK], block)
    first = np.unique(codes, return_index=True)[1]
    return sums.numpy(), np.bincount(codes, minlength=n), first


def _sequence_names(sequences: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """Display name of each centroid's sequence; an item without a sequence is named by its id."""
    missing = pd.isna(sequences)
    return np.where(missing, np.char.add("item:", item_ids.astype(str)), sequences.astype(str))


def _centroid_ids(labels: np.ndarray, names: np.ndarray | None) -> np.ndarray:
    """'label=<label>' or 'label=<label>|sequence=<name>' per centroid."""
    ids = np.char.add("label=", labels.astype(str))
    return ids if names is None else np.char.add(np.char.add(ids, "|sequence="), names.astype(str))


def _table_centroid_ids(
    cents: Centroids, table: DatasetTable, gallery_ids: np.ndarray, g_groups: np.ndarray
) -> np.ndarray:
    """Centroid ids naming the table's sequence (or the item, for rows without one) instead of the group code."""
    first_row = pd.Series(np.arange(len(g_groups))).groupby(g_groups).first()
    rows = first_row.loc[cents.groups].to_numpy()
    seq = table.values_of("sequence", gallery_ids[rows], default=None).astype(object)
    return _centroid_ids(cents.labels, _sequence_names(seq, gallery_ids[rows]))
