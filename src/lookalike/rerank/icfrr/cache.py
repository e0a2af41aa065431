"""The ICFRR reference's files: its cache (qg_dists.pth, gg_dists.pth, labels.pth), its rankings (ranks/), and the
numbering of its images (query/ and gallery/ folders, or a sketch dataset's zero-shot lists)."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lookalike.core.atomic import atomic_path
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.results import RetrievalResults
from lookalike.rerank.base import RerankContext
from lookalike.rerank.icfrr.algorithm import as_numpy, knn_block, pair_distances
from lookalike.search.exact import exact_knn

CACHE_FILES = {"qg": "qg_dists.pth", "gg": "gg_dists.pth", "labels": "labels.pth"}
RANKS_DIR, RANKS_FILE, RANKINGS_NPZ = "ranks", "reranking_iter_{}.pth", "rankings.npz"  # the reference's, + one npz
ICFRR_DATASETS = {
    "sketchy_zs1": ("sketchy", "zeroshot1"),
    "sketchy_zs2": ("sketchy", "zeroshot2"),
    "tuberlin": ("tu-berlin", "zeroshot"),
}


def load_icfrr_cache(folder: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """Read an ICFRR cache folder: qg_dists.pth [Q, G], gg_dists.pth [G, G], optional labels.pth {query, gallery}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LookalikeError(
            f"{folder}: no such ICFRR cache folder (expected {CACHE_FILES['qg']} and {CACHE_FILES['gg']} in it)"
        )
    qg = _load_matrix(folder / CACHE_FILES["qg"], "[Q, G]")
    gg = _load_matrix(folder / CACHE_FILES["gg"], "[G, G]")
    if gg.shape != (qg.shape[1], qg.shape[1]):
        expected = f"[G, G] = [{qg.shape[1]}, {qg.shape[1]}] to match {CACHE_FILES['qg']}"
        raise LookalikeError(f"{folder / CACHE_FILES['gg']}: expected {expected}, got {list(gg.shape)}")
    labels_path = folder / CACHE_FILES["labels"]
    labels = _load_labels(labels_path, qg.shape) if labels_path.exists() else None
    return qg, gg, labels


def _load(path: Path) -> Any:
    """torch.load with weights_only=True onto the CPU, with one-line errors."""
    if not path.is_file():
        holds = f"{CACHE_FILES['qg']}, {CACHE_FILES['gg']} and optionally {CACHE_FILES['labels']}"
        raise LookalikeError(f"{path}: missing (an ICFRR cache holds {holds})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing here
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise LookalikeError(f"{path}: not a torch file of tensors ({exc.__class__.__name__}: {first_line})") from None


def _load_matrix(path: Path, shape: str) -> torch.Tensor:
    """A 2-D floating-point distance tensor from a .pth file."""
    value = _load(path)
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point():
        got = (
            f"{value.dtype} tensor of shape {list(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise LookalikeError(f"{path}: expected a floating-point distance tensor {shape}, got {got}")
    return value.float()


def _load_labels(path: Path, qg_shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """{'query': LongTensor [Q], 'gallery': LongTensor [G]} from labels.pth."""
    value = _load(path)
    if not isinstance(value, dict) or not {"query", "gallery"} <= set(value):
        raise LookalikeError(f"{path}: expected a dict with 'query' and 'gallery' label tensors")
    for key, n in (("query", qg_shape[0]), ("gallery", qg_shape[1])):
        t = value[key]
        if not isinstance(t, torch.Tensor) or t.shape != (n,) or t.is_floating_point() or t.is_complex():
            got = f"shape {list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise LookalikeError(f"{path}: '{key}' must be an integer tensor of length {n}, got {got}")
    return {"query": value["query"].long(), "gallery": value["gallery"].long()}


def save_icfrr_cache(
    folder: str | os.PathLike,
    qg: Embeddings | RetrievalResults | np.ndarray | torch.Tensor,
    gg: Embeddings | np.ndarray | torch.Tensor,
    labels: dict[str, Sequence] | None = None,
    metric: str = "euclidean",
) -> Path:
    """Write qg_dists.pth, gg_dists.pth (and labels.pth, else remove a stale one) atomically in the reference's format.

    qg: the query embeddings (distances by `metric` to the gallery embeddings gg, each pair as the icfrr re-ranker
    computes it), results that list the whole gallery (K = G), or a [Q, G] matrix; gg: the gallery embeddings
    (distances by `metric`) or a [G, G] matrix; labels: {'query': [Q], 'gallery': [G]} ints or strings (coded
    together). The default metric is the reference's: torch.cdist, Euclidean.
    """
    folder = Path(folder)
    qg_t = torch.from_numpy(_query_matrix(qg, gg, metric))
    n_gallery = qg_t.shape[1]
    gg_t = torch.from_numpy(dense_gallery_distances(gg, metric) if isinstance(gg, Embeddings) else _matrix(gg, "gg"))
    if gg_t.shape != (n_gallery, n_gallery):
        raise LookalikeError(f"gg: expected [G, G] = [{n_gallery}, {n_gallery}] to match qg, got {list(gg_t.shape)}")
    coded = _label_tensors(labels, qg_t.shape) if labels is not None else None
    _save_tensor(qg_t, folder / CACHE_FILES["qg"])
    _save_tensor(gg_t, folder / CACHE_FILES["gg"])
    if coded is None:
        (folder / CACHE_FILES["labels"]).unlink(missing_ok=True)
    else:
        _save_tensor(coded, folder / CACHE_FILES["labels"])
    return folder


def _query_matrix(qg: Embeddings | RetrievalResults | np.ndarray | torch.Tensor, gg: Any, metric: str) -> np.ndarray:
    """The dense [Q, G] query-gallery distances of save_icfrr_cache's qg."""
    if isinstance(qg, RetrievalResults):
        return dense_query_distances(qg)
    if not isinstance(qg, Embeddings):
        return _matrix(qg, "qg")
    if not isinstance(gg, Embeddings):
        raise LookalikeError("qg: query embeddings need the gallery embeddings as gg (not a matrix)")
    return pair_distances(qg.vectors, gg.vectors, np.broadcast_to(np.arange(len(gg)), (len(qg), len(gg))), metric)


def _matrix(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """A 2-D float32 numpy copy of a distance matrix."""
    array = as_numpy(x)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise LookalikeError(
            f"{name}: expected a 2-D numeric distance matrix, got shape {list(array.shape)} {array.dtype}"
        )
    return np.array(array, dtype=np.float32)


def dense_query_distances(results: RetrievalResults) -> np.ndarray:
    """The [Q, G] query-gallery distances of results that list the whole gallery; excluded items get inf."""
    n_gallery = len(results.gallery_ids)
    if results.k < n_gallery:
        raise LookalikeError(
            f"qg: results must list the whole gallery (K = G = {n_gallery}), got K = {results.k}; search with k = G"
        )
    out = np.full((results.n_queries, n_gallery), np.inf, np.float32)
    rows = np.broadcast_to(np.arange(results.n_queries)[:, None], results.indices.shape)
    valid = results.valid
    out[rows[valid], results.indices[valid]] = results.distances[valid]
    return out


def dense_gallery_distances(gallery: Embeddings, metric: str = "cosine", chunk: int = 1024) -> np.ndarray:
    """The [G, G] gallery-gallery distances (self included) by exact search, blocked as gallery_knn blocks them
    (so both see bitwise-equal distances)."""
    n = len(gallery)
    idx, dist = exact_knn(gallery.vectors, gallery.vectors, n, metric, query_block=knn_block(n, chunk))
    out = np.empty((n, n), np.float32)
    np.put_along_axis(out, idx, dist, 1)
    return out


def _label_tensors(labels: dict[str, Sequence], shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Query and gallery labels as LongTensors; non-integer labels get shared integer codes."""
    if not isinstance(labels, dict) or not {"query", "gallery"} <= set(labels):
        raise LookalikeError("labels: expected a dict with 'query' and 'gallery' label arrays")
    q, g = (
        np.asarray(as_numpy(labels[k]) if isinstance(labels[k], torch.Tensor) else labels[k])
        for k in ("query", "gallery")
    )
    if q.shape != (shape[0],) or g.shape != (shape[1],):
        got = f"got shapes {list(q.shape)} and {list(g.shape)}"
        raise LookalikeError(f"labels: expected {shape[0]} query and {shape[1]} gallery labels, {got}")
    if not (np.issubdtype(q.dtype, np.integer) and np.issubdtype(g.dtype, np.integer)):
        _, codes = np.unique(np.concatenate([q.astype(str), g.astype(str)]), return_inverse=True)
        q, g = codes[: len(q)], codes[len(q) :]
    return {"query": torch.from_numpy(q.astype(np.int64)), "gallery": torch.from_numpy(g.astype(np.int64))}


def _save_tensor(value: Any, path: Path) -> None:
    """torch.save atomically."""
    with atomic_path(path, suffix=".pth") as tmp:
        torch.save(value, tmp)


def results_from_distances(
    distances: np.ndarray | torch.Tensor,
    query_ids: Sequence | None = None,
    gallery_ids: Sequence | None = None,
    chunk: int = 1024,
) -> RetrievalResults:
    """Results listing the whole gallery from a [Q, G] distance matrix, sorted stably (ties by gallery position)."""
    dense = _matrix(distances, "qg")
    n_q, n_g = dense.shape
    indices = np.empty(dense.shape, np.int64)
    for start in range(0, n_q, chunk):
        indices[start : start + chunk] = np.argsort(dense[start : start + chunk], axis=1, kind="stable")
    q_ids = np.arange(n_q).astype(str) if query_ids is None else np.asarray(query_ids)
    g_ids = np.arange(n_g).astype(str) if gallery_ids is None else np.asarray(gallery_ids)
    if len(q_ids) != n_q or len(g_ids) != n_g:
        raise LookalikeError(f"ids: expected {n_q} query and {n_g} gallery ids, got {len(q_ids)} and {len(g_ids)}")
    return RetrievalResults(
        indices, np.take_along_axis(dense, indices, 1), q_ids, g_ids, {"source": "distances", "k": n_g}
    )


def icfrr_cache_inputs(
    folder: str | os.PathLike, query_ids: Sequence | None = None, gallery_ids: Sequence | None = None
) -> tuple[RetrievalResults, RerankContext, dict[str, np.ndarray] | None]:
    """Results (K = G), a context holding the dense gallery distances, and labels (or None) from a cache folder.

    The ids default to row positions; give image paths (relative to an image root) to draw rank strips.
    """
    qg, gg, labels = load_icfrr_cache(folder)
    results = results_from_distances(qg, query_ids, gallery_ids)
    context = RerankContext(gallery_distances=gg.numpy())
    if labels is None or bool((labels["query"] == -1).all()):
        return results, context, None
    return results, context, {k: v.numpy() for k, v in labels.items()}


class RankingsWriter:
    """Writes each iteration's ranking [Q, G] as it comes: ranks/reranking_iter_{i}.pth (torch, the reference's
    layout) and one member of rankings.npz (numpy's zip format, built member by member, renamed into place at the
    end)."""

    def __init__(self, output: str | os.PathLike) -> None:
        self.output = Path(output)
        self._atomic = atomic_path(self.output / RANKINGS_NPZ, suffix=".npz")
        self._zip: zipfile.ZipFile | None = None

    def __enter__(self) -> RankingsWriter:
        self._zip = zipfile.ZipFile(self._atomic.__enter__(), "w", allowZip64=True)
        return self

    def add(self, iteration: int, ranking: np.ndarray) -> None:
        """Write one iteration's ranking (gallery positions, best first) to both files."""
        ranking = np.ascontiguousarray(ranking, dtype=np.int64)
        _save_tensor(torch.from_numpy(ranking), self.output / RANKS_DIR / RANKS_FILE.format(iteration))
        with self._zip.open(f"reranking_iter_{iteration}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, ranking, allow_pickle=False)

    def __exit__(self, *exc: object) -> None:
        self._zip.close()
        self._atomic.__exit__(*exc)


def reference_image_ids(
    image_root: str | os.PathLike, n_queries: int, n_gallery: int, dataset: str | None = None, per_class: int = -1
) -> tuple[list[str], list[str]]:
    """The image of every cache row and column, relative to image_root, numbered as the reference numbers them.

    custom (or no dataset): image_root/query/ and image_root/gallery/. The reference numbers their files in the order
    its folder listing returns them, which differs between machines; labels.json (written with the cache) keeps that
    order, so its keys are used when present, else sorted names. sketchy_zs1, sketchy_zs2, tuberlin: image_root is
    the dataset folder (Sketchy/, TUBerlin/) and the rows are its zero-shot lists' sketches and photos, in list order,
    with per_class > 0 the first per_class of each class number, class by class, as the reference takes them.
    """
    root = Path(image_root)
    if dataset is not None and dataset != "custom":
        return _listed_image_ids(root, dataset, per_class, (n_queries, n_gallery))
    order = _labels_json_order(root / "labels.json")
    ids = []
    for split, n in (("query", n_queries), ("gallery", n_gallery)):
        folder = root / split
        if not folder.is_dir():
            raise LookalikeError(
                f"{folder}: no such folder (an image root holds query/ and gallery/, as the reference's custom dataset)"
            )
        names = order.get(split) or sorted(
            p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
        )
        if len(names) != n:
            raise LookalikeError(f"{folder}: {len(names)} images for the cache's {n} {split} items")
        ids.append([f"{split}/{name}" for name in names])
    return ids[0], ids[1]


def _listed_image_ids(root: Path, dataset: str, per_class: int, sizes: tuple[int, int]) -> tuple[list[str], list[str]]:
    """Query (sketch) and gallery (photo) paths from a sketch dataset's zero-shot file lists, as the reference reads
    them."""
    from lookalike.data.convert.sketch import FILE_LISTS, read_file_list  # here: the converters import scipy

    if dataset not in ICFRR_DATASETS:
        raise LookalikeError(f"--dataset: expected one of custom, {', '.join(ICFRR_DATASETS)}, got {dataset!r}")
    name, split_folder = ICFRR_DATASETS[dataset]
    ids = []
    for (domain, prefix), n in zip(FILE_LISTS[name].items(), sizes):
        path = root / split_folder / f"{prefix}_filelist_zero.txt"
        if not path.is_file():
            raise LookalikeError(
                f"{path}: missing (the {domain} images of {dataset}'s zero-shot split; --image-root is the dataset "
                "folder)"
            )
        rows = read_file_list(path)
        if per_class > 0:
            numbers = rows["number"].to_numpy()
            rows = rows.iloc[np.concatenate([np.flatnonzero(numbers == c)[:per_class] for c in np.unique(numbers)])]
        if len(rows) != n:
            raise LookalikeError(
                f"{path}: {len(rows)} images for the cache's {n} {'query' if domain == 'sketch' else 'gallery'} items"
            )
        ids.append(rows["path"].tolist())
    return ids[0], ids[1]


def _labels_json_order(path: Path) -> dict[str, list[str]]:
    """The file names of labels.json's 'query' and 'gallery' objects in their order ({} without the file)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LookalikeError(f"{path}: not a readable JSON file ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k, {}), dict) for k in ("query", "gallery")):
        raise LookalikeError(f"{path}: expected {{'query': {{file: label}}, 'gallery': {{file: label}}}}")
    return {k: list(data[k]) for k in ("query", "gallery") if k in data}


def cache_folder(cache_root: str | os.PathLike, dataset: str, per_class: int = -1) -> Path:
    """The reference's cache folder for a dataset: cache_root/dataset/per_class (e.g. cache/tuberlin/-1)."""
    return Path(cache_root) / dataset / str(per_class)
