"""Copying a served gallery folder (`lookalike index`) into a Milvus collection (`lookalike index --export`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.progress import Progress
from lookalike.search.milvus import MilvusGallery
from lookalike.serve.index import EMBEDDINGS_FILE, GALLERY_FILE
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
        The filled gallery: ids and paths are the gallery's image paths, labels its labels, other columns (but
        split, is_query, is_gallery and the box) metadata.
    """
    folder = Path(folder)
    metric = read_manifest(folder).search.metric
    emb = Embeddings.load(folder / EMBEDDINGS_FILE)
    table = pd.read_csv(folder / GALLERY_FILE, dtype={"label": str, "path": str}, encoding_errors="surrogateescape")
    if len(table) != len(emb) or not np.array_equal(table["path"].to_numpy(str), emb.ids):
        raise LookalikeError(f"{folder / EMBEDDINGS_FILE}: its ids are not the {len(table)} paths of {GALLERY_FILE}")
    gallery = MilvusGallery.connect(uri, collection, emb.dim, metric, index, params)
    return store_gallery(gallery, emb.vectors, table, progress)
