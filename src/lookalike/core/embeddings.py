"""Embeddings: a float32 matrix [N, D] with the ids (table paths) of its rows, saved as one .npz file."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lookalike.core.atomic import atomic_path
from lookalike.core.errors import LookalikeError

T = TypeVar("T")


@dataclass(frozen=True)
class Embeddings:
    """Row i of `vectors` is the embedding of the item named `ids[i]`."""

    vectors: np.ndarray
    ids: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        ids = np.asarray(self.ids).astype(str)
        if vectors.ndim != 2:
            raise LookalikeError(f"embeddings: expected a 2-D matrix [N, D], got shape {vectors.shape}")
        if ids.shape != (len(vectors),):
            raise LookalikeError(f"embeddings: expected {len(vectors)} ids, got {ids.shape[0] if ids.ndim else 0}")
        object.__setattr__(self, "vectors", vectors)
        object.__setattr__(self, "ids", ids)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def select(self, ids: np.ndarray | list[str]) -> Embeddings:
        """The rows named by `ids`, in that order; an unknown id is an error."""
        position = {name: i for i, name in enumerate(self.ids)}
        wanted = np.asarray(ids).astype(str)
        missing = [name for name in wanted if name not in position]
        if missing:
            raise LookalikeError(f"embeddings: no embedding for id {str(missing[0])!r} ({len(missing)} missing)")
        rows = np.fromiter((position[name] for name in wanted), dtype=np.int64, count=len(wanted))
        return Embeddings(self.vectors[rows], wanted, dict(self.meta))

    def save(self, path: str | os.PathLike) -> None:
        """Write vectors, ids and metadata into one .npz file atomically."""
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, vectors=self.vectors, ids=self.ids, meta=np.array(json.dumps(self.meta)))

    @staticmethod
    def read_meta(path: str | os.PathLike) -> dict:
        """The metadata of an embeddings file, without reading its vectors (a 10M-row file stays on disk)."""
        return _read(path, lambda data: json.loads(str(data["meta"])))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Embeddings:
        """Read embeddings written by `save`."""
        return _read(path, lambda data: cls(data["vectors"], data["ids"], json.loads(str(data["meta"]))))


def _read(path: str | os.PathLike, read: Callable[[Any], T]) -> T:
    """`read` of an embeddings file's arrays; a missing, truncated or foreign file is one LookalikeError naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return read(data)
    except FileNotFoundError:
        raise LookalikeError(f"{path}: no such embeddings file") from None
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # a truncated file is not a zip
        raise LookalikeError(f"{path}: not an embeddings file written by lookalike ({exc})") from None
