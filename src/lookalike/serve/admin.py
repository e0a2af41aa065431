"""The web API's write routes, POST /items and DELETE /items/{id}: they exist only when `lookalike serve` is given an
admin token, and answer 401 to a request without it (Authorization: Bearer TOKEN, compared in constant time). An
uploaded item is bounded and decoded like a /search upload, stored in the index folder's items/ and added with
lookalike.serve.update (atomic; the searches switch to it between two searches)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Annotated

import pandas as pd
from fastapi import FastAPI, File, Form, Header, HTTPException, UploadFile
from fastapi import Path as PathParam
from pydantic import BaseModel

from lookalike.core.atomic import atomic_path
from lookalike.core.errors import LookalikeError
from lookalike.search.milvus import check_metadata
from lookalike.serve.live import LiveIndex
from lookalike.serve.milvus_backend import NOT_METADATA
from lookalike.serve.update import NewItems, UnknownId, UpdateReport, add_items, remove_items
from lookalike.serve.uploads import UploadRejected, decode_upload

ITEMS_FOLDER = "items"  # uploaded gallery images, inside the index folder, named by the sha256 of their bytes
MAX_METADATA = 4096  # characters of an added item's metadata (a JSON object)


class ItemChange(BaseModel):
    id: str  # the item's external id
    added: int
    replaced: int
    removed: int
    gallery_size: int
    generation: int


def authorized(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries `Bearer <token>` (constant-time comparison of the token)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def add_item_routes(app: FastAPI, live: LiveIndex, token: str, max_bytes: int) -> None:
    """Register POST /items and DELETE /items/{item_id} on `app`, guarded by `token`."""
    if live.index.folder is None:
        raise LookalikeError("--admin-token: items can be added only to an index loaded from its folder")

    def check(authorization: str | None) -> None:
        if not authorized(authorization, token):
            raise HTTPException(401, "items: missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"})

    @app.post("/items", response_model=ItemChange)
    async def add_item(
        file: Annotated[UploadFile, File(description="the image to add to the gallery")],
        id: Annotated[
            str, Form(min_length=1, max_length=1000, description="the item's id; an existing id is replaced")
        ],
        label: Annotated[str, Form(max_length=1000, description="only for a gallery with labels")] = "",
        metadata: Annotated[
            str, Form(description='a JSON object of scalar values, e.g. {"color": "red", "price": 12}')
        ] = "",
        authorization: Annotated[str | None, Header()] = None,
    ) -> ItemChange:
        """Add one image to the gallery (admin token); re-adding an id replaces its item."""
        check(authorization)
        data = await file.read(max_bytes + 1)
        try:
            fields = parse_metadata(metadata)
            report = await asyncio.to_thread(store_and_add, live, data, id, label, max_bytes, fields)
        except UploadRejected as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except LookalikeError as exc:
            raise HTTPException(400, str(exc)) from None
        return _change(id, report)

    @app.delete("/items/{item_id:path}", response_model=ItemChange)
    async def delete_item(
        item_id: Annotated[str, PathParam(description="the item's id")],
        authorization: Annotated[str | None, Header()] = None,
    ) -> ItemChange:
        """Remove one item from the gallery (admin token)."""
        check(authorization)
        try:
            report = await asyncio.to_thread(remove_items, live.index.folder, [item_id])
        except UnknownId as exc:
            raise HTTPException(404, str(exc)) from None
        except LookalikeError as exc:
            raise HTTPException(400, str(exc)) from None
        return _change(item_id, report)


def parse_metadata(text: str) -> pd.DataFrame | None:
    """An added item's `metadata` form field (a bounded JSON object of scalars, named as Milvus metadata and not as a
    table column) as one gallery.csv row of text cells; None when empty. A bad one is one line.

    Args:
        text: the form field's value.

    Returns:
        A one-row DataFrame of the metadata columns, or None.
    """
    if not text.strip():
        return None
    if len(text) > MAX_METADATA:
        raise LookalikeError(f"metadata: {len(text)} characters, at most {MAX_METADATA}")
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    if not isinstance(values, dict):
        raise LookalikeError('metadata: expected a JSON object of scalar values, e.g. {"color": "red", "price": 12}')
    taken = [name for name in values if name in NOT_METADATA]
    if taken:
        raise LookalikeError(f"metadata: {taken[0]!r} is a gallery table column, not a metadata name")
    checked = check_metadata(values)
    return pd.DataFrame({name: [_cell(value)] for name, value in checked.items()})


def _cell(value: object) -> str:
    """A metadata value as gallery.csv holds it (text; booleans true/false, missing empty)."""
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def store_and_add(
    live: LiveIndex, data: bytes, item_id: str, label: str, max_bytes: int, metadata: pd.DataFrame | None = None
) -> UpdateReport:
    """Decode an upload (bounded like /search), save it as PNG under items/, embed it and add it to the folder with
    its label (a labelled gallery only) and metadata."""
    index = live.current()
    if label and index.labels is None:
        raise LookalikeError("label: this gallery has no labels; add the item without one (or in its metadata)")
    limits = index.limits
    image = decode_upload(data, max_bytes, limits.max_pixels, limits.max_aspect_ratio, index.short_side)
    target = index.folder / ITEMS_FOLDER / f"{hashlib.sha256(data).hexdigest()}.png"
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG")
    vector = index.embed(image)[None]
    path = str(target.resolve())
    labels = None if index.labels is None else [label]
    return add_items(index.folder, NewItems([item_id], [path], vector, labels, metadata))


def _change(item_id: str, report: UpdateReport) -> ItemChange:
    """An update's report as the API shows it."""
    return ItemChange(
        id=item_id,
        added=report.added,
        replaced=report.replaced,
        removed=report.removed,
        gallery_size=report.size,
        generation=report.generation,
    )
