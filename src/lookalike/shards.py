"""Embeddings as fixed-size shard files: written as they are computed, resumable, read back in table order.

A run that embeds N table rows with shard size S writes the folder `OUTPUT.shards/`:

- `manifest.json`, written first: format, shard size, number of rows, the sha256 of the ids in order, and the
  provenance of the numbers (table and its sha256, model spec and a digest of the extractor's weights, the settings
  that change the float bits: image size, crop, layout). A manifest that differs from the run's own is refused in one
  line (`extract.restart=true` starts over).
- `shard-00000.npz`, `shard-00001.npz`, ...: shard s holds table rows [s*S, min((s+1)*S, N)) in table order, as
  `ids`, `vectors` (float32 [rows, D]), `rows` ([start, end)) and `manifest` (the manifest's sha256); each is written
  atomically (temporary + rename), so a file that exists is complete. A killed run is resumed by running the same
  command again: every shard that reads back with its row range and manifest digest is kept, the others computed.

`iter_shards(folder)` yields (ids, vectors) per shard in table order (FAISS building and exports read it);
`merge_shards` streams the shards into the usual Embeddings .npz (memory: one shard).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.core.atomic import atomic_path, write_text_atomic
from lookalike.core.errors import LookalikeError, ProvenanceError

FORMAT = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_SIZE = 50_000


def shard_folder(output: str | os.PathLike) -> Path:
    """The shard folder of an output file or folder: `OUTPUT.shards` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".shards")


def shard_path(folder: Path, shard: int) -> Path:
    """The file of shard number `shard`."""
    return folder / f"shard-{shard:05d}.npz"


def ids_sha256(ids: np.ndarray) -> str:
    """sha256 of the ids in order (one per line): the same rows in the same order, the same digest."""
    digest = hashlib.sha256()
    for name in ids.astype(str):
        digest.update(name.encode("utf-8", "surrogateescape") + b"\n")  # non-UTF-8 file names kept as surrogates
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What a shard folder holds: `n_rows` rows cut every `shard_size`, and the provenance (`spec`) of their
    numbers."""

    shard_size: int
    n_rows: int
    dim: int
    ids_sha256: str
    spec: dict

    @property
    def n_shards(self) -> int:
        """Shards of the folder: the last may be shorter."""
        return -(-self.n_rows // self.shard_size)

    def rows(self, shard: int) -> tuple[int, int]:
        """The table rows [start, end) of one shard."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.n_rows)

    def to_dict(self) -> dict:
        """The manifest as manifest.json holds it."""
        return {
            "format": FORMAT,
            "shard_size": self.shard_size,
            "n_rows": self.n_rows,
            "dim": self.dim,
            "ids_sha256": self.ids_sha256,
            "spec": self.spec,
        }

    @property
    def sha256(self) -> str:
        """Digest of the manifest (keys sorted): every shard records it, so a shard of another run is recomputed."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        """A manifest read from manifest.json."""
        return cls(data["shard_size"], data["n_rows"], data["dim"], data["ids_sha256"], data["spec"])


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """The manifest of a shard folder; a missing or unreadable one is a one-line error naming the file."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        return Manifest.from_dict(data)
    except FileNotFoundError:
        raise LookalikeError(f"{path}: no such shard manifest (not a shard folder written by lookalike)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LookalikeError(f"{path}: not a shard manifest written by lookalike ({exc})") from None


def _difference(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first dotted key whose value differs between two manifests, with both values."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} was {json.dumps(a)[:80]}, now {json.dumps(b)[:80]}"
    return None


def prepare_folder(folder: str | os.PathLike, manifest: Manifest, restart: bool = False) -> Path:
    """Create the shard folder and write its manifest; an existing folder of the same run is kept (resume), one of
    another run is refused in one line (ProvenanceError), or emptied first with `restart`."""
    folder = Path(folder)
    if (folder / MANIFEST).exists() and not restart:
        try:
            old = read_manifest(folder)
        except LookalikeError as exc:
            raise ProvenanceError(f"{exc}; set extract.restart=true to start over") from None
        diff = _difference(old.to_dict(), manifest.to_dict())
        if diff:
            raise ProvenanceError(
                f"{folder} holds shards of another run ({diff}); rerun with the same table and model to resume, or set "
                "extract.restart=true to start over"
            )
        return folder
    if restart and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / MANIFEST, json.dumps(manifest.to_dict(), indent=2) + "\n")
    return folder


def write_shard(folder: Path, manifest: Manifest, shard: int, ids: np.ndarray, vectors: np.ndarray) -> Path:
    """Write one complete shard atomically: its ids, float32 vectors, row range and the manifest's digest."""
    start, end = manifest.rows(shard)
    if len(ids) != end - start or vectors.shape != (end - start, manifest.dim):
        raise LookalikeError(f"shard {shard}: expected {end - start} rows of dimension {manifest.dim}")
    path = shard_path(folder, shard)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                ids=np.asarray(ids).astype(str),
                vectors=np.ascontiguousarray(vectors, dtype=np.float32),
                rows=np.array([start, end], dtype=np.int64),
                manifest=np.array(manifest.sha256),
            )
    return path


class ShardSink:
    """Collects embedded rows (in any batch cut) and writes each shard the moment all its rows are in: memory holds
    the shards being filled (one, or two when a batch straddles a boundary), never the collection."""

    def __init__(self, folder: Path, manifest: Manifest, ids: np.ndarray) -> None:
        self.folder, self.manifest, self.ids = folder, manifest, ids
        self.pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard -> (vectors, filled mask)
        self.written: list[int] = []

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Take the embeddings of table rows `rows`; write every shard this completes."""
        size = self.manifest.shard_size
        shards = rows // size
        for shard in np.unique(shards).tolist():
            mine = shards == shard
            start, end = self.manifest.rows(shard)
            if shard not in self.pending:
                self.pending[shard] = (
                    np.empty((end - start, self.manifest.dim), np.float32),
                    np.zeros(end - start, bool),
                )
            buffer, filled = self.pending[shard]
            buffer[rows[mine] - start] = vectors[mine]
            filled[rows[mine] - start] = True
            if filled.all():
                write_shard(self.folder, self.manifest, shard, self.ids[start:end], buffer)
                del self.pending[shard]
                self.written.append(shard)


def _npy_shape(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an array in an .npz without reading its data."""
    with zf.open(name) as fh:
        version = np.lib.format.read_magic(fh)
        fmt = np.lib.format
        shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(fh)
    return shape, dtype


def shard_complete(folder: Path, manifest: Manifest, shard: int) -> bool:
    """Whether shard `shard` reads back with the right row range, manifest digest and vector shape (header only)."""
    path = shard_path(folder, shard)
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            with np.load(path, allow_pickle=False) as data:
                rows, digest = data["rows"].tolist(), str(data["manifest"])
            shape, dtype = _npy_shape(zf, "vectors.npy")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False
    start, end = manifest.rows(shard)
    return rows == [start, end] and digest == manifest.sha256 and shape == (end - start, manifest.dim) and dtype == "f4"


def missing_shards(folder: Path, manifest: Manifest, rank: int = 0, world_size: int = 1) -> list[int]:
    """The shards rank `rank` of `world_size` owns (shard s belongs to rank s % world_size) that are not complete."""
    return [s for s in range(rank, manifest.n_shards, world_size) if not shard_complete(folder, manifest, s)]


def complete_shards(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a shard folder whose every shard is written (what a finished run with keep_shards leaves)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return False
    return not missing_shards(folder, read_manifest(folder))


def read_shard(folder: Path, manifest: Manifest, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of one shard, checked against the manifest; a missing or foreign shard is a one-line error."""
    path = shard_path(folder, shard)
    if not shard_complete(folder, manifest, shard):
        raise LookalikeError(f"{path}: missing or not a shard of {folder / MANIFEST}; rerun the command to complete it")
    with np.load(path, allow_pickle=False) as data:
        return data["ids"], data["vectors"]


def iter_shards(folder: str | os.PathLike) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors float32 [rows, D]) of every shard of a complete shard folder, in table order.

    Args:
        folder: a shard folder (`OUTPUT.shards`) written by `lookalike extract` or `lookalike index`.

    Returns:
        An iterator over the shards; concatenated, they are the rows of the table in order. Memory: one shard.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    for shard in range(manifest.n_shards):
        yield read_shard(folder, manifest, shard)


def merge_shards(folder: str | os.PathLike, output: str | os.PathLike, meta: dict) -> int:
    """Stream the shards of `folder` into one Embeddings .npz at `output` (atomically), memory ~ one shard.

    Args:
        folder: a complete shard folder.
        output: the .npz to write (`Embeddings.load` reads it).
        meta: the Embeddings metadata to store (model, provenance).

    Returns:
        The number of rows written.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    with atomic_path(output, suffix=".npz") as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            width = _id_width(folder, manifest)
            with zf.open("vectors.npy", "w", force_zip64=True) as fh:
                _write_header(fh, (manifest.n_rows, manifest.dim), np.dtype("<f4"))
                for _, vectors in iter_shards(folder):
                    fh.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
            with zf.open("ids.npy", "w", force_zip64=True) as fh:
                _write_header(fh, (manifest.n_rows,), np.dtype(f"<U{width}"))
                for ids, _ in iter_shards(folder):
                    fh.write(ids.astype(f"<U{width}").tobytes())
            with zf.open("meta.npy", "w") as fh:
                np.lib.format.write_array(fh, np.array(json.dumps(meta)))
    return manifest.n_rows


def _id_width(folder: Path, manifest: Manifest) -> int:
    """The longest id of the shard folder (characters), read from the ids' headers only."""
    width = 1
    for shard in range(manifest.n_shards):
        with zipfile.ZipFile(shard_path(folder, shard)) as zf:
            width = max(width, _npy_shape(zf, "ids.npy")[1].itemsize // 4)
    return width


def _write_header(fh, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """An .npy header for a C-order array of `shape` and `dtype` whose data follows."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_2_0(fh, header)
