"""Re-rank given lists with Open Metric Learning 4.0.0's PairwiseReranker; run by bench_pairwise.py in the OML venv.

The pairwise model is OML's own ConcatSiamese around a timm backbone (as an OML IExtractor), loaded with the
weights bench_pairwise.py exported from lookalike's model. Images are read by OML's dataset (Pillow, RGB) and
transformed by the same torchvision v2 steps as lookalike's eval transform. Inputs and outputs are .npz files;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from oml.datasets import ImageQueryGalleryLabeledDataset
from oml.interfaces.models import IExtractor
from oml.models import ConcatSiamese
from oml.retrieval import PairwiseReranker, RetrievalResults
from torchvision import transforms
from torchvision.transforms import v2


class TimmBackbone(IExtractor):
    """A timm model without classifier (pooled features, not normalised), as the extractor inside ConcatSiamese."""

    def __init__(self, name: str, pair_size: tuple[int, int] | None, kwargs: dict) -> None:
        super().__init__()
        extra = {"img_size": pair_size} if pair_size else {}
        self.model = timm.create_model(name, pretrained=False, num_classes=0, **extra, **kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @property
    def feat_dim(self) -> int:
        return int(self.model.num_features)


def log(message: str) -> None:
    """Progress line on stderr."""
    print(f"[OML worker] {message}", file=sys.stderr, flush=True)


def make_transform(spec: dict) -> transforms.Compose:
    """lookalike's eval_transform: square side -> resize to side / crop_fraction and centre-crop; [h, w] -> exact
    resize."""
    size = spec["image_size"]
    if isinstance(size, int):
        resize = [v2.Resize(int(round(size / spec["crop_fraction"])), antialias=True), v2.CenterCrop(size)]
    else:
        resize = [v2.Resize(tuple(size), antialias=True)]
    steps = [v2.ToImage(), *resize, v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec["mean"], spec["std"])]
    return transforms.Compose(steps)  # OML's datasets accept only albumentations or torchvision v1 Compose


def load_model(spec: dict, weights: Path) -> ConcatSiamese:
    """OML's ConcatSiamese with lookalike's weights (keys backbone.* -> extractor.model.*, head.* unchanged)."""
    pair_size = (2 * spec["height"], spec["width"]) if spec["takes_img_size"] else None
    model = ConcatSiamese(
        TimmBackbone(spec["name"], pair_size, spec["model_kwargs"]), [spec["hidden"]], use_tta=spec["tta"]
    )
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def main() -> int:
    """Re-rank, time it, write the new lists."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folder", type=Path, help="holds frame.csv, lists.npz, weights.pt, spec.json; out.npz is written there"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = json.loads((args.folder / "spec.json").read_text())
    frame = pd.read_csv(args.folder / "frame.csv", dtype={"path": str})
    dataset = ImageQueryGalleryLabeledDataset(frame, transform=make_transform(spec))
    with np.load(args.folder / "lists.npz") as lists:
        indices, distances = lists["indices"], lists["distances"]
    rr = RetrievalResults([torch.from_numpy(d) for d in distances], [torch.from_numpy(i) for i in indices])
    reranker = PairwiseReranker(
        top_n=spec["top_n"],
        pairwise_model=load_model(spec, args.folder / "weights.pt"),
        num_workers=0,
        batch_size=spec["batch_size"],
        verbose=False,
    )
    log(f"re-ranking the top {spec['top_n']} of {len(indices)} queries")
    with warnings.catch_warnings():  # OML's inference always opens a CUDA autocast context, which warns on CPU
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
        started = time.perf_counter()
        out = reranker.process(rr, dataset)
        seconds = time.perf_counter() - started
    np.savez(
        args.folder / "out.npz",
        indices=np.stack([r.numpy() for r in out.retrieved_ids]),
        distances=np.stack([d.numpy() for d in out.distances]),
        seconds=np.array(seconds),
        oml_version=np.array(version("open-metric-learning")),
        threads=np.array(torch.get_num_threads()),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
