"""Copying a served gallery folder (`lookalike index`) into a Milvus collection (`lookalike index --export`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lookalike.progress import Progress
from lookalike.search.milvus import MilvusGallery
from lookalike.serve.index import read_gallery_frame
from lookalike.serve.manifest import read_manifest
from lookalike.serve.milvus_backend import store_gallery


def export_index_to_milvus(
    folder: str | Path,
    uri: str,
    collection: str = "gallery",
    index: str = "FLAT",
    params: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> MilvusGallery:
    """Copy an index folder written by `lookalike index` (embeddings + gallery table) into a Milvus collection.

    Args:
        folder: the index folder (manifest.json, gallery.csv, embeddings.npz).
        uri: a local .db file (Milvus Lite) or http(s)://host:port.
        collection: the collection to fill; an existing one is upserted into (same ids replace).
        index: FLAT, HNSW or IVF_FLAT.
        params: index build/search parameters.
        progress: wraps the loop over insert batches.

    Returns:
        The filled gallery: ids the gallery's external ids, paths its paths, labels its labels, other columns (but
        split, is_query, is_gallery and the box) metadata.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    metric = manifest.search.metric
    emb, table = read_gallery_frame(folder, manifest)  # the generation in use (after `lookalike index add/remove`)
    gallery = MilvusGallery.connect(uri, collection, emb.dim, metric, index, params)
    return store_gallery(gallery, emb.vectors, table, progress)
