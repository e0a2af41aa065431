"""The index folder's manifest: what `lookalike index` wrote (model, transform, search, serve limits, re-rank chain,
provenance), versioned and typed, so `lookalike serve` reads fields, never string keys of a hand-built dict."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lookalike import __version__
from lookalike.config import Metric, PositiveInt, RerankStep, ServeConfig, validation_message
from lookalike.core.atomic import write_text_atomic
from lookalike.core.errors import LookalikeError

FORMAT_VERSION = 2  # raise it when a field changes meaning; add a migration of the old version to MIGRATIONS
# 2: gallery.csv paths are relative to images_root (1: absolute paths) and it has an id column and metadata columns
MANIFEST_FILE = "manifest.json"
LEGACY_FILE = "index.json"  # written before the manifest (its "format": 1 is this manifest's version 1)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Part):
    """The extractor's constructor arguments (Extractor.settings()): rebuilt without pretrained weights, then model.pt
    loaded."""

    name: str
    embedding_dim: PositiveInt | None = None
    normalize: bool = True
    bnneck: bool = False
    last_stride: PositiveInt | None = None


class TransformSettings(_Part):
    """The evaluation transform the gallery was embedded with (lookalike.data.images.transforms_for)."""

    image_size: int | list[int]
    crop_fraction: float = Field(gt=0, le=1)
    mean: list[float]  # the backbone's normalisation as recorded at build time (timm's data config)
    std: list[float]


class SearchSettings(_Part):
    """How the gallery is searched."""

    metric: Metric = "cosine"
    index: str = "exact"  # exact, or the FAISS factory string of faiss.index


class IndexManifest(_Part):
    """manifest.json of an index folder, format version 2 (version 1 folders are read through MIGRATIONS)."""

    format_version: int = FORMAT_VERSION
    lookalike: str = __version__  # the version that wrote the folder
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc).replace(microsecond=0))
    model: ModelSpec
    transform: TransformSettings
    search: SearchSettings = SearchSettings()
    serve: ServeConfig = ServeConfig()  # an older folder without a newer limit gets today's default
    rerank: list[RerankStep] = []  # weights files named relative to the folder
    columns: list[str] = []  # each re-ranker's column title, as the user wrote the step
    provenance: dict[str, Any] = {}  # lookalike.provenance.record of the config that built the folder
    images_root: str | None = None  # the folder gallery.csv's paths are relative to (None: absolute paths, format 1)
    backend: Literal["faiss", "milvus"] | None = None  # None or faiss: embeddings.npz (+ faiss.index) in the folder
    uri: str | None = None  # milvus: the collection's server (an absolute .db file of Milvus Lite, or http(s)://)
    collection: str | None = None  # milvus: the collection holding the gallery's vectors (ids = gallery.csv ids)
    milvus_index: Literal["FLAT", "HNSW", "IVF_FLAT"] | None = None  # milvus: the collection's index type
    generation: int = Field(0, ge=0)  # bumped by every `lookalike index add/remove`; names the gallery files in use

    @model_validator(mode="after")
    def _milvus_names_its_collection(self) -> IndexManifest:
        """A Milvus-backed folder says where its vectors are: without uri and collection it cannot be searched."""
        if self.backend == "milvus" and not (self.uri and self.collection):
            raise ValueError("backend milvus needs uri and collection (where the gallery's vectors are)")
        return self

    def file(self, name: str) -> str:
        """The file of this generation holding `name` (gallery.csv, embeddings.npz, faiss.index): the name itself at
        generation 0 (as built), else `stem.gN.suffix`, so an update writes new files beside the ones being served."""
        if self.generation == 0:
            return name
        stem, dot, suffix = name.partition(".")
        return f"{stem}.g{self.generation}{dot}{suffix}"

    def write(self, folder: Path) -> None:
        """Write manifest.json into `folder` atomically (renamed into place: a reader sees the old or the new one)."""
        write_text_atomic(folder / MANIFEST_FILE, self.model_dump_json(indent=2) + "\n")


def read_manifest(folder: Path) -> IndexManifest:
    """The manifest of an index folder (manifest.json, or the index.json an older lookalike wrote).

    Args:
        folder: an index folder written by `lookalike index` or `GalleryIndex.build`.

    Returns:
        IndexManifest; a missing, corrupt, newer or wrongly-typed manifest is one LookalikeError naming the file and
        field.
    """
    path = folder / MANIFEST_FILE
    if not path.is_file() and (folder / LEGACY_FILE).is_file():
        return _validated(_from_legacy(folder / LEGACY_FILE), folder / LEGACY_FILE)
    values = _json_object(path)
    version = values.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise LookalikeError(
            f"{path}: format_version {version} is newer than this lookalike reads ({FORMAT_VERSION}); upgrade lookalike"
        )
    if version in MIGRATIONS:
        values = MIGRATIONS[version](values)
    elif version != FORMAT_VERSION:
        raise LookalikeError(f"{path}: format_version: expected {FORMAT_VERSION}, got {version!r}")
    return _validated(values, path)


def _from_v1(values: dict[str, Any]) -> dict[str, Any]:
    """A format 1 manifest as format 2: its gallery.csv holds absolute paths, so no images root."""
    return {**values, "format_version": FORMAT_VERSION, "images_root": None}


MIGRATIONS = {1: _from_v1}  # format_version -> the function that brings its values to FORMAT_VERSION


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object file, or one line saying why not."""
    if not path.is_file():
        raise LookalikeError(f"{path}: missing (expected a folder written by `lookalike index`)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LookalikeError(f"{path}: not valid JSON ({exc}); rebuild with `lookalike index`") from None
    if not isinstance(values, dict):
        raise LookalikeError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


def _validated(values: dict[str, Any], path: Path) -> IndexManifest:
    """The manifest from its values; the first bad field as one line naming the file and the field."""
    try:
        return IndexManifest.model_validate(values)
    except ValidationError as exc:
        raise LookalikeError(f"{path}: {validation_message(exc.errors()[0])}") from None


def _from_legacy(path: Path) -> dict[str, Any]:
    """The manifest values of an index.json written before manifest.json ({"format": 1, "data": ..., ...})."""
    values = _json_object(path)
    if values.get("format") != 1:
        raise LookalikeError(f"{path}: format {values.get('format')!r}, expected 1")
    provenance = values.get("provenance") or {}
    legacy = {key: values[key] for key in ("model", "search", "serve", "rerank", "columns") if key in values}
    return {
        **legacy,
        "format_version": FORMAT_VERSION,
        "lookalike": str(provenance.get("lookalike", "unknown")),
        "created_at": provenance.get("time") or datetime.fromtimestamp(path.stat().st_mtime, timezone.utc),
        "transform": values.get("data"),
        "provenance": provenance,
    }
