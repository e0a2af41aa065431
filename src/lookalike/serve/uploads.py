"""Checks on an uploaded query image: size in bytes, size in pixels (before decoding), that it is an image at all."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from lookalike.data.decode import upright_rgb
from lookalike.errors import LookalikeError


class UploadRejected(LookalikeError):
    """An upload the app refuses, with the HTTP status that says why (400, 413 or 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """The uploaded bytes as an RGB image (EXIF rotation applied), or UploadRejected naming what is wrong."""
    if not data:
        raise UploadRejected(400, "upload: the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise UploadRejected(413, f"upload: {len(data):,} bytes is more than the limit of {max_bytes:,} bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise UploadRejected(415, "upload: not an image (expected a JPEG, PNG, WebP, GIF, BMP or TIFF file)") from None
        width, height = image.size
        if width * height > max_pixels:
            raise UploadRejected(413, f"upload: {width}x{height} = {width * height:,} pixels is more than the limit of {max_pixels:,}")
        try:
            image.load()
            return upright_rgb(image)  # as gallery images are read, so an upload embeds like the same file in the gallery
        except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, struct.error, ... on bad files
            raise UploadRejected(400, f"upload: the image cannot be decoded ({exc})") from None
