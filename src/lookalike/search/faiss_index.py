"""FAISS indexes (flat, IVF, HNSW, PQ by factory string) behind the same call as exact search."""

from __future__ import annotations

import numpy as np

from lookalike.core.errors import LookalikeError
from lookalike.core.results import check_metric, drop_hidden, max_hidden


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

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def add(self, gallery: np.ndarray) -> FaissIndex:
        """Build (training IVF/PQ on the gallery itself) and fill the index."""
        faiss = _faiss()
        g = self._prepare(gallery)
        kind = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        try:
            index = faiss.index_factory(g.shape[1], self.factory, kind)
        except RuntimeError as exc:
            raise LookalikeError(
                f"search.index: FAISS cannot build {self.factory!r} ({str(exc).splitlines()[0]})"
            ) from None
        if not index.is_trained:
            index.train(g)
        self._tune(index)
        index.add(g)
        self.index, self.size = index, len(g)
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
        _faiss().write_index(self.index, str(path))

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
