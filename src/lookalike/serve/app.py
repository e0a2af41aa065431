"""The web app: a FastAPI JSON API over a GalleryIndex and the small HTML/JS page that uses it."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any, TypeVar

import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.middleware.trustedhost import TrustedHostMiddleware

from lookalike import __version__
from lookalike.core.errors import LookalikeError, printable
from lookalike.search.milvus import MAX_FILTER
from lookalike.serve.admin import add_item_routes
from lookalike.serve.guards import BodyGuard, SecurityHeaders, allowed_hosts, header_deadline_protocol
from lookalike.serve.index import Column, GalleryIndex, IndexBusy, serve_limits
from lookalike.serve.live import LiveIndex
from lookalike.serve.uploads import UploadRejected, decode_upload

STATIC = Path(__file__).with_name("static")
MAX_K = 100
T = TypeVar("T")
FORM_OVERHEAD = 1 << 16  # multipart framing and the other fields, on top of the image's own limit


class Health(BaseModel):
    status: str
    gallery_size: int
    model: str
    runtime: str  # what embeds uploads: torch or onnx (onnxruntime)
    metric: str
    index: str
    backend: str  # where the vectors are searched: faiss (in-process, exact or FAISS) or milvus (filters work)
    rerankers: list[str]
    max_k: int
    max_upload_bytes: int
    generation: int  # the gallery's update generation (0 as built; +1 per add/remove); gallery ids belong to it


class Item(BaseModel):
    id: int  # the item's position in the gallery (GET /image/{id}); changes when the gallery is rebuilt
    external_id: str  # the item's stable id: the table's id column, or its path (GET /image/{external_id})
    path: str  # the image's path relative to the index's images root
    label: str | None  # null in a gallery without labels
    metadata: dict[str, str]  # the table's extra columns
    distance: float
    rank_change: int | None  # original rank - this rank (positive: moved up); null: not in the original candidates


class Ranking(BaseModel):
    name: str  # "original" or the re-ranker's column name
    items: list[Item]


class SearchResponse(BaseModel):
    query_gallery_id: int | None  # the gallery item used as the query, or null for an upload
    query_external_id: str | None  # that item's external id
    query_label: str | None  # its label (null for an upload or a gallery without labels)
    k: int
    columns: list[Ranking]
    gallery_size: int  # the gallery this answer searched (an update between searches changes it)
    generation: int  # its update generation: the ids above are positions in that generation's gallery


def create_app(
    index: GalleryIndex,
    host: str = "127.0.0.1",
    extra_hosts: tuple[str, ...] | list[str] = (),
    admin_token: str | None = None,
) -> FastAPI:
    """The app over one index folder: GET / (the page), GET /health, GET /image/{id}, POST /search; with an
    `admin_token`, also POST /items and DELETE /items/{id} (Authorization: Bearer TOKEN). It answers only Host names of
    allowed_hosts(host, serve.allowed_hosts + extra_hosts); bodies are counted as they arrive; an update of the folder
    is picked up between searches."""
    limits = index.limits
    max_bytes = int(limits.max_upload_mb * 1_000_000)
    live = LiveIndex(index)
    app = FastAPI(
        title="lookalike",
        version=__version__,
        description="Search an image gallery and compare re-rankers side by side.",
        docs_url=None,
        redoc_url=None,
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    worker = SearchWorker(limits.search_timeout)
    app.add_middleware(
        BodyGuard, max_bytes=max_bytes + FORM_OVERHEAD, idle=limits.read_timeout, total=limits.upload_timeout
    )
    hosts = serve_limits(
        {**limits.model_dump(), "allowed_hosts": [*limits.allowed_hosts, *extra_hosts]}, "--allow-host"
    ).allowed_hosts
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host, hosts))
    app.add_middleware(SecurityHeaders)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> RedirectResponse:
        """The API's OpenAPI schema (no Swagger page: it would load its assets from a CDN, blank offline)."""
        return RedirectResponse("/openapi.json")

    @app.get("/health", response_model=Health)
    def health() -> Health:
        """Liveness, and what this index offers."""
        now = live.current()
        return Health(
            status="ok",
            gallery_size=len(now),
            model=now.manifest.model.name,
            runtime=now.runtime,
            metric=now.metric,
            index=now.manifest.search.index,
            backend=now.manifest.backend or "faiss",
            rerankers=list(now.rerankers),
            max_k=MAX_K,
            max_upload_bytes=max_bytes,
            generation=now.generation,
        )

    @app.get("/image/{key:path}", responses={200: {"content": {"image/png": {}}}, 404: {}})
    def image(
        key: Annotated[str, PathParam(description="an external_id, or an id (position), from /search")],
    ) -> Response:
        """A gallery image as a PNG thumbnail, by external id (first) or gallery position; never read as a file path."""
        now = live.current()
        position = item_position(now, key)
        if position is None:
            raise HTTPException(404, f"gallery item {key!r} does not exist (no such external id or position)")
        return Response(now.thumbnail(position), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/search", response_model=SearchResponse)
    async def search(
        file: Annotated[UploadFile | None, File(description="the query image (or give gallery_id)")] = None,
        gallery_id: Annotated[int | None, Form(ge=0, description="a gallery item (position) as the query")] = None,
        query_id: Annotated[str | None, Form(description="a gallery item (external id) as the query")] = None,
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        rerankers: Annotated[list[str], Form(description="re-ranker column names from /health, one field each")] = [],
        filter: Annotated[
            str, Form(max_length=MAX_FILTER, description="a Milvus filter on metadata (index.backend=milvus)")
        ] = "",
    ) -> SearchResponse:
        """The original top-k and each chosen re-ranker's top-k, for an uploaded image or a gallery item."""
        if (file is not None) + (gallery_id is not None) + (query_id is not None) != 1:
            raise HTTPException(400, "search: give exactly one of file (an image upload), gallery_id or query_id")
        names = [n for n in rerankers if n]
        upload = None if file is None else await file.read(max_bytes + 1)
        try:
            query = query_id if query_id is not None else gallery_id
            now, columns = await worker.run(run_search, live, upload, query, k, names, filter)
        except UnknownGalleryId as exc:
            raise HTTPException(404, str(exc)) from None
        except UploadRejected as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except IndexBusy as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
        except LookalikeError as exc:
            raise HTTPException(400, str(exc)) from None
        if query_id is not None:
            gallery_id = now.position_of(query_id)  # found by run_search in this generation
        return SearchResponse(
            query_gallery_id=gallery_id,
            query_external_id=None if gallery_id is None else str(now.ids[gallery_id]),
            query_label=None if gallery_id is None or now.labels is None else str(now.labels[gallery_id]),
            k=k,
            columns=[_ranking(column, now) for column in columns],
            gallery_size=len(now),
            generation=now.generation,
        )

    if admin_token:
        add_item_routes(app, live, admin_token, max_bytes)
    return app


class SearchWorker:
    """One thread decodes, embeds and searches for every request, in arrival order. Searches run one at a time anyway
    (the index's lock); on the server's 40 pool threads each thread kept its own allocator arenas and buffers, and the
    memory rose burst after burst (bench_serve, 5 bursts of 250: RSS 1,059 -> 1,632 MB before, 1,059 -> 1,139 MB
    now)."""

    def __init__(self, timeout: float) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lookalike-search")
        self.timeout = timeout

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """function(*args) on the worker thread; IndexBusy when it waited more than `timeout` seconds to start."""
        queued = time.monotonic()

        def job() -> T:
            waited = time.monotonic() - queued
            if waited > self.timeout:
                raise IndexBusy(
                    f"search: the server is busy (waited {waited:.1f} s for other searches to finish); try again"
                )
            return function(*args)

        return await asyncio.wrap_future(self.pool.submit(job))


class UnknownGalleryId(LookalikeError):
    """A gallery id past the end of the gallery a search took (the app answers 404)."""


def run_search(
    live: LiveIndex, upload: bytes | None, gallery_id: int | str | None, k: int, names: list[str], filter: str = ""
) -> tuple[GalleryIndex, list[Column]]:
    """The gallery as it is now and the columns of one search over it, for an uploaded image's bytes or a gallery
    item (its position, or its external id as a str), among the items passing `filter`."""
    index = live.current()  # the whole search (and its answer) uses this one generation
    if upload is None:
        if isinstance(gallery_id, str):
            external_id, gallery_id = gallery_id, index.position_of(gallery_id)
            if gallery_id is None:
                raise UnknownGalleryId(f"query_id {external_id!r} is not an external id of this gallery")
        if gallery_id >= len(index):
            raise UnknownGalleryId(f"gallery id {gallery_id} does not exist (the gallery has {len(index)} images)")
        return index, index.search(index.vector(gallery_id), k, names, gallery_position=gallery_id, filter=filter)
    limits = index.limits
    image = decode_upload(
        upload, int(limits.max_upload_mb * 1_000_000), limits.max_pixels, limits.max_aspect_ratio, index.short_side
    )
    with saved_image(image) if index.reads_images(names) else nullcontext() as path:
        return index, index.search(index.embed(image), k, names, image_path=path, filter=filter)


def server_config(app: FastAPI, index: GalleryIndex, host: str, port: int) -> uvicorn.Config:
    """uvicorn's settings for `lookalike serve`: request headers and idle keep-alive connections time out after
    serve.read_timeout, so stalled clients are closed."""
    timeout = index.limits.read_timeout
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=header_deadline_protocol(timeout),
        timeout_keep_alive=max(1, int(timeout)),
    )


@contextmanager
def saved_image(image: Image.Image) -> Iterator[str]:
    """The decoded upload as a PNG file for re-rankers that read images; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="lookalike-query-") as folder:
        path = os.path.join(folder, "query.png")
        image.save(path)
        yield path


def item_position(index: GalleryIndex, key: str) -> int | None:
    """The gallery position a /image key names: an external id, else a position given as digits; None for neither."""
    position = index.position_of(key)
    if position is None and key.isascii() and key.isdigit() and int(key) < len(index):
        position = int(key)
    return position


def _ranking(column: Column, index: GalleryIndex) -> Ranking:
    """A column as the API shows it: each item's position, external id, path, label and metadata."""
    described = index.describe(column.positions)
    labels = described["label"] if "label" in described.columns else [None] * len(described)
    metadata = described[index.metadata.columns].to_dict("records")
    items = [
        Item(
            id=int(p),
            external_id=printable(i),  # a name that is not UTF-8 shown with \x escapes: JSON holds only UTF-8
            path=printable(path),
            label=label,
            metadata=m,
            distance=float(d),
            rank_change=c,
        )
        for p, i, path, label, m, d, c in zip(
            column.positions, described["id"], described["path"], labels, metadata, column.distances, column.rank_change
        )
    ]
    return Ranking(name=column.name, items=items)
