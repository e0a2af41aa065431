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
from lookalike.search.milvus import RESERVED, MilvusGallery
from lookalike.serve.index import EMBEDDINGS_FILE, GALLERY_FILE
from lookalike.serve.manifest import read_manifest


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
        The filled gallery: ids and paths are the gallery's image paths, labels its labels, other columns metadata.
    """
    folder = Path(folder)
    metric = read_manifest(folder).search.metric
    emb = Embeddings.load(folder / EMBEDDINGS_FILE)
    table = pd.read_csv(folder / GALLERY_FILE, dtype={"label": str, "path": str}, encoding_errors="surrogateescape")
    if len(table) != len(emb) or not np.array_equal(table["path"].to_numpy(str), emb.ids):
        raise LookalikeError(f"{folder / EMBEDDINGS_FILE}: its ids are not the {len(table)} paths of {GALLERY_FILE}")
    gallery = MilvusGallery.connect(uri, collection, emb.dim, metric, index, params)
    metadata = {name: table[name].to_numpy(object) for name in table.columns if name not in RESERVED}
    labels = table["label"].fillna("").to_numpy(str) if "label" in table.columns else np.full(len(table), "")
    gallery.add(emb.ids, emb.vectors, emb.ids, labels, metadata, progress)
    return gallery
