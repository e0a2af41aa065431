"""A served gallery whose vectors live in Milvus (`index.backend: milvus`): writing them with the gallery's fields,
and searching them for `GalleryIndex`, where results come back as gallery positions."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lookalike.core.atomic import write_text_atomic
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.results import PAD, RetrievalResults
from lookalike.core.table import BBOX_COLUMNS, REQUIRED_COLUMNS
from lookalike.progress import Progress
from lookalike.search.exact import order_by_distance
from lookalike.search.milvus import MAX_K, RESERVED, MilvusGallery

NOT_METADATA = (*RESERVED, *REQUIRED_COLUMNS, *BBOX_COLUMNS)  # table columns Milvus does not get as metadata
JOURNAL_FILE = "milvus-journal.json"  # an update of the collection in progress: what to undo if it never switched
EXTRA = 8  # candidates asked of Milvus beyond those needed: ids an update in flight holds that gallery.csv does not
SAMPLE = 16  # gallery ids looked up when loading: none found means the manifest names another gallery's collection


def metadata_columns(names: Iterable[str]) -> list[str]:
    """The gallery table's columns stored as Milvus metadata (filterable): all but its own and the table's fields."""
    return [name for name in names if name not in NOT_METADATA]


def store_gallery(
    store: MilvusGallery, vectors: np.ndarray, frame: pd.DataFrame, progress: Progress | None = None, first: int = 0
) -> MilvusGallery:
    """Upsert a gallery's rows from `first` on into its collection: id its external ids (the id column, else the
    paths), path its paths, label its labels ("" without), other columns metadata (typed over the whole gallery).

    Args:
        store: the connected collection.
        vectors: float [N - first, D], row i the embedding of frame row first + i.
        frame: gallery.csv's N rows (id, path, label, metadata columns).
        progress: wraps the loop over insert batches.
        first: the first row to upsert (an update upserts only the rows it added).

    Returns:
        The same store, filled.
    """
    paths = frame["path"].to_numpy(str)
    ids = frame["id"].fillna(frame["path"]).to_numpy(str) if "id" in frame.columns else paths
    labels = frame["label"].fillna("").to_numpy(str) if "label" in frame.columns else np.full(len(frame), "")
    metadata = {name: typed(frame[name])[first:] for name in metadata_columns(frame.columns)}
    store.add(ids[first:], vectors, paths[first:], labels[first:], metadata, progress)
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


def connect_manifest(manifest: Any, ids: Sequence[str], where: str) -> MilvusGallery:
    """The collection a Milvus-backed folder's manifest names. An update in flight or rolled back may leave it holding
    ids that gallery.csv does not (searches drop them) or lacking some; an empty collection, or one holding none of a
    sample of the gallery's ids, is another gallery's: one line.

    Args:
        manifest: the folder's IndexManifest (backend milvus: uri, collection, milvus_index, search.metric).
        ids: the external ids of the folder's gallery.csv rows.
        where: the manifest's file, named in errors.

    Returns:
        The connected, loaded collection.
    """
    store = MilvusGallery.connect(
        manifest.uri, manifest.collection, None, manifest.search.metric, manifest.milvus_index or "FLAT"
    )
    ids = np.asarray(ids, dtype=str)
    if not len(ids):
        return store
    count = store.count()
    sample = ids[np.linspace(0, len(ids) - 1, min(SAMPLE, len(ids))).astype(int)].tolist()
    if count == 0 or not store.present(sample):
        held = "no vectors" if count == 0 else f"{count} vectors, none of them gallery ids such as {sample[0]!r}"
        raise LookalikeError(
            f"{where}: collection {manifest.collection!r} at {manifest.uri} holds {held}, the folder's gallery "
            f"{len(ids)} items (rebuild with `lookalike index index.backend=milvus`)"
        )
    return store


def search_candidates(
    store: MilvusGallery,
    queries: Embeddings,
    m: int,
    own_id: str | None,
    expression: str | None,
    known: dict[str, int] | None = None,
) -> RetrievalResults:
    """The top-m candidates of one query among the items passing `expression`, over the candidates' ids; a gallery
    item used as the query is left out, and so are ids not in `known` (gallery.csv's ids: an update in flight adds
    to the collection before its gallery.csv is served), searched for a few more then dropped."""
    k = min(m + (own_id is not None) + (EXTRA if known is not None else 0), MAX_K)
    found = store.search(queries.vectors, k, expression, queries.ids)
    names = found.gallery_ids
    unknown = np.array([known is not None and name not in known for name in names.tolist()], bool)
    slots = np.maximum(found.indices, 0)
    drop = found.valid & (unknown[slots] if len(names) else False)  # nothing found: nothing to drop
    if own_id is not None and len(names):
        drop |= found.valid & (names[slots] == own_id)
    remap = np.cumsum(~unknown) - 1  # candidate index among the kept ids
    index = np.where(found.valid & ~drop, remap[slots] if len(names) else PAD, PAD)
    index, dist = order_by_distance(index, np.where(index == PAD, np.inf, found.distances))
    return RetrievalResults(index[:, :m], dist[:, :m], found.query_ids, names[~unknown], found.meta)


def to_positions(results: RetrievalResults, position_of: dict[str, int], gallery_ids: np.ndarray) -> RetrievalResults:
    """Results over Milvus candidates as results over the whole gallery (indices become gallery positions); a
    candidate id the gallery does not hold (an update's window) is dropped."""
    known = np.array([position_of.get(name, PAD) for name in results.gallery_ids], np.int64)
    mapped = np.where(results.valid, known[np.maximum(results.indices, 0)] if len(known) else PAD, PAD)
    distances = results.distances
    if (results.valid & (mapped == PAD)).any():
        mapped, distances = order_by_distance(mapped, np.where(mapped == PAD, np.inf, distances))
    return RetrievalResults(mapped, distances, results.query_ids, gallery_ids, results.meta)


def write_journal(
    folder: Path, generation: int, upserted: Sequence[str], old: Sequence[str], store: MilvusGallery
) -> dict:
    """Record (atomically, before the collection changes) what an update is about to do: the generation it writes, the
    ids it upserts and the vectors and fields of the ids it replaces or removes, so `roll_back` can undo it.

    Args:
        folder: the index folder (the journal is its milvus-journal.json).
        generation: the generation the update writes; a journal naming one the manifest never switched to is undone.
        upserted: ids the update upserts.
        old: ids whose current vectors and fields the update replaces or deletes.
        store: the folder's collection.

    Returns:
        The journal written (a dict).
    """
    records = [r for r in store.records(list(old)) if "path" in r] if len(old) else []
    vectors = store.vectors([r["id"] for r in records]) if records else np.zeros((0, store.dim), np.float32)
    rows = [{**r, "vector": v.astype(float).tolist()} for r, v in zip(records, vectors)]
    journal = {"generation": int(generation), "upserted": [str(i) for i in upserted], "old": rows}
    write_text_atomic(folder / JOURNAL_FILE, json.dumps(journal))
    return journal


def roll_back(folder: Path, journal: dict, store: MilvusGallery) -> None:
    """Undo a journaled update of the collection (delete what it upserted, re-upsert the old rows), then drop the
    journal."""
    store.remove(journal["upserted"])
    old = journal["old"]
    if old:
        names = sorted({name for row in old for name in row} - {*RESERVED})
        metadata = {name: [row.get(name) for row in old] for name in names}
        vectors = np.asarray([row["vector"] for row in old], np.float32)
        store.add([r["id"] for r in old], vectors, [r["path"] for r in old], [r["label"] for r in old], metadata)
    (folder / JOURNAL_FILE).unlink(missing_ok=True)


def recover(folder: Path, generation: int, store: MilvusGallery) -> bool:
    """Finish what a killed or failed update left (call with the folder's lock held): its journal is dropped when the
    manifest switched to its generation, else the collection is rolled back first. Returns whether there was one."""
    path = folder / JOURNAL_FILE
    if not path.is_file():
        return False
    journal = json.loads(path.read_text())
    if journal["generation"] != generation:
        roll_back(folder, journal, store)
    path.unlink(missing_ok=True)
    return True
