"""Updating a served gallery without rebuilding it: `lookalike index add` embeds only the new images, `lookalike index
remove` drops items by id, and both write a new generation of the gallery files beside the served one, then switch
to it by renaming manifest.json (one atomic rename), so a killed or failing update leaves the folder as it was and a
running `lookalike serve` sees the old or the new gallery, never a mix. A Milvus-backed folder's collection is changed
before the switch, under a journal (milvus_backend.write_journal) that a failure, or the next update or load after a
kill, rolls back."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from lookalike.core.atomic import atomic_path, folder_lock, remove_stale
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.table import DatasetTable, load_table, validate_table
from lookalike.data.folder import IMAGE_EXTENSIONS, import_folder, list_images
from lookalike.extract import Progress, extract_embeddings
from lookalike.search import FaissIndex
from lookalike.search.milvus import MilvusGallery
from lookalike.serve.index import (
    EMBEDDINGS_FILE,
    FAISS_FILE,
    GALLERY_FILE,
    query_model,
    read_gallery_csv,
    read_gallery_frame,
    relative_paths,
    write_gallery_csv,
)
from lookalike.serve.manifest import MANIFEST_FILE, IndexManifest, read_manifest
from lookalike.serve.milvus_backend import (
    JOURNAL_FILE,
    connect_manifest,
    recover,
    roll_back,
    store_gallery,
    write_journal,
)

ID_COLUMN = "id"  # an item's external id in gallery.csv; absent: the item's path is its id
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.\d+-[a-z0-9_]{8}(?:\.[^.]*)?")  # lookalike.core.atomic's temporary names


class UnknownId(LookalikeError):
    """An id to remove that the gallery does not hold."""


@dataclass(frozen=True)
class NewItems:
    """Gallery items to add, with their embeddings: row i is item ids[i], image paths[i] (absolute), vectors[i], and
    when given labels[i] and the metadata's row i."""

    ids: np.ndarray
    paths: np.ndarray
    vectors: np.ndarray
    labels: np.ndarray | None = None  # None: items without labels
    metadata: pd.DataFrame | None = None  # metadata columns (str), one row per item

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self) -> pd.DataFrame:
        """The items as gallery.csv rows: id, path, label (when given), metadata columns."""
        frame = pd.DataFrame({ID_COLUMN: np.asarray(self.ids, str), "path": np.asarray(self.paths, str)})
        if self.labels is not None:
            frame["label"] = np.asarray(self.labels, str)
        if self.metadata is not None:
            frame = frame.join(self.metadata.reset_index(drop=True))
        return frame


@dataclass(frozen=True)
class UpdateReport:
    """What an update did: items added (new ids), replaced (ids already there), removed, and the result."""

    added: int
    replaced: int
    removed: int
    size: int
    generation: int


def item_ids(table: DatasetTable, root: Path | None) -> np.ndarray:
    """The external ids of a table's rows: its `id` column when it has one, else their paths under the index's images
    root (absolute paths for a format 1 folder, which has none), as `lookalike index` names a gallery's items."""
    if table.has_column(ID_COLUMN):
        return table.column(ID_COLUMN).astype(str)
    return np.array(stored_paths(table.paths.astype(str), root), dtype=str)


def stored_paths(paths: np.ndarray, root: Path | None) -> list[str]:
    """Absolute image paths as gallery.csv stores them: relative to the images root (format 2), or as they are."""
    return list(paths) if root is None else relative_paths(paths, root)


def _frame_ids(frame: pd.DataFrame) -> np.ndarray:
    """The ids of gallery.csv's rows (its id column, else its paths)."""
    column = ID_COLUMN if ID_COLUMN in frame.columns else "path"
    return frame[column].fillna(frame["path"]).to_numpy(str)


def read_source(sources: Sequence[str | os.PathLike]) -> DatasetTable:
    """The images to add: one dataset CSV (every row), one class-per-folder tree (label: leaf folder), or image files
    (label: their folder's name); paths made absolute, as a built gallery holds them.

    Args:
        sources: a CSV, a folder, or one or more image files.

    Returns:
        DatasetTable of the new items; their ids are `item_ids(table)`.
    """
    paths = [Path(source) for source in sources]
    if not paths:
        raise LookalikeError("index add: expected a folder, a dataset CSV or image files to add")
    if len(paths) == 1 and paths[0].suffix.lower() == ".csv":
        table = load_table(paths[0])
    elif len(paths) == 1 and paths[0].is_dir():
        if not list_images(paths[0]):
            raise LookalikeError(f"{paths[0]}: no images found in this folder")
        table = import_folder(paths[0], validation_fraction=0.0)
    else:
        table = _files_table(paths)
    return table.with_paths([str(p.resolve()) for p in table.image_paths()])


def _files_table(paths: list[Path]) -> DatasetTable:
    """Image files as gallery rows labelled by their folder's name; a missing file or a non-image is one line."""
    for path in paths:
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise LookalikeError(f"{path}: expected an image file ({', '.join(IMAGE_EXTENSIONS)}), a folder or a CSV")
    frame = pd.DataFrame(
        {
            "label": [p.resolve().parent.name for p in paths],
            "path": [str(p.resolve()) for p in paths],
            "split": "train",
            "is_query": "False",
            "is_gallery": "False",
        }
    )
    return validate_table(frame, Path.cwd(), "<image files>")


def embed_new(folder: str | os.PathLike, table: DatasetTable, progress: Progress | None = None) -> NewItems:
    """Embed a table's rows with the index folder's own model and transform (never the gallery already there).

    Args:
        folder: an index folder written by `lookalike index`.
        table: the items to add (read_source).
        progress: optional `progress(batches, total)` wrapper of the batch loop.

    Returns:
        NewItems: ids, absolute paths, embeddings, labels (a labelled table) and metadata of the table's rows.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    _check_backend(manifest, "add")
    extractor, transform = query_model(folder, manifest, "torch")
    emb = extract_embeddings(extractor, table, transform, batch_size=64, progress=progress)
    root = Path(manifest.images_root) if manifest.images_root else None
    labels = table.labels.astype(str) if table.has_labels else None
    metadata = table.metadata().drop(columns=[ID_COLUMN], errors="ignore")
    return NewItems(item_ids(table, root), table.paths.astype(str), emb.vectors, labels, metadata)


def add_items(folder: str | os.PathLike, items: NewItems) -> UpdateReport:
    """Add embedded items to an index folder; an id already there is replaced (see update_index)."""
    return update_index(folder, add=items)


def remove_items(folder: str | os.PathLike, ids: Sequence[str]) -> UpdateReport:
    """Remove items by id; an unknown id is one line naming it and nothing changes (see update_index)."""
    return update_index(folder, remove=ids)


def update_index(folder: str | os.PathLike, add: NewItems | None = None, remove: Sequence[str] = ()) -> UpdateReport:
    """Write the next generation of an index folder's gallery (CSV, embeddings, FAISS index) and switch to it.

    Copy-on-write: the new files get new names beside the served ones and manifest.json is renamed into place last,
    all under the folder's lock (`lookalike index` and other updates wait); the generation before stays on disk for
    readers that read the old manifest, older ones and a killed update's leftovers are removed. A Milvus-backed
    folder writes only gallery.csv and upserts/deletes in its collection before the switch, journaled: a failure rolls
    the collection back, and so does the next update or load after a kill.

    Args:
        folder: an index folder written by `lookalike index`.
        add: items to add; an id already in the gallery is replaced (its row leaves, the new one goes last).
        remove: ids to remove (an item's path unless the gallery has an id column; a relative path is resolved).

    Returns:
        UpdateReport with the counts and the new generation.
    """
    folder = Path(folder)
    with folder_lock(folder):
        manifest = read_manifest(folder)
        _check_backend(manifest, "add" if add is not None else "remove")
        store = _connect(folder, manifest)
        try:
            return _update_locked(folder, manifest, store, add, remove)
        finally:
            if store is not None:
                store.close()


def _update_locked(
    folder: Path, manifest: IndexManifest, store: MilvusGallery | None, add: NewItems | None, remove: Sequence[str]
) -> UpdateReport:
    """update_index with the folder's lock held (and, for a Milvus-backed folder, its collection connected)."""
    clean_generations(folder, manifest)
    emb, frame = (None, read_gallery_csv(folder, manifest)) if store else read_gallery_frame(folder, manifest)
    ids = _frame_ids(frame)
    root = Path(manifest.images_root) if manifest.images_root else None
    removing = _known_ids(ids, remove, folder, root)
    adding = _checked_new(add, ids, frame["path"].to_numpy(str), removing, root)
    keep = ~np.isin(ids, np.concatenate([removing, adding.ids]))
    if not keep.any() and not len(adding):
        raise LookalikeError(f"index remove: removing {len(removing)} ids would leave {folder} with no gallery")
    new = manifest.model_copy(update={"generation": manifest.generation + 1})
    if store is None:
        size = len(_write_generation(folder, manifest, new, frame, emb, keep, adding))
        new.write(folder)  # the switch: one rename
    else:
        size = _switch_milvus(folder, new, frame, keep, adding, removing, store)
    clean_generations(folder, new)
    replaced = int(np.isin(adding.ids, ids).sum())
    return UpdateReport(len(adding) - replaced, replaced, len(removing), size, new.generation)


def _check_backend(manifest: IndexManifest, verb: str) -> None:
    """Folders searched by lookalike itself (exact or FAISS) or by Milvus are updated in place."""
    if manifest.backend not in (None, "exact", "faiss", "milvus"):
        raise LookalikeError(
            f"index {verb}: {manifest.backend}-backed folders are updated with a rebuild (`lookalike index` with "
            f"index.backend={manifest.backend}), not with index add/remove yet"
        )


def _connect(folder: Path, manifest: IndexManifest) -> MilvusGallery | None:
    """A Milvus-backed folder's collection, with what a killed update left in it undone (None for other folders)."""
    if manifest.backend != "milvus":
        return None
    store = connect_manifest(manifest, read_gallery_csv(folder, manifest).pipe(_frame_ids), str(folder / MANIFEST_FILE))
    try:
        recover(folder, manifest.generation, store)
    except BaseException:
        store.close()
        raise
    return store


def _switch_milvus(
    folder: Path,
    new: IndexManifest,
    frame: pd.DataFrame,
    keep: np.ndarray,
    adding: NewItems,
    removing: np.ndarray,
    store: MilvusGallery,
) -> int:
    """Write `new`'s gallery.csv, journal the change, upsert and delete in the collection, then switch; a failure rolls
    the collection back (a kill leaves the journal for the next update or load). Returns the new gallery's size."""
    if len(adding) and adding.vectors.shape[1] != store.dim:
        raise LookalikeError(
            f"index add: the new embeddings have {adding.vectors.shape[1]} dims, the collection {store.dim}"
        )
    gallery = _new_gallery(frame, keep, adding)
    write_gallery_csv(gallery, folder / new.file(GALLERY_FILE))
    ids = _frame_ids(frame)
    deleted = removing[~np.isin(removing, adding.ids)]
    journal = write_journal(
        folder, new.generation, adding.ids, np.union1d(removing, adding.ids[np.isin(adding.ids, ids)]), store
    )
    try:
        if len(deleted):
            store.remove(deleted)
        if len(adding):
            vectors = adding.vectors.astype(np.float32, copy=False).reshape(-1, store.dim)
            store_gallery(store, vectors, gallery, first=int(keep.sum()))
        new.write(folder)  # the switch: one rename
    except BaseException:
        roll_back(folder, journal, store)
        raise
    (folder / JOURNAL_FILE).unlink(missing_ok=True)
    return len(gallery)


def _known_ids(ids: np.ndarray, remove: Sequence[str], folder: Path, root: Path | None) -> np.ndarray:
    """The ids to remove as the gallery spells them (an image path given for an item named by its path is matched: an
    absolute one under the images root, a relative one from the working folder); an unknown id is one line."""
    known = set(ids.tolist())
    found = []
    for given in remove:
        name = str(given)
        spellings = [name, *stored_paths(np.array([str(Path(name).resolve())]), root)]
        name = next((spelling for spelling in spellings if spelling in known), name)
        if name not in known:
            raise UnknownId(
                f"index remove: unknown id {str(given)!r} (not one of the {len(ids)} items of {folder}); "
                "nothing removed"
            )
        found.append(name)
    return np.array(found, dtype=str)


def _checked_new(
    add: NewItems | None, ids: np.ndarray, paths: np.ndarray, removing: np.ndarray, root: Path | None
) -> NewItems:
    """The items to add with their paths as gallery.csv stores them (under `root`), refused in one line when an id
    repeats or a path is another kept item's."""
    if add is None:
        empty = np.array([], dtype=str)
        return NewItems(empty, empty, np.zeros((0, 0), np.float32))
    add = replace(add, paths=np.array(stored_paths(np.asarray(add.paths).astype(str), root), dtype=str))
    new_ids = np.asarray(add.ids).astype(str)
    unique, counts = np.unique(new_ids, return_counts=True)
    if (counts > 1).any():
        raise LookalikeError(f"index add: id {unique[counts > 1][0]!r} is given {counts.max()} times; give each once")
    leaving = np.isin(ids, np.concatenate([removing, new_ids]))
    taken = np.isin(np.asarray(add.paths).astype(str), paths[~leaving])
    if taken.any():
        path = np.asarray(add.paths).astype(str)[taken][0]
        raise LookalikeError(f"index add: {path} is already in the gallery under another id; remove that id first")
    return replace(add, ids=new_ids)


def _write_generation(
    folder: Path,
    old: IndexManifest,
    new: IndexManifest,
    frame: pd.DataFrame,
    emb: Embeddings,
    keep: np.ndarray,
    adding: NewItems,
) -> np.ndarray:
    """Write `new`'s gallery CSV, embeddings and FAISS index (each atomically); return the new gallery's vectors."""
    if len(adding) and adding.vectors.shape[1] != emb.dim:
        raise LookalikeError(
            f"index add: the new embeddings have {adding.vectors.shape[1]} dims, the gallery {emb.dim}"
        )
    gallery = _new_gallery(frame, keep, adding)
    kept_vectors = emb.vectors if keep.all() else emb.vectors[keep]  # one copy of the gallery, not two, when adding
    vectors = np.concatenate([kept_vectors, adding.vectors.astype(np.float32, copy=False).reshape(-1, emb.dim)])
    paths = gallery["path"].to_numpy(str)
    write_gallery_csv(gallery, folder / new.file(GALLERY_FILE))
    Embeddings(vectors, paths, emb.meta).save(folder / new.file(EMBEDDINGS_FILE))
    if new.search.index != "exact":
        with atomic_path(folder / new.file(FAISS_FILE)) as tmp:
            _faiss_of(folder, old, vectors, keep.all() and len(adding)).save(str(tmp))
    return vectors


def _new_gallery(frame: pd.DataFrame, keep: np.ndarray, adding: NewItems) -> pd.DataFrame:
    """The next generation's gallery.csv rows: the kept rows (with their ids), then the added ones."""
    rows = adding.rows()
    if "label" not in frame.columns:
        rows = rows.drop(columns="label", errors="ignore")  # a gallery without labels stays without
    elif "label" not in rows.columns:
        rows["label"] = ""  # an item added to a labelled gallery without a label
    kept = frame[keep].assign(**{ID_COLUMN: _frame_ids(frame)[keep]})
    return pd.concat([kept, rows], ignore_index=True)


def _faiss_of(folder: Path, old: IndexManifest, vectors: np.ndarray, appended: int) -> FaissIndex:
    """The new generation's FAISS index: the old one plus the appended rows when only rows were added, else rebuilt."""
    search = old.search
    if appended:
        base = FaissIndex.load(str(folder / old.file(FAISS_FILE)), search.index, search.metric)
        return base.append(vectors[-appended:])
    return FaissIndex(search.index, search.metric).add(vectors)


def clean_generations(folder: Path, manifest: IndexManifest) -> list[Path]:
    """Remove gallery files of generations other than the manifest's and the one before, and temporaries of killed
    writers; return what was removed."""
    previous = manifest.model_copy(update={"generation": max(manifest.generation - 1, 0)})
    base = (GALLERY_FILE, EMBEDDINGS_FILE, FAISS_FILE)
    kept = {m.file(name) for m in (manifest, previous) for name in base}
    pattern = re.compile(r"(gallery|embeddings|faiss)(\.g\d+)?\.(csv|npz|index)")
    removed = []
    for entry in os.scandir(folder):
        match = _TEMPORARY.fullmatch(entry.name)
        if match:
            target = folder / match.group("target")
            removed += remove_stale(target, target.suffix)
        elif pattern.fullmatch(entry.name) and entry.name not in kept:
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed
