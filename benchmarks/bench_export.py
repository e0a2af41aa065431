"""Index build speed: embedding a gallery with torch (`Extractor.embed`) vs onnxruntime (`OnnxExtractor.embed`).

Run from the repository root with the project's python:

    .venv/bin/python benchmarks/bench_export.py [--model resnet18 --image-size 64 --images 2720 --rounds 3]

Both sides embed the same images of the bundled Omniglot subset (decode, resize, crop, normalise, forward) in batches
of `--batch-size` on the CPU with the same number of threads, the model exported once with `lookalike.export`.
One untimed batch per side warms up first; then the sides alternate within each round (torch first in odd rounds,
onnxruntime first in even ones). Every run is printed, then the best images/s of each side and their ratio.
Exits non-zero when the embeddings differ by more than 1e-4.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lookalike.data.bundled import unpack_omniglot
from lookalike.data.folder import list_images
from lookalike.export import export_onnx
from lookalike.models.extractor import Extractor
from lookalike.onnx_runtime import OnnxExtractor

TOLERANCE = 1e-4


def log(message: str = "") -> None:
    """Print one line at once."""
    print(message, flush=True)


def timed(embed, images: list[Path]) -> tuple[float, np.ndarray]:
    """Seconds of one embedding run and its vectors."""
    start = time.perf_counter()
    vectors = embed(images)
    return time.perf_counter() - start, vectors


def main() -> int:
    """Export, then time both sides round by round; print every run, the best of each and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=2720)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        images = list_images(unpack_omniglot(tmp))[: args.images]
        torch.manual_seed(0)
        extractor = Extractor(args.model, image_size=args.image_size).eval()
        start = time.perf_counter()
        model_path, _ = export_onnx(extractor, Path(tmp) / "model.onnx")
        log(f"exported {args.model} at {args.image_size} px in {time.perf_counter() - start:.1f} s")
        onnx = OnnxExtractor(model_path, threads=threads)
        sides = {
            "torch": lambda items: extractor.embed(items, batch_size=args.batch_size).vectors,
            "onnxruntime": lambda items: onnx.embed(items, batch_size=args.batch_size).vectors,
        }
        log(f"{len(images)} images, batch {args.batch_size}, {threads} threads, torch {torch.__version__}")
        for embed in sides.values():  # warm-up, not timed: kernel selection and first allocations
            embed(images[: args.batch_size])
        best: dict[str, float] = {}
        vectors: dict[str, np.ndarray] = {}
        for round_ in range(1, args.rounds + 1):
            order = list(sides) if round_ % 2 else list(sides)[::-1]
            for side in order:
                seconds, vectors[side] = timed(sides[side], images)
                rate = len(images) / seconds
                best[side] = max(best.get(side, 0.0), rate)
                log(f"round {round_} {side:<12} {seconds:7.2f} s  {rate:8.1f} images/s")
    diff = float(np.abs(vectors["torch"] - vectors["onnxruntime"]).max())
    log(f"best torch {best['torch']:.1f} images/s, onnxruntime {best['onnxruntime']:.1f} images/s")
    log(f"ratio onnxruntime / torch: {best['onnxruntime'] / best['torch']:.2f}; max |embedding difference| {diff:.1e}")
    return 0 if diff <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
