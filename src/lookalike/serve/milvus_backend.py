"""A served gallery whose vectors live in Milvus (`index.backend: milvus`): writing them with the gallery's fields,
and searching them for `GalleryIndex`, where results come back as gallery positions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.results import PAD, RetrievalResults
from lookalike.core.table import BBOX_COLUMNS, REQUIRED_COLUMNS
from lookalike.progress import Progress
from lookalike.search.exact import order_by_distance
from lookalike.search.milvus import RESERVED, MilvusGallery

NOT_METADATA = (*RESERVED, *REQUIRED_COLUMNS, *BBOX_COLUMNS)  # table columns Milvus does not get as metadata


def metadata_columns(names: Iterable[str]) -> list[str]:
    """The gallery table's columns stored as Milvus metadata (filterable): all but its own and the table's fields."""
    return [name for name in names if name not in NOT_METADATA]


def store_gallery(
    store: MilvusGallery, vectors: np.ndarray, frame: pd.DataFrame, progress: Progress | None = None
) -> MilvusGallery:
    """Upsert a gallery into its collection: id its external ids (the id column, else the paths), path its paths, label
    its labels ("" without), other columns metadata.

    Args:
        store: the connected collection.
        vectors: float [N, D], row i the embedding of frame row i.
        frame: gallery.csv's rows (id, path, label, metadata columns).
        progress: wraps the loop over insert batches.

    Returns:
        The same store, filled.
    """
    paths = frame["path"].to_numpy(str)
    ids = frame["id"].to_numpy(str) if "id" in frame.columns else paths
    labels = frame["label"].fillna("").to_numpy(str) if "label" in frame.columns else np.full(len(frame), "")
    metadata = {name: typed(frame[name]) for name in metadata_columns(frame.columns)}
    store.add(ids, vectors, paths, labels, metadata, progress)
    return store


def typed(column: pd.Series) -> np.ndarray:
    """A metadata column as Milvus stores it: numbers when every non-empty cell is one, booleans when every one is
    true/false, else the strings; empty cells missing (None). So `price < 10` filters a CSV's price column."""
    text = column.astype(str).where(column.notna() & (column.astype(str) != ""))
    present = text.dropna()
    numbers = pd.to_numeric(present, errors="coerce")
    if len(present) and numbers.notna().all():
        whole = (numbers == numbers.round()).all() and not present.str.contains(r"[.eE]").any()
        values = numbers.astype(np.int64) if whole else numbers.astype(float)
    elif len(present) and present.str.lower().isin(["true", "false"]).all():
        values = present.str.lower() == "true"
    else:
        values = present
    out = np.full(len(column), None, dtype=object)
    out[np.flatnonzero(text.notna().to_numpy())] = values.to_numpy(object)
    return out


def connect_manifest(manifest: Any, size: int, where: str) -> MilvusGallery:
    """The collection a Milvus-backed folder's manifest names; it must hold one vector per gallery.csv row.

    Args:
        manifest: the folder's IndexManifest (backend milvus: uri, collection, milvus_index, search.metric).
        size: the rows of the folder's gallery.csv.
        where: the manifest's file, named in errors.

    Returns:
        The connected, loaded collection.
    """
    store = MilvusGallery.connect(
        manifest.uri, manifest.collection, None, manifest.search.metric, manifest.milvus_index or "FLAT"
    )
    count = store.count()
    if count != size:
        raise LookalikeError(
            f"{where}: collection {manifest.collection!r} at {manifest.uri} holds {count} vectors, the folder's "
            f"gallery {size} (rebuild with `lookalike index index.backend=milvus`)"
        )
    return store


def search_candidates(
    store: MilvusGallery, queries: Embeddings, m: int, own_id: str | None, expression: str | None
) -> RetrievalResults:
    """The top-m candidates of one query among the items passing `expression`, over the candidates' ids; a gallery
    item used as the query is left out (searched for m + 1, then dropped)."""
    found = store.search(queries.vectors, m + (own_id is not None), expression, queries.ids)
    if own_id is None:
        return found
    names = found.gallery_ids[np.maximum(found.indices, 0)] if len(found.gallery_ids) else found.indices.astype(str)
    own = found.valid & (names == own_id)  # nothing found (a filter no item passes): nothing to drop
    index, dist = order_by_distance(np.where(own, PAD, found.indices), np.where(own, np.inf, found.distances))
    return RetrievalResults(index[:, :m], dist[:, :m], found.query_ids, found.gallery_ids, found.meta)


def to_positions(results: RetrievalResults, position_of: dict[str, int], gallery_ids: np.ndarray) -> RetrievalResults:
    """Results over Milvus candidates as results over the whole gallery (indices become gallery positions)."""
    known = np.array([position_of.get(name, PAD) for name in results.gallery_ids], np.int64)
    if (known == PAD).any():
        unknown = results.gallery_ids[int(np.flatnonzero(known == PAD)[0])]
        raise LookalikeError(f"search: Milvus returned id {unknown!r}, which is not in the folder's gallery.csv")
    mapped = np.where(results.valid, known[np.maximum(results.indices, 0)] if len(known) else PAD, PAD)
    return RetrievalResults(mapped, results.distances, results.query_ids, gallery_ids, results.meta)
