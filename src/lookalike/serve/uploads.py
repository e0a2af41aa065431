"""Checks on an uploaded query image: size in bytes, then, from the header before decoding, its pixels, its aspect
ratio and the pixels the index's resize would make of it; then that it decodes at all."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from lookalike.core.errors import LookalikeError
from lookalike.data.decode import upright_rgb


class UploadRejected(LookalikeError):
    """An upload the app refuses, with the HTTP status that says why (400, 413 or 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(
    data: bytes, max_bytes: int, max_pixels: int, max_aspect_ratio: float = 20.0, short_side: int | None = None
) -> Image.Image:
    """The uploaded bytes as an RGB image (EXIF rotation applied), or UploadRejected naming what is wrong.
    `short_side`: the side the index resizes an image's shorter side to, so that the resized size is bounded too."""
    if not data:
        raise UploadRejected(400, "upload: the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise UploadRejected(413, f"upload: {len(data):,} bytes is more than the limit of {max_bytes:,} bytes")
    image = _open_header(data, max_pixels)
    check_size(image.size, max_pixels, max_aspect_ratio, short_side)
    try:
        image.load()
        return upright_rgb(image)  # as gallery images are read, so an upload embeds like the same file in the gallery
    except Image.DecompressionBombError:
        raise UploadRejected(413, f"upload: a frame has more pixels than the limit of {max_pixels:,}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, struct.error, ... on bad files
        raise UploadRejected(400, f"upload: the image cannot be decoded ({exc})") from None


def _open_header(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read; Pillow's own bomb guard answers 413 like ours, not 'not an image'."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_size applies the (lower) limit
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            bomb = 2 * (Image.MAX_IMAGE_PIXELS or 0)
            raise UploadRejected(
                413, f"upload: more than {bomb:,} pixels, more than the limit of {max_pixels:,}"
            ) from None
        except UnidentifiedImageError:
            raise UploadRejected(
                415, "upload: not an image (expected a JPEG, PNG, WebP, GIF, BMP or TIFF file)"
            ) from None
        except Exception as exc:  # noqa: BLE001 - a recognised but broken header
            raise UploadRejected(400, f"upload: the image cannot be decoded ({exc})") from None


def check_size(size: tuple[int, int], max_pixels: int, max_aspect_ratio: float, short_side: int | None = None) -> None:
    """UploadRejected (413) when an image of `size` (width, height) has too many pixels, is too elongated, or would be
    resized (shorter side to `short_side`, the aspect kept) to more than max_pixels."""
    width, height = size
    if min(width, height) < 1:
        raise UploadRejected(400, f"upload: the image cannot be decoded ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise UploadRejected(
            413, f"upload: {width}x{height} = {width * height:,} pixels is more than the limit of {max_pixels:,}"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise UploadRejected(
            413,
            f"upload: {width}x{height} has an aspect ratio of {ratio:,.1f}, more than the limit of "
            f"{max_aspect_ratio:g}",
        )
    if short_side is not None:
        long_side = int(short_side * max(width, height) / min(width, height))
        if short_side * long_side > max_pixels:
            raise UploadRejected(
                413,
                f"upload: {width}x{height} would be resized to {short_side}x{long_side} = "
                f"{short_side * long_side:,} pixels, more than the limit of {max_pixels:,}",
            )
