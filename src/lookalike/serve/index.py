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
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import ValidationError

from lookalike.config import Config, ServeConfig, _validation_message
from lookalike.core.atomic import atomic_folder, atomic_path
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
from lookalike.search import FaissIndex, exact_knn
from lookalike.serve.manifest import IndexManifest, ModelSpec, SearchSettings, read_manifest

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
    if not embed_to_file(cfg, extractor, absolute, transforms_for(extractor, cfg.data), merged, meta, progress):
        return target  # another rank of a multi-process run: rank 0 writes the index
    emb = Embeddings.load(merged)
    dc = extractor.data_config()
    m, d = cfg.model, cfg.data
    manifest = IndexManifest(
        model=ModelSpec(
            name=m.name,
            embedding_dim=m.embedding_dim,
            normalize=m.normalize,
            bnneck=m.bnneck,
            last_stride=m.last_stride,
        ),
        transform={"image_size": d.image_size, "crop_fraction": d.crop_fraction, "mean": dc["mean"], "std": dc["std"]},
        search=SearchSettings(metric=cfg.search.metric, index=cfg.search.index),
        serve=cfg.serve,
        provenance=provenance(cfg),
    )
    with atomic_folder(target) as folder:
        manifest.rerank = pack_weights(cfg.rerank, folder)
        manifest.columns = [column_name(step) for step in cfg.rerank]  # as the user wrote them
        root = images_root_of(absolute.paths)
        manifest.images_root = str(root)
        manifest.write(folder)
        torch.save(extractor.state_dict(), folder / MODEL_FILE)
        if cfg.serve.runtime == "onnx":
            from lookalike.export import export_onnx

            export_onnx(extractor, folder / ONNX_FILE)
        paths = relative_paths(emb.ids, root)
        write_gallery(gallery, paths, folder / GALLERY_FILE)
        Embeddings(emb.vectors, paths, {**emb.meta, "provenance": manifest.provenance}).save(
            folder / EMBEDDINGS_FILE
        )  # ids = gallery.csv's paths (relative to the manifest's images_root)
        if cfg.search.index != "exact":
            FaissIndex(cfg.search.index, cfg.search.metric).add(emb.vectors).save(folder / FAISS_FILE)
    merged.unlink(missing_ok=True)
    return target


def images_root_of(paths: Sequence[str]) -> Path:
    """The deepest folder holding every gallery image (absolute paths): what the index's paths are relative to."""
    return Path(os.path.commonpath([os.path.dirname(p) for p in paths]))


def relative_paths(paths: Sequence[str] | np.ndarray, root: Path) -> list[str]:
    """Absolute image paths as POSIX paths relative to `root` (each is under it: see images_root_of)."""
    return [Path(os.path.relpath(p, root)).as_posix() for p in paths]


def write_gallery(gallery: DatasetTable, paths: list[str], target: Path) -> None:
    """gallery.csv: each item's external id (the table's id column, or its path relative to the images root), that
    path, label (labelled galleries), bbox and every metadata column, in gallery order."""
    columns = {"id": gallery.ids if gallery.has_column("id") else paths, "path": paths}
    if gallery.has_labels:
        columns["label"] = gallery.labels.astype(str)
    frame = pd.DataFrame(columns)
    if gallery.has_bbox:
        frame = frame.join(pd.DataFrame(gallery.boxes, columns=list(BBOX_COLUMNS)))
    frame = frame.join(gallery.metadata())
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False, errors="surrogateescape")


def read_gallery(path: Path, images_root: Path) -> DatasetTable:
    """gallery.csv as written by write_gallery (or by an older lookalike: absolute paths, no id column), its relative
    paths resolved from `images_root`; every cell a string but the bbox."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="surrogateescape")
    for column in BBOX_COLUMNS:
        if column in frame.columns:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return DatasetTable(frame, images_root, str(path))


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
    cache: dict = field(default_factory=dict)  # re-rankers' gallery neighbour lists, shared by all searches
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.limits = self.manifest.serve  # serve.* as the index was built (an older index: today's defaults)
        self.thumbnail = lru_cache(maxsize=2048)(self._thumbnail)
        self.paths = np.array([str(p) for p in self.table.image_paths()], dtype=object)  # absolute, for reading
        self.labels = self.table.labels.astype(str) if self.table.has_labels else None  # None: a gallery without labels
        self.boxes = self.table.boxes
        self.ids = self.table.ids  # external ids, str [G]
        self.metadata = self.table.metadata()  # metadata columns, one row per gallery item
        self._positions = pd.Index(self.ids)

    def position_of(self, external_id: str) -> int | None:
        """The gallery position of an external id, or None when the gallery has no such id."""
        position = self._positions.get_indexer([external_id])[0]
        return None if position < 0 else int(position)

    def describe(self, positions: np.ndarray) -> pd.DataFrame:
        """Gallery items by position: external id, path relative to the images root, label (labelled galleries) and
        metadata columns, one row per position (index 0..n-1)."""
        columns = {"id": self.ids[positions], "path": self.table.paths[positions]}
        if self.labels is not None:
            columns["label"] = self.labels[positions]
        return pd.DataFrame(columns).join(self.metadata.iloc[positions].reset_index(drop=True))

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
            raise ConfigError(f"GalleryIndex.build: {_validation_message(exc.errors()[0])}") from None
        return load_index(build_index(cfg, table, extractor, progress))

    @classmethod
    def load(cls, folder: str | os.PathLike, images_root: str | os.PathLike | None = None) -> GalleryIndex:
        """Read an index folder written by `GalleryIndex.build` or `lookalike index` (see `load_index`); `images_root`:
        where the gallery images are now, when they moved since the index was built."""
        return load_index(folder, images_root=images_root)

    def query(self, image: ImageSource, k: int = 10, reranker: str | None = None) -> pd.DataFrame:
        """The k gallery items nearest to one image, optionally re-ranked by one of the index's re-rankers.

        Args:
            image: an image file or a PIL image (not part of the gallery).
            k: how many items to return.
            reranker: a re-ranker of this index by its column name (`list(index.rerankers)`), or None for the search's
            list.

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
        column = self.search(self.embed(picture), k, [reranker] if reranker else [], image_path=path)[-1]
        hits = self.describe(column.positions).assign(path=self.paths[column.positions].astype(str))
        hits.insert(3 if self.labels is not None else 2, "distance", column.distances)
        hits.index = pd.RangeIndex(1, len(column.positions) + 1, name="rank")
        return hits

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
    ) -> list[Column]:
        """The original top-k and each chosen re-ranker's top-k for one query vector; a gallery item never finds itself.
        Re-rankers that read images (pairwise) need the query's image file: `image_path`, or the gallery item's."""
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
        context = RerankContext(
            queries=queries, gallery=self.gallery, metric=self.metric, exclude=exclude, table=table, cache=self.cache
        )
        with self._model():
            original = self._search(queries, m, exclude)
            columns = [_column("original", original, original, k)]
            for name in rerankers:
                reranked = self.rerankers[name].rerank(original, context)
                check_ascending(reranked)
                columns.append(_column(name, reranked, original, k))
        return columns

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


def serve_limits(values: dict[str, Any], where: str) -> ServeConfig:
    """The serve section from `values` (e.g. with hosts added); a bad value is one line naming it."""
    try:
        return ServeConfig.model_validate(values)
    except ValidationError as exc:
        raise LookalikeError(f"{where}: serve.{_validation_message(exc.errors()[0])}") from None


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
    needed = [MODEL_FILE, GALLERY_FILE, EMBEDDINGS_FILE] + ([FAISS_FILE] if manifest.search.index != "exact" else [])
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise LookalikeError(
            f"{folder / missing[0]}: missing (the index folder holds {', '.join(needed)}; rebuild with `lookalike "
            "index`)"
        )
    model, transform = _query_model(folder, manifest, runtime or manifest.serve.runtime)
    root = Path(images_root or manifest.images_root or folder)  # no images_root: a format 1 folder's absolute paths
    gallery = read_gallery(folder / GALLERY_FILE, root)
    check_images_root(gallery, root, images_root is not None)
    emb = Embeddings.load(folder / EMBEDDINGS_FILE)
    if len(emb) != len(gallery) or not np.array_equal(emb.ids, gallery.paths):
        raise LookalikeError(
            f"{folder / EMBEDDINGS_FILE}: its ids are not the {len(gallery)} paths of {GALLERY_FILE} (rebuild with "
            "`lookalike index`)"
        )
    return GalleryIndex(
        model,
        transform,
        emb,
        gallery,
        manifest,
        servable_rerankers(unpack_weights(manifest.rerank, folder), manifest.columns),
        _load_faiss(folder, manifest.search),
    )


def _query_model(folder: Path, manifest: IndexManifest, runtime: str) -> tuple[Extractor | OnnxExtractor, Any]:
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


def _load_faiss(folder: Path, search: SearchSettings) -> FaissIndex | None:
    """The saved FAISS index; None for exact search."""
    return None if search.index == "exact" else FaissIndex.load(folder / FAISS_FILE, search.index, search.metric)
