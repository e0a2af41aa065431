"""FAISS indexes (flat, IVF, HNSW, PQ by factory string) behind the same call as exact search; built from an
in-memory gallery (`FaissIndex.add`) or streamed from embedding shards (`build_faiss_from_shards`: trained on a seeded
sample, filled shard by shard, so memory is the compressed index + one shard + the sample, never the collection)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np

from lookalike.core.atomic import atomic_path
from lookalike.core.errors import LookalikeError
from lookalike.core.results import check_metric, drop_hidden, max_hidden
from lookalike.progress import Progress

Shards = Iterable[tuple[np.ndarray, np.ndarray]]
DEFAULT_TRAIN_SIZE = 100_000  # vectors sampled to train IVF / PQ: k-means uses at most 256 per centroid anyway


def _faiss():
    import faiss  # imported lazily: a large library that most commands never need

    return faiss


class FaissIndex:
    """A gallery held in a FAISS index built from a factory string such as 'Flat', 'IVF256,Flat', 'HNSW32'."""

    def __init__(self, factory: str = "Flat", metric: str = "cosine", nprobe: int = 16, ef_search: int = 128) -> None:
        check_metric(metric)
        self.factory, self.metric, self.nprobe, self.ef_search = factory, metric, nprobe, ef_search
        self.index = None
        self.size = 0
        self.ids: np.ndarray | None = None  # gallery ids by position, when built from shards

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def add(self, gallery: np.ndarray) -> FaissIndex:
        """Build (training IVF/PQ on the gallery itself) and fill the index."""
        g = self._prepare(gallery)
        self.train(g)
        self.index.add(g)
        self.size = len(g)
        return self

    def train(self, sample: np.ndarray) -> FaissIndex:
        """Create the empty index of the factory string and train it (IVF centroids, PQ codebooks) on `sample`."""
        faiss = _faiss()
        x = self._prepare(sample)
        kind = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        try:
            index = faiss.index_factory(x.shape[1], self.factory, kind)
            if not index.is_trained:
                index.train(x)
        except RuntimeError as exc:
            raise LookalikeError(
                f"search.index: FAISS cannot build {self.factory!r} ({str(exc).splitlines()[0]})"
            ) from None
        self._tune(index)
        self.index, self.size = index, 0
        return self

    def append(self, vectors: np.ndarray) -> FaissIndex:
        """Add rows after the existing ones (positions len..len+n), without retraining: an update that only adds."""
        if self.index is None:
            raise LookalikeError("search: the FAISS index is empty; call add(gallery) first")
        self.index.add(self._prepare(vectors))
        self.size = self.index.ntotal
        return self

    def save(self, path: str) -> None:
        """Write the built index to a file (FAISS's own format)."""
        if self.index is None:
            raise LookalikeError("search: the FAISS index is empty; call add(gallery) first")
        with atomic_path(path) as tmp:
            _faiss().write_index(self.index, str(tmp))

    @classmethod
    def load(
        cls, path: str, factory: str, metric: str = "cosine", nprobe: int = 16, ef_search: int = 128
    ) -> FaissIndex:
        """An index written by `save`, tuned and ready to search as if just built."""
        loaded = cls(factory, metric, nprobe, ef_search)
        loaded.index = _faiss().read_index(str(path))
        loaded._tune(loaded.index)
        loaded.size = loaded.index.ntotal
        return loaded

    def _tune(self, index) -> None:
        faiss = _faiss()
        params = faiss.ParameterSpace()
        for name, value in (("nprobe", self.nprobe), ("efSearch", self.ef_search)):
            try:
                params.set_index_parameter(index, name, value)
            except RuntimeError:
                pass  # the parameter does not apply to this index type

    def search(
        self, queries: np.ndarray, k: int, exclude: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k gallery positions and ascending distances; excluded groups are skipped as in exact search."""
        if self.index is None:
            raise LookalikeError("search: the FAISS index is empty; call add(gallery) first")
        q = self._prepare(queries)
        extra = max_hidden(exclude) if exclude is not None else 0
        score, index = self.index.search(q, min(k + extra, self.size))
        dist = 1.0 - score if self.metric == "cosine" else np.sqrt(np.maximum(score, 0.0))
        return drop_hidden(index.astype(np.int64), dist.astype(np.float32), exclude, k)


def _shard_reader(shards: str | os.PathLike | Callable[[], Shards]) -> Callable[[], Shards]:
    """A function that reads the shards from the start each time it is called (building reads them twice)."""
    if callable(shards):
        return shards
    from lookalike.shards import iter_shards  # imported here: lookalike.shards is not needed to search

    return lambda: iter_shards(shards)


def sample_shards(shards: Shards, size: int, seed: int = 0) -> np.ndarray:
    """A seeded uniform sample of at most `size` rows across all shards, in their order (memory: sample + one shard).

    Args:
        shards: (ids, vectors [rows, D]) blocks, read once.
        size: rows to keep; with `size` >= the rows of all shards, every row is kept.
        seed: seed of the random keys (the sample is the rows with the `size` smallest keys, as reservoir sampling).

    Returns:
        float32 [min(size, rows), D]: the sampled rows in shard order.
    """
    if size < 1:
        raise LookalikeError(f"search: train_size must be at least 1, got {size}")
    rng = np.random.default_rng(seed)
    keys, rows, sample, seen = np.empty(0), np.empty(0, np.int64), None, 0
    for _, vectors in shards:
        key = rng.random(len(vectors))
        take = np.flatnonzero(key < keys.max()) if len(keys) >= size else np.arange(len(vectors))
        keys = np.concatenate([keys, key[take]])
        rows = np.concatenate([rows, seen + take])
        block = np.asarray(vectors[take], dtype=np.float32)
        sample = block if sample is None else np.concatenate([sample, block])
        if len(keys) > size:
            keep = np.argpartition(keys, size - 1)[:size]
            keys, rows, sample = keys[keep], rows[keep], sample[keep]
        seen += len(vectors)
    if sample is None:
        raise LookalikeError("search: the shards hold no vectors to build a FAISS index from")
    return sample[np.argsort(rows)]


def build_faiss_from_shards(
    shards: str | os.PathLike | Callable[[], Shards],
    factory: str,
    metric: str = "cosine",
    train_size: int = DEFAULT_TRAIN_SIZE,
    seed: int = 0,
    progress: Progress | None = None,
    **tuning: int,
) -> FaissIndex:
    """A FAISS index of every shard's vectors: trained on a seeded sample, then filled shard by shard.

    Memory is the compressed index + one shard + the training sample, never all the vectors, so a gallery of
    10M vectors is built where only its IVF-PQ codes fit. Positions in the index are rows in shard order (the table's
    order for a shard folder); with `train_size` >= the rows, the index equals `FaissIndex(factory).add(all rows)`.

    Args:
        shards: a shard folder written by `lookalike extract` / `lookalike index` (lookalike.shards), or a function
            returning a fresh iterator of (ids, vectors) blocks (called twice: sampling, then adding).
        factory: FAISS factory string ('IVF1024,PQ32', 'HNSW32', 'Flat', ...).
        metric: "cosine" or "euclidean".
        train_size: most vectors the IVF / PQ training sees.
        seed: seed of the training sample.
        progress: optional wrapper of the loop that adds the shards (unit: shard).
        **tuning: nprobe, ef_search as FaissIndex takes them.

    Returns:
        The trained, filled FaissIndex; `ids` holds the shards' ids in order (position i -> ids[i]).
    """
    read = _shard_reader(shards)
    built = FaissIndex(factory, metric, **tuning).train(sample_shards(read(), train_size, seed))
    blocks = read()
    total = _shard_count(shards)
    ids = []
    for block_ids, vectors in progress(blocks, total) if progress is not None else blocks:
        built.append(vectors)
        ids.append(np.asarray(block_ids))
    built.ids = np.concatenate(ids)
    return built


def _shard_count(shards: str | os.PathLike | Callable[[], Shards]) -> int | None:
    """Shards of a shard folder (from its manifest), for progress; None for an iterator."""
    if callable(shards):
        return None
    from lookalike.shards import read_manifest

    return read_manifest(shards).n_shards
