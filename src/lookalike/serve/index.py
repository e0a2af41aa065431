"""A served gallery: the model, the gallery images and labels, their embeddings, the search index and the
re-rankers, written to one folder by `build_index` and read back by `load_index` without re-extracting."""

from __future__ import annotations

import io
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import ValidationError

from lookalike.config import Config, ServeConfig, validation_message
from lookalike.core.atomic import atomic_folder, atomic_path, folder_lock
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import ConfigError, LookalikeError
from lookalike.core.results import PAD, RetrievalResults
from lookalike.core.table import BBOX_COLUMNS, DatasetTable
from lookalike.data.decode import to_rgb
from lookalike.data.folder import import_folder
from lookalike.data.images import ImageSource, read_image, resize_side, transforms_for
from lookalike.extract import Progress
from lookalike.extract_shards import embed_to_file
from lookalike.models.extractor import Extractor, load_weights
from lookalike.onnx_runtime import OnnxExtractor
from lookalike.provenance import record as provenance
from lookalike.rerank import RERANKERS, RerankContext, Reranker, build_chain, check_ascending, list_rerankers
from lookalike.rerank.chain import step_parts
from lookalike.search import FaissIndex, build_faiss_from_shards, exact_knn
from lookalike.search.milvus import MilvusGallery, check_uri
from lookalike.serve.manifest import MANIFEST_FILE, IndexManifest, ModelSpec, SearchSettings, read_manifest
from lookalike.serve.milvus_backend import (
    JOURNAL_FILE,
    connect_manifest,
    recover,
    search_candidates,
    store_gallery,
    to_positions,
)
from lookalike.shards import shard_folder

MODEL_FILE, GALLERY_FILE, EMBEDDINGS_FILE, FAISS_FILE = (
    "model.pt",
    "gallery.csv",
    "embeddings.npz",
    "faiss.index",
)
ONNX_FILE = "model.onnx"  # with serve.runtime=onnx (and model.preprocessing.json beside it)


class IndexBusy(LookalikeError):
    """The model stayed busy with other searches for longer than serve.search_timeout (the app answers 503)."""


@dataclass
class Column:
    """One ranking of the page: the top-k gallery positions, their distances, and each item's move against the
    original."""

    name: str
    positions: np.ndarray  # [k] gallery positions
    distances: np.ndarray  # [k] ascending
    rank_change: list[int | None]  # original rank - new rank (positive: moved up); None: not in the original candidates


# ---------------------------------------------------------------- writing an index


def gallery_rows(table: DatasetTable, which: str) -> DatasetTable:
    """The gallery the app searches: every row, one split, or the validation split's is_gallery rows."""
    gallery = table if which == "all" else table.split(which)
    if which == "validation":
        gallery = gallery.where(gallery.column("is_gallery").astype(bool))
    if len(gallery) == 0:
        raise ConfigError(f"serve.gallery: the table has no {which} gallery rows")
    return gallery


def column_name(step: str | dict[str, Any]) -> str:
    """A re-ranker's column title: its name, with its parameters when the config gives any ("icfrr(kg=10)");
    a weights file is named by its file name."""
    name, params = step_parts(step)
    shown = {k: Path(str(v)).name if k == "weights" else v for k, v in params.items()}
    return f"{name}({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else name


def servable_rerankers(steps: list[str | dict[str, Any]], names: list[str] | None = None) -> dict[str, Reranker]:
    """Each configured step as its own re-ranker, by column name (`names`, or made from the steps); a step that cannot
    take an uploaded query is an error, and so is a weights file that does not load (now, not at the first search)."""
    rerankers: dict[str, Reranker] = {}
    names = names or [column_name(step) for step in steps]
    for position, (name, reranker) in enumerate(zip(names, build_chain(steps))):
        if not reranker.servable:
            raise ConfigError(
                f"rerank[{position}]: {reranker.name!r} cannot run in the web app; expected one of "
                f"{', '.join(list_rerankers(servable=True))}"
            )
        if reranker.needs_model:
            reranker.load()  # loads and checks the weights
        rerankers[name] = reranker
    return rerankers


def pack_weights(steps: list[str | dict[str, Any]], folder: Path) -> list[str | dict[str, Any]]:
    """The steps with every `weights` file (a pairwise checkpoint) copied into the index folder and named relative to
    it."""
    packed: list[str | dict[str, Any]] = []
    for position, step in enumerate(steps):
        name, params = step_parts(step, position)
        if "weights" in params:
            source = Path(str(params["weights"]))
            if not source.is_file():
                raise ConfigError(f"rerank[{position}].weights: no such file {source}")
            params["weights"] = f"rerank{position}_{name}_{source.name}"
            shutil.copyfile(source, folder / params["weights"])
        packed.append({name: params} if params else name)
    return packed


def unpack_weights(steps: list[str | dict[str, Any]], folder: Path) -> list[str | dict[str, Any]]:
    """Steps as written by pack_weights with their weights found in `folder`; image re-rankers without progress bars."""
    unpacked: list[str | dict[str, Any]] = []
    for step in steps:
        name, params = step_parts(step)
        if "weights" in params:
            params["weights"] = str(folder / str(params["weights"]))
        if name in RERANKERS and RERANKERS[name].needs_images:
            params.setdefault("progress", False)
        unpacked.append({name: params} if params else name)
    return unpacked


def build_index(cfg: Config, table: DatasetTable, extractor: Extractor, progress: Progress | None = None) -> Path:
    """Embed the gallery and write serve.index_dir (replaced as a whole, never half-written); return its path."""
    servable_rerankers(cfg.rerank)  # fail before the long extraction
    gallery = gallery_rows(table, cfg.serve.gallery)
    absolute = gallery.with_paths([str(p.resolve()) for p in gallery.image_paths()])
    target = Path(cfg.serve.index_dir)
    merged = target.with_name(f".{target.name}.embeddings.npz")  # sharded, resumable; moved into the folder below
    meta = {"model": extractor.name, "normalized": extractor.normalize}
    faiss_from_shards = cfg.search.index != "exact"  # FAISS is built from the shards: kept until it is written
    embed_cfg = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"keep_shards": True})})
    if not embed_to_file(
        embed_cfg if faiss_from_shards else cfg,
        extractor,
        absolute,
        transforms_for(extractor, cfg.data),
        merged,
        meta,
        progress,
    ):
        return target  # another rank of a multi-process run: rank 0 writes the index
    emb = Embeddings.load(merged)
    dc = extractor.data_config()
    d = cfg.data
    manifest = IndexManifest(
        # what the extractor was built as (its name may come from its weights)
        model=ModelSpec(**extractor.settings()),
        transform={"image_size": d.image_size, "crop_fraction": d.crop_fraction, "mean": dc["mean"], "std": dc["std"]},
        search=SearchSettings(metric=cfg.search.metric, index=cfg.search.index),
        serve=cfg.serve,
        provenance=provenance(cfg),
        **_backend_fields(cfg),
    )
    with atomic_folder(target) as folder:
        manifest.rerank = pack_weights(cfg.rerank, folder)
        manifest.columns = [column_name(step) for step in cfg.rerank]  # as the user wrote them
        root = images_root_of(absolute.paths)
        manifest.images_root = str(root)
        manifest.write(folder)
        extractor.save(folder / MODEL_FILE)  # weights with their spec: Extractor(weights=...) rebuilds it alone
        if cfg.serve.runtime == "onnx":
            from lookalike.export import export_onnx

            export_onnx(extractor, folder / ONNX_FILE)
        paths = relative_paths(emb.ids, root)
        frame = gallery_frame(gallery, paths)
        write_gallery_csv(frame, folder / GALLERY_FILE)
        if manifest.backend == "milvus":
            _write_milvus(cfg, emb.vectors, frame)
        else:  # ids = gallery.csv's paths (relative to the manifest's images_root)
            meta = {**emb.meta, "provenance": manifest.provenance}
            _save_vectors(cfg, folder, Embeddings(emb.vectors, paths, meta), shard_folder(merged))
    if faiss_from_shards and not cfg.extract.keep_shards:
        shutil.rmtree(shard_folder(merged), ignore_errors=True)
    merged.unlink(missing_ok=True)
    return target


def _save_vectors(cfg: Config, folder: Path, emb: Embeddings, shards: Path) -> None:
    """embeddings.npz (ids = the gallery table's paths) and, when search.index names one, the FAISS index: trained on
    a sample of the shards, filled shard by shard (memory ~ the index + one shard)."""
    emb.save(folder / EMBEDDINGS_FILE)
    if cfg.search.index != "exact":
        build_faiss_from_shards(shards, cfg.search.index, cfg.search.metric).save(folder / FAISS_FILE)


def _backend_fields(cfg: Config) -> dict[str, Any]:
    """The manifest's record of where the vectors are: index.backend milvus names the server, collection and index."""
    if cfg.index.backend != "milvus":
        return {}
    uri = check_uri(cfg.index.uri)  # a local file made absolute: the folder is served from anywhere
    return {"backend": "milvus", "uri": uri, "collection": cfg.index.collection, "milvus_index": cfg.index.type}


def _write_milvus(cfg: Config, vectors: np.ndarray, frame: pd.DataFrame) -> None:
    """Upsert the gallery into index.collection at index.uri (created for these vectors under search.metric when
    absent), then close the connection. A Milvus Lite file stays locked by this process's embedded server until the
    process exits: `lookalike index` (its own process) leaves it free for `lookalike serve`."""
    dim = vectors.shape[1]
    store = MilvusGallery.connect(cfg.index.uri, cfg.index.collection, dim, cfg.search.metric, cfg.index.type)
    try:
        store_gallery(store, vectors, frame)
    finally:
        store.close()


def images_root_of(paths: Sequence[str]) -> Path:
    """The deepest folder holding every gallery image (absolute paths): what the index's paths are relative to."""
    return Path(os.path.commonpath([os.path.dirname(p) for p in paths]))


def relative_paths(paths: Sequence[str] | np.ndarray, root: Path) -> list[str]:
    """Absolute image paths as POSIX paths relative to `root` (each is under it: see images_root_of)."""
    return [Path(os.path.relpath(p, root)).as_posix() for p in paths]


def gallery_frame(gallery: DatasetTable, paths: list[str]) -> pd.DataFrame:
    """gallery.csv's rows: each item's external id (the table's id column, or its path relative to the images root),
    that path, label (labelled galleries), bbox and every metadata column, in gallery order."""
    columns = {"id": gallery.ids if gallery.has_column("id") else paths, "path": paths}
    if gallery.has_labels:
        columns["label"] = gallery.labels.astype(str)
    frame = pd.DataFrame(columns)
    if gallery.has_bbox:
        frame = frame.join(pd.DataFrame(gallery.boxes, columns=list(BBOX_COLUMNS)))
    metadata = gallery.metadata_columns
    return frame.join(pd.DataFrame({name: gallery.column(name) for name in metadata}, columns=metadata))


def write_gallery_csv(frame: pd.DataFrame, target: Path) -> None:
    """Write gallery.csv atomically, its paths as given (relative to the images root; non-UTF-8 names byte for byte)."""
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False, errors="surrogateescape")


def check_images_root(table: DatasetTable, root: Path, given: bool) -> None:
    """The images root is a folder and holds the first gallery image: a moved collection is one line, not a 500 at
    every thumbnail."""
    hint = "" if given else "; pass --images-root DIR (serve) or images_root= (load_index) where the images are now"
    if not root.is_dir():
        raise LookalikeError(f"images root {root}: not a folder{hint}")
    first = table.image_paths()[0]
    if not first.is_file():
        raise LookalikeError(f"images root {root}: gallery image {table.paths[0]!r} not found at {first}{hint}")


# ---------------------------------------------------------------- serving an index


@dataclass
class GalleryIndex:
    """Everything a search needs, loaded once. Thread-safe: one search runs the model and re-rankers at a time."""

    extractor: Extractor | OnnxExtractor
    transform: Any
    gallery: Embeddings
    table: DatasetTable  # the gallery's images (absolute paths), labels and boxes, in gallery order
    manifest: IndexManifest  # what `lookalike index` wrote: model, transform, search, serve limits, chain, provenance
    rerankers: dict[str, Reranker]
    faiss: FaissIndex | None = None
    milvus: MilvusGallery | None = None  # manifest backend milvus: the vectors are in this collection, not `gallery`
    cache: dict = field(default_factory=dict)  # re-rankers' gallery neighbour lists, shared by all searches
    lock: threading.Lock = field(default_factory=threading.Lock)
    folder: Path | None = None  # where it was loaded from (None: built in memory)

    def __post_init__(self) -> None:
        self.limits = self.manifest.serve  # serve.* as the index was built (an older index: today's defaults)
        self.thumbnail = lru_cache(maxsize=2048)(self._thumbnail)
        self.paths = np.array([os.path.normpath(p) for p in self.table.image_paths()], dtype=object)  # for reading
        self.labels = self.table.labels.astype(str) if self.table.has_labels else None  # None: a gallery without labels
        self.boxes = self.table.boxes
        self.ids = self.table.ids  # external ids, str [G]
        self.metadata = self.table.metadata()  # metadata columns, one row per gallery item
        self._by_external_id = pd.Index(self.ids)

    def position_of(self, external_id: str) -> int | None:
        """The gallery position of an external id, or None when the gallery has no such id."""
        position = self._by_external_id.get_indexer([external_id])[0]
        return None if position < 0 else int(position)

    def describe(self, positions: np.ndarray) -> pd.DataFrame:
        """Gallery items by position: external id, path relative to the images root, label (labelled galleries) and
        metadata columns, one row per position (index 0..n-1)."""
        columns = {"id": self.ids[positions], "path": self.table.paths[positions]}
        if self.labels is not None:
            columns["label"] = self.labels[positions]
        return pd.DataFrame(columns).join(self.metadata.iloc[positions].reset_index(drop=True))

    @property
    def generation(self) -> int:
        """The folder generation this gallery is (0 as built; +1 per `lookalike index add/remove`)."""
        return self.manifest.generation

    def refreshed(self, manifest: IndexManifest) -> GalleryIndex:
        """This index with the gallery of `manifest`'s generation read from its folder: same model, re-rankers and
        lock (one model, one search at a time), fresh caches."""
        if self.folder is None:
            raise LookalikeError("refresh: this index was not loaded from a folder")
        check_files(self.folder, manifest)
        emb, table = read_served_gallery(self.folder, manifest, self.table.root)
        faiss = None if self.milvus is not None else _load_faiss(self.folder, manifest)
        return replace(self, gallery=emb, table=table, manifest=manifest, faiss=faiss, cache={})

    @property
    def metric(self) -> str:
        """The search's metric: cosine or euclidean."""
        return self.manifest.search.metric

    @property
    def runtime(self) -> str:
        """What embeds queries: "onnx" (onnxruntime) or "torch"."""
        return "onnx" if isinstance(self.extractor, OnnxExtractor) else "torch"

    @property
    def candidates(self) -> int:
        return self.limits.candidates

    @property
    def short_side(self) -> int | None:
        """The side the transform resizes an image's shorter side to (None: resized to a fixed size)."""
        transform = self.manifest.transform
        return resize_side(transform.image_size, transform.crop_fraction)

    @contextmanager
    def _model(self) -> Iterator[None]:
        """Hold the lock for one search, waiting at most serve.search_timeout: a queue of searches cannot grow unbounded
        waits."""
        timeout = self.limits.search_timeout
        if not self.lock.acquire(timeout=timeout):
            raise IndexBusy(
                f"search: the server is busy (waited {timeout:g} s for other searches to finish); try again"
            )
        try:
            yield
        finally:
            self.lock.release()

    def __len__(self) -> int:
        return len(self.gallery)

    @classmethod
    def build(
        cls,
        images: str | os.PathLike | DatasetTable,
        extractor: Extractor,
        folder: str | os.PathLike,
        *,
        rerank: Sequence[str | dict[str, Any]] = (),
        metric: str = "cosine",
        index: str = "exact",
        batch_size: int = 64,
        device: str = "cpu",
        progress: Progress | None = None,
    ) -> GalleryIndex:
        """Embed a gallery, write it to `folder` as `lookalike index` does (servable by `lookalike serve folder`) and
        load
        it.

        Args:
            images: a class-per-folder tree (root/<label>/<image>, every image in the gallery), a flat folder (a gallery
            without labels) or a dataset table (all rows).
            extractor: the model; its `image_size` and `crop_fraction` are the index's transform.
            folder: the index folder to write (replaced as a whole, never half-written).
            rerank: re-rankers queries may use, as in a config's `rerank:` (e.g. ["kreciprocal", {"qe": {"n": 3}}]).
            metric: "cosine" or "euclidean".
            index: "exact", or a FAISS factory string ("Flat", "HNSW32", ...).
            batch_size: images per forward pass while embedding the gallery.
            device: torch device of the embedding ("auto": the best present).
            progress: optional `progress(batches, total)` wrapper of the batch loop.

        Returns:
            The index, loaded back from `folder`.

        Example:
            >>> import lookalike
            >>> extractor = lookalike.Extractor("resnet18", image_size=32)
            >>> folder = "data/omniglot/images_background_small1/Latin"
            >>> index = lookalike.GalleryIndex.build(folder, extractor, "runs/latin")
            >>> len(index)
            520
        """
        table = images if isinstance(images, DatasetTable) else import_folder(images, validation_fraction=0.0)
        values = Config().model_dump()
        values["model"].update(extractor.settings(), pretrained=False)
        values["data"].update(
            image_size=extractor.image_size, crop_fraction=extractor.crop_fraction, batch_size=batch_size
        )
        values["extract"]["device"] = device
        values["search"].update(metric=metric, index=index)
        values["serve"].update(index_dir=os.fspath(folder), gallery="all")
        values["rerank"] = list(rerank)
        try:
            cfg = Config.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(f"GalleryIndex.build: {validation_message(exc.errors()[0])}") from None
        return load_index(build_index(cfg, table, extractor, progress))

    @classmethod
    def load(cls, folder: str | os.PathLike, images_root: str | os.PathLike | None = None) -> GalleryIndex:
        """Read an index folder written by `GalleryIndex.build` or `lookalike index` (see `load_index`); `images_root`:
        where the gallery images are now, when they moved since the index was built."""
        return load_index(folder, images_root=images_root)

    def query(
        self, image: ImageSource, k: int = 10, reranker: str | None = None, filter: str | None = None
    ) -> pd.DataFrame:
        """The k gallery items nearest to one image, optionally re-ranked by one of the index's re-rankers.

        Args:
            image: an image file or a PIL image (not part of the gallery).
            k: how many items to return.
            reranker: a re-ranker of this index by its column name (`list(index.rerankers)`), or None for the search's
            list.
            filter: a Milvus filter expression on the gallery's fields and metadata (`alphabet == "Greek"`); only for
            an index built with index.backend=milvus.

        Returns:
            A DataFrame indexed by rank (1..k) with the gallery item's external `id`, `path` (the image file),
            `label` (labelled galleries only), `distance` (ascending), then the gallery's metadata columns.

        Example:
            >>> import lookalike
            >>> index = lookalike.GalleryIndex.load("runs/latin")
            >>> hits = index.query("data/omniglot/images_background_small1/Greek/character01/0394_01.png", k=3)
            >>> list(hits.columns), len(hits)
            (['id', 'path', 'label', 'distance'], 3)
        """
        path = None if isinstance(image, Image.Image) else str(Path(image).resolve())
        picture = image if path is None else read_image(path)
        column = self.search(self.embed(picture), k, [reranker] if reranker else [], image_path=path, filter=filter)[-1]
        hits = self.describe(column.positions).assign(path=self.paths[column.positions].astype(str))
        hits.insert(3 if self.labels is not None else 2, "distance", column.distances)
        hits.index = pd.RangeIndex(1, len(column.positions) + 1, name="rank")
        return hits

    def close(self) -> None:
        """Close the Milvus connection of a Milvus-backed index (a Milvus Lite file stays locked until the process
        exits: one process at a time searches it)."""
        if self.milvus is not None:
            self.milvus.close()

    def embed(self, image: Image.Image) -> np.ndarray:
        """The embedding [D] of one image (converted to RGB as gallery images are)."""
        batch = self.transform(to_rgb(image))[None]
        with self._model(), torch.inference_mode():
            if isinstance(self.extractor, OnnxExtractor):
                return self.extractor.run(batch)[0]
            return self.extractor(batch)[0].float().numpy()

    def search(
        self,
        vector: np.ndarray,
        k: int,
        rerankers: list[str] = (),
        gallery_position: int | None = None,
        image_path: str | None = None,
        filter: str | None = None,
    ) -> list[Column]:
        """The original top-k and each chosen re-ranker's top-k for one query vector; a gallery item never finds itself.
        Re-rankers that read images (pairwise) need the query's image file: `image_path`, or the gallery item's.
        `filter` (Milvus-backed indexes) keeps the gallery items whose fields and metadata match the expression."""
        unknown = [name for name in rerankers if name not in self.rerankers]
        if unknown:
            raise LookalikeError(
                f"rerankers: unknown {unknown[0]!r}; this index has {', '.join(self.rerankers) or 'none'}"
            )
        repeated = [(name, n) for name, n in Counter(rerankers).items() if n > 1]
        if repeated:  # with each name once, a search runs at most every configured stage once
            raise LookalikeError(
                f"rerankers: {repeated[0][0]!r} is given {repeated[0][1]} times; give each re-ranker once"
            )
        own = gallery_position is not None
        m = min(max(k, self.candidates), len(self) - own)
        query_id = (
            self.gallery.ids[gallery_position] if own else (image_path or "query")
        )  # a gallery query is that gallery node
        queries = Embeddings(vector[None].astype(np.float32), [query_id])
        exclude = (np.array([gallery_position]), np.arange(len(self))) if own else None
        table = self._table_with(image_path) if not own and self.reads_images(rerankers) else self.table
        with self._model():
            if self.milvus is None:
                original, context = self._search_memory(queries, m, exclude, table, filter)
            else:
                original, context = self._search_milvus(queries, m, gallery_position, table, filter)
            shown = self._positions(original)
            columns = [_column("original", shown, shown, k)]
            for name in rerankers:
                reranked = self.rerankers[name].rerank(original, context) if original.valid.any() else original
                check_ascending(reranked)
                columns.append(_column(name, self._positions(reranked), shown, k))
        return columns

    def vector(self, position: int) -> np.ndarray:
        """The stored embedding [D] of gallery item `position` (from Milvus for a Milvus-backed index)."""
        if self.milvus is None:
            return self.gallery.vectors[position]
        return self.milvus.vectors([self.gallery.ids[position]])[0]

    def _search_memory(
        self, queries: Embeddings, m: int, exclude, table: DatasetTable, filter: str | None
    ) -> tuple[RetrievalResults, RerankContext]:
        """The in-process search (exact or FAISS) over the whole gallery, and its re-rank context (shared cache)."""
        _no_filter(filter, self.manifest.search.index)
        context = RerankContext(
            queries=queries, gallery=self.gallery, metric=self.metric, exclude=exclude, table=table, cache=self.cache
        )
        return self._search(queries, m, exclude), context

    def _search_milvus(
        self, queries: Embeddings, m: int, own: int | None, table: DatasetTable, filter: str | None
    ) -> tuple[RetrievalResults, RerankContext]:
        """The candidates Milvus finds (passing `filter`), and a re-rank context over their fetched vectors."""
        own_id = None if own is None else str(self.gallery.ids[own])
        found = search_candidates(self.milvus, queries, m, own_id, filter, self.vector_positions)
        exclude = None
        if own is not None:  # the query is that gallery node: never its own match in re-rankers' neighbour lists
            exclude = (np.array([own]), np.array([self.vector_positions[name] for name in found.gallery_ids], np.int64))
        # neighbour lists differ per candidate set: no cache shared between searches
        context = RerankContext.over_candidates(found, queries, self.milvus, exclude=exclude, table=table)
        return found, context

    def _positions(self, results: RetrievalResults) -> RetrievalResults:
        """Results whose indices are gallery positions (Milvus's are positions among the candidates found)."""
        if self.milvus is None:
            return results
        return to_positions(results, self.vector_positions, self.gallery.ids)

    @property
    def vector_positions(self) -> dict[str, int]:
        """The gallery embeddings' id (a Milvus id) -> gallery position, built once per generation."""
        if "vector_positions" not in self.cache:
            self.cache["vector_positions"] = {name: i for i, name in enumerate(self.gallery.ids.tolist())}
        return self.cache["vector_positions"]

    def reads_images(self, rerankers: list[str]) -> bool:
        """Whether any of these re-rankers reads the images (and so needs an uploaded query saved to a file)."""
        return any(name in self.rerankers and self.rerankers[name].needs_images for name in rerankers)

    def _table_with(self, image_path: str | None) -> DatasetTable:
        """The gallery table plus one row for an uploaded query's image file (what image re-rankers read)."""
        if image_path is None:
            raise LookalikeError("rerankers: a re-ranker that reads images needs the query image's file")
        label = {"label": [""]} if self.table.has_labels else {}
        return self.table.with_rows({"path": [image_path], **label}, "<gallery + query>")

    def _search(self, queries: Embeddings, m: int, exclude) -> RetrievalResults:
        if self.faiss is not None:
            idx, dist = self.faiss.search(queries.vectors, m, exclude)
        else:
            idx, dist = exact_knn(queries.vectors, self.gallery.vectors, m, self.metric, exclude=exclude)
        return RetrievalResults(idx, dist, queries.ids, self.gallery.ids, {"metric": self.metric, "k": m})

    def _thumbnail(self, position: int) -> bytes:
        """PNG bytes of gallery item `position`, at most serve.thumbnail pixels on its longest side."""
        image = read_image(str(self.paths[position]), None if self.boxes is None else self.boxes[position])
        side = self.manifest.serve.thumbnail
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


def _no_filter(filter: str | None, index: str) -> None:
    """Filters are Milvus expressions: an index searched in-process (exact or FAISS) has no filter."""
    if filter and filter.strip():
        raise LookalikeError(
            f"filter: this index searches with {index} in-process; filters need one built with index.backend=milvus"
        )


def serve_limits(values: dict[str, Any], where: str) -> ServeConfig:
    """The serve section from `values` (e.g. with hosts added); a bad value is one line naming it."""
    try:
        return ServeConfig.model_validate(values)
    except ValidationError as exc:
        raise LookalikeError(f"{where}: serve.{validation_message(exc.errors()[0])}") from None


def _column(name: str, results: RetrievalResults, original: RetrievalResults, k: int) -> Column:
    """The top-k of one query's list, with every item's rank change against the original list."""
    valid = results.indices[0] != PAD
    positions, distances = results.indices[0][valid][:k], results.distances[0][valid][:k]
    new_rank, old_rank = np.nonzero(positions[:, None] == original.indices[0][None, :])
    change = np.full(len(positions), np.nan)
    change[new_rank] = old_rank - new_rank
    return Column(name, positions, distances, [None if np.isnan(c) else int(c) for c in change])


def load_index(
    folder: str | os.PathLike, runtime: str | None = None, images_root: str | os.PathLike | None = None
) -> GalleryIndex:
    """Read a folder written by build_index (manifest.json, or an older index.json); a missing or foreign file is a
    one-line error naming it. `runtime` (torch or onnx; default the index's serve.runtime) picks the model that embeds
    queries; `images_root` (default the manifest's) is where the gallery images are now, for a moved collection."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    model, transform = query_model(folder, manifest, runtime or manifest.serve.runtime)
    root = images_root_of_index(folder, manifest, images_root)
    emb, table = read_served_gallery(folder, manifest, root)
    milvus = None
    if manifest.backend == "milvus":  # the vectors stay in the collection; the gallery holds the ids alone
        milvus = connect_manifest(manifest, table.ids, str(folder / MANIFEST_FILE))
        if (folder / JOURNAL_FILE).is_file():  # an update was killed: undo it under the lock updates take
            with folder_lock(folder):
                recover(folder, read_manifest(folder).generation, milvus)
    check_images_root(table, root, images_root is not None)
    return GalleryIndex(
        model,
        transform,
        emb,
        table,
        manifest,
        servable_rerankers(unpack_weights(manifest.rerank, folder), manifest.columns),
        None if milvus else _load_faiss(folder, manifest),
        milvus,
        folder=folder,
    )


def check_files(folder: Path, manifest: IndexManifest) -> None:
    """A one-line error when a file the manifest's generation needs is missing."""
    needed = [MODEL_FILE] + [manifest.file(name) for name in gallery_files(manifest)]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise LookalikeError(
            f"{folder / missing[0]}: missing (the index folder holds {', '.join(needed)}; rebuild with `lookalike "
            "index`)"
        )


def gallery_files(manifest: IndexManifest) -> list[str]:
    """The base names of the files an update rewrites: the gallery table and, unless the vectors live in Milvus, the
    embeddings and (unless exact) the FAISS index."""
    if manifest.backend == "milvus":
        return [GALLERY_FILE]
    return [GALLERY_FILE, EMBEDDINGS_FILE] + ([FAISS_FILE] if manifest.search.index != "exact" else [])


def images_root_of_index(folder: Path, manifest: IndexManifest, given: str | os.PathLike | None = None) -> Path:
    """Where the gallery's relative paths start: `given` (the images moved), else the manifest's images_root; a format
    1 folder has absolute paths (any root will do: its own folder)."""
    return Path(given or manifest.images_root or folder)


def read_served_gallery(folder: Path, manifest: IndexManifest, root: Path) -> tuple[Embeddings, DatasetTable]:
    """What a GalleryIndex holds of the manifest's generation: read_gallery, or for a Milvus-backed folder the table
    and vectorless embeddings whose ids are the collection's (the external ids)."""
    if manifest.backend != "milvus":
        return read_gallery(folder, manifest, root)
    frame = read_gallery_csv(folder, manifest)
    table = DatasetTable(frame, root, str(folder / manifest.file(GALLERY_FILE)))
    return Embeddings(np.zeros((len(frame), 0), np.float32), table.ids), table


def read_gallery(folder: Path, manifest: IndexManifest, root: Path) -> tuple[Embeddings, DatasetTable]:
    """The embeddings and gallery table (paths resolved from `root`) of the manifest's generation; ids that disagree
    are one line."""
    emb, frame = read_gallery_frame(folder, manifest)
    return emb, DatasetTable(frame, root, str(folder / manifest.file(GALLERY_FILE)))


def read_gallery_csv(folder: Path, manifest: IndexManifest) -> pd.DataFrame:
    """The gallery CSV's rows (id, path, label, boxes, metadata) of the manifest's generation: every cell the string
    the table had (empty cells ""), but the bbox's numbers."""
    path = folder / manifest.file(GALLERY_FILE)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="surrogateescape")
    for column in BBOX_COLUMNS:
        if column in frame.columns:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def read_gallery_frame(folder: Path, manifest: IndexManifest) -> tuple[Embeddings, pd.DataFrame]:
    """The embeddings and the gallery CSV's rows of the manifest's generation, checked to agree."""
    frame = read_gallery_csv(folder, manifest)
    embeddings = folder / manifest.file(EMBEDDINGS_FILE)
    emb = Embeddings.load(embeddings)
    if len(emb) != len(frame) or not np.array_equal(emb.ids, frame["path"].to_numpy(str)):
        raise LookalikeError(
            f"{embeddings}: its ids are not the {len(frame)} paths of {manifest.file(GALLERY_FILE)} (rebuild with "
            "`lookalike index`)"
        )
    return emb, frame


def query_model(folder: Path, manifest: IndexManifest, runtime: str) -> tuple[Extractor | OnnxExtractor, Any]:
    """The model that embeds queries and its transform: model.pt in torch, or model.onnx in onnxruntime."""
    if runtime not in ("torch", "onnx"):
        raise LookalikeError(f"serve.runtime: expected torch or onnx, got {runtime!r}")
    if runtime == "onnx":
        if not (folder / ONNX_FILE).is_file():
            raise LookalikeError(
                f"{folder / ONNX_FILE}: missing (runtime onnx needs an index built with `lookalike index "
                "serve.runtime=onnx`)"
            )
        onnx = OnnxExtractor(folder / ONNX_FILE)
        return onnx, onnx.transform
    extractor = Extractor(**manifest.model.model_dump(), pretrained=False)
    load_weights(extractor, folder / MODEL_FILE, field="index folder")  # a truncated or foreign model.pt: one line
    # the mean and std recorded at build time
    return extractor.eval(), transforms_for(manifest.transform, manifest.transform)


def _load_faiss(folder: Path, manifest: IndexManifest) -> FaissIndex | None:
    """The saved FAISS index of the manifest's generation; None for exact search."""
    search = manifest.search
    if search.index == "exact":
        return None
    return FaissIndex.load(folder / manifest.file(FAISS_FILE), search.index, search.metric)
