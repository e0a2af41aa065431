"""The web app: a FastAPI JSON API over a GalleryIndex and the small HTML/JS page that uses it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel

from lookalike import __version__
from lookalike.errors import LookalikeError
from lookalike.serve.index import Column, GalleryIndex
from lookalike.serve.uploads import UploadRejected, decode_upload

STATIC = Path(__file__).with_name("static")
MAX_K = 100
FORM_OVERHEAD = 1 << 16  # multipart framing and the other fields, on top of the image's own limit


class Health(BaseModel):
    status: str
    gallery_size: int
    model: str
    metric: str
    index: str
    rerankers: list[str]
    max_k: int
    max_upload_bytes: int


class Item(BaseModel):
    id: int  # gallery id: the item's position in the gallery; GET /image/{id} shows it
    label: str
    distance: float
    rank_change: int | None  # original rank - this rank (positive: moved up); null: not in the original candidates


class Ranking(BaseModel):
    name: str  # "original" or the re-ranker's column name
    items: list[Item]


class SearchResponse(BaseModel):
    query_gallery_id: int | None  # the gallery item used as the query, or null for an upload
    query_label: str | None
    k: int
    columns: list[Ranking]


def create_app(index: GalleryIndex) -> FastAPI:
    """The app over one loaded index: GET / (the page), GET /health, GET /image/{id}, POST /search."""
    serve = index.settings["serve"]
    max_bytes = int(serve["max_upload_mb"] * 1_000_000)
    app = FastAPI(title="lookalike", version=__version__, description="Search an image gallery and compare re-rankers side by side.")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        """Refuse a request body that announces itself as too large before reading it."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_bytes + FORM_OVERHEAD:
            return JSONResponse({"detail": f"upload: {int(length):,} bytes is more than the limit of {max_bytes:,} bytes"}, 413)
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", response_model=Health)
    def health() -> Health:
        """Liveness, and what this index offers."""
        return Health(status="ok", gallery_size=len(index), model=index.settings["model"]["name"], metric=index.metric,
                      index=index.settings["search"]["index"], rerankers=list(index.rerankers), max_k=MAX_K, max_upload_bytes=max_bytes)

    @app.get("/image/{gallery_id}", responses={200: {"content": {"image/png": {}}}, 404: {}})
    def image(gallery_id: Annotated[int, PathParam(ge=0, description="a gallery id from /search")]) -> Response:
        """A gallery image as a PNG thumbnail; only gallery ids are accepted, never file paths."""
        if gallery_id >= len(index):
            raise HTTPException(404, f"gallery id {gallery_id} does not exist (the gallery has {len(index)} images)")
        return Response(index.thumbnail(gallery_id), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/search", response_model=SearchResponse)
    def search(
        file: Annotated[UploadFile | None, File(description="the query image (or give gallery_id)")] = None,
        gallery_id: Annotated[int | None, Form(ge=0, description="a gallery item as the query")] = None,
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        rerankers: Annotated[list[str], Form(description="re-ranker column names from /health, one field each")] = [],
    ) -> SearchResponse:
        """The original top-k and each chosen re-ranker's top-k, for an uploaded image or a gallery item."""
        if (file is None) == (gallery_id is None):
            raise HTTPException(400, "search: give exactly one of file (an image upload) or gallery_id")
        if gallery_id is not None and gallery_id >= len(index):
            raise HTTPException(404, f"gallery id {gallery_id} does not exist (the gallery has {len(index)} images)")
        names = [n for n in rerankers if n]
        try:
            if file is None:
                columns = index.search(index.gallery.vectors[gallery_id], k, names, gallery_position=gallery_id)
            else:
                image = decode_upload(file.file.read(max_bytes + 1), max_bytes, int(serve["max_pixels"]))
                with saved_image(image) if index.reads_images(names) else nullcontext() as path:
                    columns = index.search(index.embed(image), k, names, image_path=path)
        except UploadRejected as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except LookalikeError as exc:
            raise HTTPException(400, str(exc)) from None
        return SearchResponse(
            query_gallery_id=gallery_id, query_label=None if gallery_id is None else str(index.labels[gallery_id]), k=k,
            columns=[_ranking(column, index) for column in columns],
        )

    return app


@contextmanager
def saved_image(image: Image.Image) -> Iterator[str]:
    """The decoded upload as a PNG file for re-rankers that read images; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="lookalike-query-") as folder:
        path = os.path.join(folder, "query.png")
        image.save(path)
        yield path


def _ranking(column: Column, index: GalleryIndex) -> Ranking:
    """A column as the API shows it."""
    items = [Item(id=int(p), label=str(index.labels[p]), distance=float(d), rank_change=c)
             for p, d, c in zip(column.positions, column.distances, column.rank_change)]
    return Ranking(name=column.name, items=items)
