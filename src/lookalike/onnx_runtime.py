"""Embedding with an exported ONNX extractor: Pillow + numpy preprocessing and onnxruntime, no torch, timm or Lightning.

The preprocessing repeats `lookalike.data.images.eval_transform` bit for bit on 8-bit RGB images: torchvision resizes a
uint8 image with antialiased bilinear weights rounded to int16 fixed point (horizontal pass, rounded to uint8, then the
vertical pass), which `resize_uint8` computes the same way; then the centre crop, scaling to [0, 1] and normalising.
The settings come from the JSON sidecar that `lookalike.export.export_onnx` writes next to the .onnx file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.data.decode import read_image, upright_rgb

SIDECAR_SUFFIX = ".preprocessing.json"  # model.onnx -> model.preprocessing.json
SIDECAR_FORMAT = 1
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
ImageSource = str | os.PathLike | Image.Image  # as lookalike.data.images.ImageSource, without importing torch


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """The preprocessing JSON written beside an .onnx file."""
    path = Path(model_path)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def read_sidecar(model_path: str | os.PathLike) -> dict:
    """The preprocessing settings of an exported model; a missing or foreign sidecar is one error naming it."""
    path = sidecar_path(model_path)
    if not path.is_file():
        raise LookalikeError(f"{path}: missing (the preprocessing that `lookalike export` writes beside {model_path})")
    try:
        settings = json.loads(path.read_text())
    except ValueError as exc:
        raise LookalikeError(f"{path}: not valid JSON ({exc}); export the model again") from None
    if not isinstance(settings, dict) or settings.get("format") != SIDECAR_FORMAT:
        found = settings.get("format") if isinstance(settings, dict) else type(settings).__name__
        raise LookalikeError(f"{path}: format {found!r}, expected {SIDECAR_FORMAT}")
    return settings


def _aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, int]:
    """Antialiased bilinear weights [out, in] as torch rounds them for uint8 (int16 fixed point), and the precision."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(out_size) + 0.5)
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    j = np.arange(in_size)[None, :]
    inside = (j >= xmin[:, None]) & (j < xmax[:, None])
    dist = np.abs((j - centers[:, None] + 0.5) * invscale)
    weights = np.where(inside & (dist < 1.0), 1.0 - dist, 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    precision = 0
    while precision < 22 and int(0.5 + weights.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    fixed = np.where(
        weights < 0, np.trunc(-0.5 + weights * (1 << precision)), np.trunc(0.5 + weights * (1 << precision))
    )
    return fixed, precision


def _resize_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass of resize_uint8 along `axis` (0: height, 1: width) of an [H, W, C] uint8 array."""
    in_size = image.shape[axis]
    if in_size == out_size:
        return image
    fixed, precision = _aa_weights(in_size, out_size)
    moved = np.moveaxis(image, axis, -1).astype(np.float64)  # integer sums below 2^53: float64 is exact
    acc = moved @ fixed.T + (1 << (precision - 1))
    out = np.clip(np.floor(acc / (1 << precision)), 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An [H, W, C] uint8 image resized to [height, width] as torchvision's antialiased bilinear Resize does."""
    return _resize_axis(_resize_axis(image, width, 1), height, 0)


def resized_size(height: int, width: int, image_size: int | list[int], crop_fraction: float) -> tuple[int, int]:
    """The (height, width) the transform resizes to: short side image_size / crop_fraction, or exactly [h, w]."""
    if not isinstance(image_size, int):
        return int(image_size[0]), int(image_size[1])
    side = int(round(image_size / crop_fraction))
    if width <= height:
        return int(side * height / width), side
    return side, int(side * width / height)


def preprocess(image: Image.Image, settings: dict) -> np.ndarray:
    """One RGB image as the model's float32 input [3, H, W] (resize, centre crop, scale, normalise, RGB order)."""
    pixels = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    size = settings["image_size"]
    pixels = resize_uint8(pixels, *resized_size(*pixels.shape[:2], size, settings["crop_fraction"]))
    if isinstance(size, int):
        height, width = pixels.shape[:2]
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        pixels = pixels[top : top + size, left : left + size]
    scaled = pixels.astype(np.float32) / np.float32(255.0)
    mean, std = np.asarray(settings["mean"], np.float32), np.asarray(settings["std"], np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1))


class OnnxExtractor:
    """An exported extractor run by onnxruntime (CPU): embeds images as `Extractor.embed` does, without torch.

    Args:
        path: the .onnx file written by `lookalike export` (its `.preprocessing.json` beside it).
        threads: onnxruntime intra-op threads (0: its default, one per core).

    Example:
        >>> from lookalike.onnx_runtime import OnnxExtractor
        >>> OnnxExtractor("runs/export/model.onnx").embed("query.png").vectors.shape  # doctest: +SKIP
        (1, 512)
    """

    def __init__(self, path: str | os.PathLike, threads: int = 0) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise LookalikeError(
                f"{path}: running an ONNX model needs onnxruntime: pip install 'lookalike[onnx]'"
            ) from None
        self.path = Path(path)
        self.settings = read_sidecar(self.path)
        if self.settings.get("kind") != "extractor":
            raise LookalikeError(f"{self.path}: a {self.settings.get('kind')!r} model, expected an extractor")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001  onnxruntime raises its own types for a missing or foreign file
            raise LookalikeError(
                f"{self.path}: not an ONNX model onnxruntime can load ({exc.__class__.__name__})"
            ) from None
        self.dim = int(self.settings["embedding_dim"])
        self.name = self.settings["model"]["name"]
        self.normalize = bool(self.settings["normalize"])

    def transform(self, image: Image.Image) -> np.ndarray:
        """The model input [3, H, W] of one RGB image."""
        return preprocess(image, self.settings)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings [B, D] float32 of a preprocessed batch [B, 3, H, W]."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, np.float32)})[0]

    def embed(self, images: ImageSource | Sequence[ImageSource], batch_size: int = 64) -> Embeddings:
        """Embed image files or PIL images, in batches.

        Args:
            images: one image file or PIL image, or a sequence of them.
            batch_size: images per onnxruntime call.

        Returns:
            Embeddings [N, D] float32 in input order; ids are the files' paths or `image{i}`.
        """
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        if not items:
            raise LookalikeError("embed: expected at least one image, got an empty sequence")
        out = np.empty((len(items), self.dim), dtype=np.float32)
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            out[start : start + len(chunk)] = self.run(np.stack([self.transform(_rgb(item)) for item in chunk]))
        ids = [_image_id(item, i) for i, item in enumerate(items)]
        return Embeddings(out, np.array(ids, dtype=str), {"model": self.name, "normalized": self.normalize})


def _rgb(item: ImageSource) -> Image.Image:
    """A file or PIL image as upright 8-bit RGB, decoded as table rows are."""
    return upright_rgb(item) if isinstance(item, Image.Image) else read_image(item)


def _image_id(item: ImageSource, position: int) -> str:
    """The id of an image as `lookalike.embed` gives it: its path, a PIL image's file name, or image{position}."""
    if isinstance(item, Image.Image):
        return getattr(item, "filename", "") or f"image{position}"
    return os.fspath(item)
