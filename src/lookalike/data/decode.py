"""Decoding image files safely: errors named by file, EXIF rotation, any mode to 8-bit RGB, bbox clipped to the image.

Pillow only (no torch), so that commands which merely check images (`lookalike convert`) start fast.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lookalike.core.errors import ImageError, printable

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def display_path(path: str | os.PathLike) -> str:
    """A path as printable text: bytes of a non-UTF-8 file name shown as \\x escapes."""
    return printable(os.fspath(path))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can decode"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels ({exc})"
    return f"truncated or corrupt ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"


@contextlib.contextmanager
def decoding(path: str | os.PathLike) -> Iterator[None]:
    """Turn Pillow's decoding failures inside the block into one LookalikeError naming the file."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, struct.error, ... on bad files
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        reason = f"cannot read image ({'empty file' if empty else _describe(exc)})"
        raise ImageError(f"{display_path(path)}: {reason}", reason) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: transparency over white, 16-bit and float grey scaled to 8 bits, CMYK/palette/grey
    converted."""
    if img.mode == "RGB":
        return img
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_grey_to_uint8(np.asarray(img), img.mode)).convert("RGB")
    return img.convert("RGB")


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (and 32-bit integer) grey divided by 257; float grey in [0, 1] scaled, otherwise clipped to [0, 255]."""
    values = values.astype(np.float64)
    if mode == "F":
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
    else:
        scale = 1.0 / 257.0 if mode.startswith("I;16") or np.max(values, initial=0) > 255 else 1.0
    return np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)


def clip_box(
    bbox: np.ndarray, size: tuple[int, int], path: str | os.PathLike
) -> tuple[float, float, float, float] | None:
    """The bbox (x_1, y_1, x_2, y_2) clipped to the image; None when it has no box (NaN); an error when it misses the
    image."""
    box = np.asarray(bbox, dtype=float)
    if np.isnan(box).any():
        return None
    width, height = size
    x1, y1, x2, y2 = np.clip(box, 0, [width, height, width, height]).tolist()
    if x2 <= x1 or y2 <= y1:
        reason = (
            f"bbox (x_1, y_1, x_2, y_2) = {box.tolist()} lies outside the {width}x{height} image; fix or drop its row"
        )
        raise ImageError(f"{display_path(path)}: {reason}", reason)
    return x1, y1, x2, y2


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright); an unreadable EXIF block counts as upright, the pixels being fine."""
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF raises many types
        return 1


def upright_rgb(img: Image.Image) -> Image.Image:
    """A loaded image turned upright (EXIF rotation) and converted to 8-bit RGB: the one conversion every image gets."""
    return to_rgb(ImageOps.exif_transpose(img) if _orientation(img) != 1 else img)


def read_image(path: str | os.PathLike, bbox: np.ndarray | None = None) -> Image.Image:
    """Open an image upright (EXIF rotation applied) as 8-bit RGB, cropped to the bbox clipped to the image."""
    with decoding(path), Image.open(path) as img:
        img.load()
        img = upright_rgb(img)
    box = clip_box(bbox, img.size, path) if bbox is not None else None
    return img.crop(box) if box is not None else img


def verify_image(path: str | os.PathLike, bbox: np.ndarray | None = None) -> None:
    """Decode an image cheaply (JPEGs at reduced scale) and check its bbox overlaps it; ImageError naming the file
    otherwise."""
    with decoding(path), Image.open(path) as img:
        size = img.size
        transposed = _orientation(img) in (5, 6, 7, 8)  # rotated by 90 degrees: width and height swap
        img.draft("RGB", (64, 64))
        img.load()
    if bbox is not None:
        clip_box(bbox, size[::-1] if transposed else size, path)
