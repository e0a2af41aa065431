"""A gallery in Milvus: vectors with id, path, label and metadata, searched with an optional filter expression.

The URI picks the server: a local `.db` file starts Milvus Lite inside this process (pymilvus + milvus-lite, the
embedded default), `http(s)://host:port` talks to a Milvus standalone server or cluster with the same code. Results
are the project's RetrievalResults over the candidates a search returned (their ids are the results' gallery ids), so
re-rankers run on a RerankContext holding just those candidates' vectors (`MilvusGallery.context`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.core.errors import LookalikeError
from lookalike.core.results import PAD, RetrievalResults
from lookalike.progress import Progress
from lookalike.search.exact import order_by_distance

METRICS = {"cosine": "COSINE", "euclidean": "L2"}  # the project's metric -> Milvus's metric type
INDEX_PARAMS = {"FLAT": {}, "HNSW": {"M": 32, "efConstruction": 200}, "IVF_FLAT": {"nlist": 1024}}  # build defaults
SEARCH_PARAMS = {"FLAT": {}, "HNSW": {"ef": 128}, "IVF_FLAT": {"nprobe": 16}}  # search-time defaults
RESERVED = ("id", "vector", "path", "label")  # the collection's own fields; metadata columns take other names
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_FILTER = 4096  # characters of a filter expression (untrusted input: bounded before it reaches Milvus)
MAX_K = 16384  # Milvus's largest topk
MAX_TEXT = 8192  # VARCHAR length of id, path and label
BATCH_BYTES = 16 << 20  # bytes of vectors per insert request (Milvus refuses requests over 64 MiB by default)
GET_BATCH = 1024  # ids per fetch or delete request
QUERY_BATCH = 256  # queries per search request
QUIET_LOGGERS = ("pymilvus", "grpc._server", "milvus_lite")
LITE_LOCKED = "Open local milvus failed"  # pymilvus's whole reason when Milvus Lite cannot open (or lock) the file


def _milvus():
    """pymilvus, imported lazily: only this backend needs it."""
    import pymilvus

    return pymilvus


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pymilvus's error log for one call (its exceptions become one-line LookalikeErrors instead), and Milvus
    Lite's gRPC server's log of the calls it does not implement (pymilvus falls back without them)."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _reason(exc: Exception) -> str:
    """The first line of a pymilvus exception's message."""
    message = getattr(exc, "message", None) or str(exc)
    return str(message).strip().splitlines()[0] if str(message).strip() else type(exc).__name__


def check_uri(uri: str) -> str:
    """`uri` as pymilvus takes it: a local .db file (Milvus Lite) or http(s)://host:port; anything else is one line.

    Args:
        uri: a path ending in .db, or the address of a Milvus server or cluster.

    Returns:
        The URI, a local path made absolute.
    """
    text = str(uri)
    if re.fullmatch(r"https?://[^\s/]+(:\d+)?/?", text):
        return text
    if text.endswith(".db") and "://" not in text:
        path = Path(text).expanduser().resolve()
        if not path.parent.is_dir():
            raise LookalikeError(f"index.uri: {text}: its folder {path.parent} does not exist")
        return str(path)
    raise LookalikeError(f"index.uri: expected a local .db file (Milvus Lite) or http(s)://host:port, got {text!r}")


def check_filter(expression: str | None) -> str:
    """A filter expression bounded in length and free of control characters ('' for none); Milvus parses the rest."""
    if expression is None:
        return ""
    if not isinstance(expression, str):
        raise LookalikeError(f"filter: expected a string expression, got {type(expression).__name__}")
    if len(expression) > MAX_FILTER:
        raise LookalikeError(f"filter: {len(expression)} characters, at most {MAX_FILTER}")
    if any(ord(c) < 32 and c not in "\t" for c in expression):
        raise LookalikeError("filter: control characters are not allowed in a filter expression")
    return expression.strip()


class MilvusGallery:
    """One Milvus collection holding a gallery: id (VARCHAR primary key), vector, path, label, metadata columns."""

    def __init__(self, client: Any, collection: str, dim: int, metric: str, index: str, search_params: dict) -> None:
        self.client, self.collection, self.dim, self.metric = client, collection, dim, metric
        self.index, self.search_params = index, search_params

    @classmethod
    def connect(
        cls,
        uri: str,
        collection: str = "gallery",
        dim: int | None = None,
        metric: str = "cosine",
        index: str = "FLAT",
        params: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> MilvusGallery:
        """The collection at `uri`, created when absent (then `dim` is needed); an existing one must match dim/metric.

        Args:
            uri: a local .db file (Milvus Lite, started in this process) or http(s)://host:port of a server.
            collection: the collection's name (letters, digits, underscores).
            dim: the vectors' length; None reads it from an existing collection.
            metric: cosine or euclidean (distances as in exact search: 1 - cos, or the L2 distance).
            index: FLAT (exact, the default), HNSW or IVF_FLAT.
            params: build and search parameters overriding the defaults (M, efConstruction, ef, nlist, nprobe).
            timeout: seconds to wait for the server.

        Returns:
            The gallery, loaded and ready to search.
        """
        if metric not in METRICS:
            raise LookalikeError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
        if index not in INDEX_PARAMS:
            raise LookalikeError(f"index.type: expected one of {', '.join(INDEX_PARAMS)}, got {index!r}")
        if not isinstance(collection, str) or not FIELD_NAME.fullmatch(collection):
            raise LookalikeError(f"index.collection: expected letters, digits and underscores, got {collection!r}")
        build, search = _split_params(index, params or {})
        uri = check_uri(uri)
        pymilvus = _milvus()
        try:
            with _quiet():
                client = pymilvus.MilvusClient(uri=uri, timeout=timeout, **_channel_options(uri))
                if client.has_collection(collection):
                    dim = _check_existing(client, collection, dim, metric)
                    client.load_collection(collection)
                else:
                    _create(client, collection, dim, metric, index, build)
        except pymilvus.exceptions.MilvusException as exc:
            raise LookalikeError(
                f"index.uri: Milvus at {uri} refused collection {collection!r}: {_reason(exc)}{_lite_hint(exc)}"
            ) from None
        return cls(client, collection, int(dim), metric, index, search)

    def count(self) -> int:
        """The number of vectors in the collection (deleted ones not counted)."""
        with _quiet():
            rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def add(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        paths: Sequence[str] | None = None,
        labels: Sequence[Any] | None = None,
        metadata: Mapping[str, Sequence[Any]] | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Upsert vectors with their fields in batches under Milvus's request limit; re-adding an id replaces it.

        Args:
            ids: one unique id per vector (e.g. the image's path).
            vectors: float [N, D].
            paths: the images' paths (default: the ids).
            labels: the items' labels, stored as text (default: empty).
            metadata: scalar columns (name -> N values: str, int, float or bool; None/NaN left out), searchable with
                filter expressions such as `category == "shoes"`.
            progress: wraps the loop over batches (progress lines on long inserts).

        Returns:
            The number of vectors written.
        """
        ids = _texts(ids, "ids")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(ids), self.dim):
            raise LookalikeError(f"add: vectors {vectors.shape}, expected [{len(ids)}, {self.dim}] (one per id)")
        if not np.isfinite(vectors).all():
            row = int(np.flatnonzero(~np.isfinite(vectors).all(1))[0])
            raise LookalikeError(f"add: vector of id {ids[row]!r} (row {row}) holds NaN or inf")
        _check_unique(ids)
        paths = ids if paths is None else _texts(paths, "paths", len(ids))
        labels = [""] * len(ids) if labels is None else _texts(labels, "labels", len(ids))
        columns = _metadata_columns(metadata or {}, len(ids))
        step = max(1, BATCH_BYTES // (4 * self.dim + 256))
        batches = range(0, len(ids), step)
        for start in progress(batches, len(batches)) if progress else batches:
            stop = min(start + step, len(ids))
            rows = [
                {"id": ids[i], "vector": vectors[i], "path": paths[i], "label": labels[i], **_row(columns, i)}
                for i in range(start, stop)
            ]
            self._call("add", self.client.upsert, self.collection, rows)
        return len(ids)

    def remove(self, ids: Sequence[str]) -> None:
        """Delete the vectors of these ids (unknown ids are ignored)."""
        ids = _texts(ids, "ids")
        for start in range(0, len(ids), GET_BATCH):
            self._call("remove", self.client.delete, self.collection, ids=ids[start : start + GET_BATCH])

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors [N, D] of these ids, in their order (what re-rankers need of the candidates).

        Args:
            ids: ids present in the collection.

        Returns:
            float32 [N, D]; an unknown id is a one-line error.
        """
        ids = _texts(ids, "ids")
        out = np.empty((len(ids), self.dim), np.float32)
        unique = list(dict.fromkeys(ids))
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(unique), GET_BATCH):
            rows = self._call(
                "vectors",
                self.client.get,
                self.collection,
                ids=unique[start : start + GET_BATCH],
                output_fields=["vector"],
            )
            found.update((row["id"], row["vector"]) for row in rows)
        missing = [i for i in unique if i not in found]
        if missing:
            raise LookalikeError(
                f"vectors: no vector for id {missing[0]!r} ({len(missing)} missing) in {self.collection}"
            )
        for row, name in enumerate(ids):
            out[row] = found[name]
        return out

    def present(self, ids: Sequence[str]) -> set[str]:
        """Which of these ids the collection holds."""
        ids = _texts(ids, "ids")
        found: set[str] = set()
        for start in range(0, len(ids), GET_BATCH):
            batch = ids[start : start + GET_BATCH]
            rows = self._call("present", self.client.get, self.collection, ids=batch, output_fields=["id"])
            found.update(row["id"] for row in rows)
        return found

    def records(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Path, label and metadata of these ids, in their order (what a page shows beside a result)."""
        ids = _texts(ids, "ids")
        found: dict[str, dict] = {}
        for start in range(0, len(ids), GET_BATCH):
            rows = self._call("records", self.client.get, self.collection, ids=ids[start : start + GET_BATCH])
            found.update((row["id"], {k: v for k, v in row.items() if k not in ("vector", "$meta")}) for row in rows)
        return [found.get(name, {"id": name}) for name in ids]

    def search(
        self, queries: np.ndarray, k: int, filter: str | None = None, query_ids: Sequence[str] | None = None
    ) -> RetrievalResults:
        """The top-k gallery items of every query among those passing `filter`, as RetrievalResults.

        Args:
            queries: float [Q, D].
            k: items per query (at most 16384, Milvus's limit); rows with fewer matches are padded (PAD, inf).
            filter: a Milvus boolean expression over the fields and metadata, e.g. `category == "shoes"`; untrusted
                input, bounded in length and passed only as Milvus's filter parameter. A bad one is a one-line error.
            query_ids: the queries' ids (default: their row numbers).

        Returns:
            Results whose gallery ids are the ids of the candidates found (sorted), distances ascending in the
            metric's convention (cosine: 1 - cos; euclidean: L2), equal distances in gallery-id order.
        """
        expression = check_filter(filter)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise LookalikeError(f"search: queries {q.shape} must be [Q, {self.dim}]")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise LookalikeError(f"search.k: expected an integer in [1, {MAX_K}] (Milvus's limit), got {k!r}")
        hits = []
        for start in range(0, len(q), QUERY_BATCH):
            hits.extend(self._search_batch(q[start : start + QUERY_BATCH], int(k), expression))
        qids = np.arange(len(q)).astype(str) if query_ids is None else np.asarray(query_ids).astype(str)
        meta = {"metric": self.metric, "k": int(k), "backend": "milvus", "index": self.index, "filter": expression}
        return _to_results(hits, int(k), self.metric, qids, meta)

    def drop(self) -> None:
        """Delete the whole collection."""
        self._call("drop", self.client.drop_collection, self.collection)

    def close(self) -> None:
        """Close the connection (a Milvus Lite server stops with its last client)."""
        self.client.close()

    def _search_batch(self, q: np.ndarray, k: int, expression: str) -> list:
        """One search request; a filter Milvus cannot parse or evaluate is one line naming it."""
        pymilvus = _milvus()
        params = {"metric_type": METRICS[self.metric], "params": dict(self.search_params)}
        try:
            with _quiet():
                return self.client.search(
                    self.collection, data=list(q), limit=k, filter=expression, output_fields=[], search_params=params
                )
        except pymilvus.exceptions.MilvusException as exc:
            if expression:
                raise LookalikeError(f"filter: Milvus cannot use {expression!r}: {_reason(exc)}") from None
            raise LookalikeError(f"search: Milvus refused the search of {self.collection}: {_reason(exc)}") from None

    def _call(self, what: str, method, *args, **kwargs):
        """A pymilvus call whose failure is a one-line error naming the operation and collection."""
        pymilvus = _milvus()
        try:
            with _quiet():
                return method(*args, **kwargs)
        except pymilvus.exceptions.MilvusException as exc:
            raise LookalikeError(f"{what}: Milvus refused it for {self.collection}: {_reason(exc)}") from None


def _lite_hint(exc: Exception) -> str:
    """Why Milvus Lite may not open a file: one process at a time holds it (e.g. `lookalike serve` of it)."""
    if _reason(exc) != LITE_LOCKED:
        return ""
    return " (a Milvus Lite file opens in one process at a time: is another process, e.g. `lookalike serve`, using it?)"


def _channel_options(uri: str) -> dict:
    """No keepalive pings to an in-process Milvus Lite: its gRPC server answers an idle client's pings every 10 s
    (pymilvus's default) with GOAWAY too_many_pings, which gRPC's C core prints on stderr after about a minute idle.
    A remote server keeps pymilvus's defaults."""
    if uri.startswith(("http://", "https://")):
        return {}
    return {"grpc_options": {"grpc.keepalive_time_ms": 2**31 - 1, "grpc.keepalive_permit_without_calls": False}}


def _split_params(index: str, params: Mapping[str, Any]) -> tuple[dict, dict]:
    """Build and search parameters of `index`: the defaults, overridden by `params`; an unknown name is one line."""
    build, search = dict(INDEX_PARAMS[index]), dict(SEARCH_PARAMS[index])
    for name, value in params.items():
        if name in build:
            build[name] = value
        elif name in search:
            search[name] = value
        else:
            known = ", ".join([*build, *search]) or "none"
            raise LookalikeError(f"index.params: {index} has no parameter {name!r} (it takes {known})")
    return build, search


def _create(client: Any, collection: str, dim: int | None, metric: str, index: str, build: dict) -> None:
    """A new collection: VARCHAR id as primary key, the vector, path, label, and a dynamic field for metadata."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise LookalikeError(
            f"index: collection {collection!r} does not exist; creating it needs dim >= 1, got {dim!r}"
        )
    data_type = _milvus().DataType
    schema = client.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field("id", data_type.VARCHAR, is_primary=True, max_length=MAX_TEXT)
    schema.add_field("vector", data_type.FLOAT_VECTOR, dim=int(dim))
    schema.add_field("path", data_type.VARCHAR, max_length=MAX_TEXT)
    schema.add_field("label", data_type.VARCHAR, max_length=MAX_TEXT)
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="vector", index_type=index, metric_type=METRICS[metric], params=build)
    client.create_collection(collection, schema=schema, index_params=index_params)


def _check_existing(client: Any, collection: str, dim: int | None, metric: str) -> int:
    """The dimension of an existing collection, which must hold these vectors under this metric."""
    fields = client.describe_collection(collection)["fields"]
    vector = next((f for f in fields if f["name"] == "vector"), None)
    if vector is None:
        raise LookalikeError(f"index: collection {collection!r} has no 'vector' field (not written by lookalike)")
    found = int(vector["params"]["dim"])
    if dim is not None and int(dim) != found:
        raise LookalikeError(f"index: collection {collection!r} holds {found}-d vectors, not {dim}-d")
    metric_type = client.describe_index(collection, "vector").get("metric_type")
    if metric_type and metric_type != METRICS[metric]:
        raise LookalikeError(f"index: collection {collection!r} is indexed for {metric_type}, not {metric}")
    return found


def _texts(values: Sequence[Any], name: str, n: int | None = None) -> list[str]:
    """Values as a list of non-empty strings of bounded length (n of them when given)."""
    texts = [str(v) for v in np.asarray(values, dtype=object).reshape(-1)]
    if n is not None and len(texts) != n:
        raise LookalikeError(f"add: {len(texts)} {name}, expected {n} (one per vector)")
    long = next((i for i, t in enumerate(texts) if len(t.encode("utf-8", "surrogateescape")) > MAX_TEXT), None)
    if long is not None:
        raise LookalikeError(f"{name}: row {long} is longer than {MAX_TEXT} bytes")
    if name == "ids" and "" in texts:
        raise LookalikeError(f"ids: row {texts.index('')} is empty")
    return texts


def _check_unique(ids: list[str]) -> None:
    """Each id once per call: Milvus would keep an arbitrary one of the duplicates."""
    if len(set(ids)) < len(ids):
        seen: set[str] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))
        raise LookalikeError(f"ids: {twice!r} is given more than once")


def check_metadata(values: Mapping[str, Any]) -> dict[str, Any]:
    """One item's metadata as a collection stores it: names of letters, digits and underscores other than the
    collection's own fields, values JSON scalars (None for missing); anything else is one line naming the field.

    Args:
        values: field name -> value.

    Returns:
        The checked values (numpy scalars as Python ones).
    """
    columns = _metadata_columns({name: [value] for name, value in values.items()}, 1)
    return {name: column[0] for name, column in columns.items()}


def _metadata_columns(metadata: Mapping[str, Sequence[Any]], n: int) -> dict[str, list]:
    """Metadata columns as lists of JSON scalars (None where missing), checked for names, lengths and types."""
    columns = {}
    for name, values in metadata.items():
        if not isinstance(name, str) or not FIELD_NAME.fullmatch(name) or name in RESERVED:
            raise LookalikeError(
                f"metadata: column {name!r} must be a name of letters, digits and underscores other than "
                f"{', '.join(RESERVED)}"
            )
        values = values.tolist() if isinstance(values, np.ndarray) else list(values)
        column = [_scalar(v, name, row) for row, v in enumerate(values)]
        if len(column) != n:
            raise LookalikeError(f"metadata: column {name!r} has {len(column)} values, expected {n}")
        columns[name] = column
    return columns


def _scalar(value: Any, name: str, row: int) -> Any:
    """A metadata value as a JSON scalar (None for missing); lists, dicts and objects are one-line errors."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (str, bool, int, float)) and not (isinstance(value, float) and math.isinf(value)):
        return value
    raise LookalikeError(
        f"metadata: column {name!r} row {row}: expected a string, number or bool, got {json.dumps(repr(value))}"
    )


def _row(columns: dict[str, list], i: int) -> dict[str, Any]:
    """Row i's metadata, missing values left out (a filter on them is then false)."""
    return {name: values[i] for name, values in columns.items() if values[i] is not None}


def _to_results(hits: list, k: int, metric: str, query_ids: np.ndarray, meta: dict) -> RetrievalResults:
    """RetrievalResults over the sorted unique candidate ids from Milvus hits; distances in the project's convention."""
    names = [[hit["id"] for hit in row] for row in hits]
    scores = [[hit["distance"] for hit in row] for row in hits]
    gallery_ids = np.unique(np.asarray([n for row in names for n in row], dtype=object).astype(str))
    index = np.full((len(hits), k), PAD, np.int64)
    raw = np.full((len(hits), k), np.nan, np.float64)
    for r, (row_names, row_scores) in enumerate(zip(names, scores)):
        if row_names:
            index[r, : len(row_names)] = np.searchsorted(gallery_ids, np.asarray(row_names, dtype=str))
            raw[r, : len(row_scores)] = row_scores
    if metric == "cosine":  # Milvus's COSINE is the similarity
        dist = 1.0 - raw
    else:  # Milvus's L2 is the squared distance
        dist = np.sqrt(np.maximum(raw, 0.0))
    dist = np.where(index == PAD, np.inf, dist).astype(np.float32)
    index, dist = order_by_distance(index, dist)
    return RetrievalResults(index, dist, query_ids, gallery_ids, meta)
