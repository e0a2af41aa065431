"""Train and validate with Open Metric Learning 4.0.0; run by bench_train.py with the OML venv's python.

Uses OML as a library: its datasets built from the dataset table, BalanceSampler (P labels x K
instances), TripletLossWithMiner + HardTripletsMiner, inference, RetrievalResults and
calc_retrieval_metrics_rr; the training loop is plain PyTorch. Progress goes to stderr; the last
line of stdout is one JSON object: {"cmc@1", "images_per_second", "epochs", "oml_version", ...};
images_per_second times the whole loop (batch loading included), images_per_second_steps only
forward + loss + backward + optimiser step of each batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from oml.datasets import ImageLabeledDataset, ImageQueryGalleryLabeledDataset
from oml.inference import inference
from oml.interfaces.models import IExtractor
from oml.losses import TripletLossWithMiner
from oml.metrics import calc_retrieval_metrics_rr
from oml.miners import HardTripletsMiner
from oml.retrieval import RetrievalResults
from oml.samplers import BalanceSampler
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TimmExtractor(IExtractor):
    """A timm backbone without classifier (global pooled features), L2-normalised, as an OML extractor."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.backbone = timm.create_model(name, pretrained=False, num_classes=0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.backbone(images), dim=1)

    @property
    def feat_dim(self) -> int:
        return int(self.backbone.num_features)


def log(message: str) -> None:
    """Progress line on stderr (stdout is reserved for the JSON result)."""
    print(f"[OML worker] {message}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    """Command-line options; bench_train.py passes all of them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, required=True, help="dataset CSV; relative paths start at its folder")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--crop-fraction", type=float, default=1.0)
    parser.add_argument("--p", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--margin", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128, help="validation batch size")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    return parser.parse_args()


def seed_all(seed: int) -> None:
    """Seed python, numpy (BalanceSampler draws from np.random) and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_transform(image_size: int, crop_fraction: float) -> transforms.Compose:
    """Resize the short side to size / crop_fraction, centre-crop, scale, ImageNet-normalise (no augmentation)."""
    steps = [
        v2.ToImage(),
        v2.Resize(round(image_size / crop_fraction), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return transforms.Compose(steps)  # OML's datasets accept only albumentations or torchvision v1 Compose


def read_splits(table: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and validation rows of the table, labels encoded as integers (OML's miner needs numeric labels)."""
    frame = pd.read_csv(table, dtype={"label": str, "path": str, "split": str})
    frame["label"] = pd.factorize(frame["label"])[0]
    for column in ("is_query", "is_gallery"):
        frame[column] = frame[column].astype(str).str.strip().str.lower().isin({"true", "1", "yes", "y", "t"})
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    validation = frame[frame["split"] == "validation"].reset_index(drop=True)
    return train, validation


def train_epochs(
    model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer, epochs: int
) -> tuple[int, float, float, float]:
    """Plain PyTorch loop; return images, wall seconds of the loop (batch loading included) and of the steps alone,
    and the last epoch's mean loss."""
    model.train()
    images, loop_seconds, step_seconds = 0, 0.0, 0.0
    for epoch in range(epochs):
        started, losses = time.perf_counter(), []
        for batch in loader:
            step_started = time.perf_counter()
            loss = criterion(model(batch["input_tensors"]), batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step_seconds += time.perf_counter() - step_started
            images += len(batch["labels"])
        loop_seconds += time.perf_counter() - started
        log(f"epoch {epoch + 1}/{epochs}: last loss {loss.item():.4f}, {images} images, {loop_seconds:.1f} s")
    return images, loop_seconds, step_seconds, sum(losses) / max(len(losses), 1)


def validate(model: nn.Module, dataset: ImageQueryGalleryLabeledDataset, batch_size: int) -> dict[str, float]:
    """CMC@1 and mAP@all (OML's map@k with k = every other image) with every validation image a query against all the
    others (OML leaves the query itself out), and the median distance of each embedding to its nearest other one."""
    with warnings.catch_warnings():  # OML's inference always opens a CUDA autocast context, which warns on CPU
        warnings.filterwarnings("ignore", message="CUDA is not available")
        embeddings = inference(model, dataset, batch_size=batch_size, num_workers=0)
    k = len(embeddings) - 1
    results = RetrievalResults.from_embeddings(embeddings, dataset, n_items=k)
    metrics = calc_retrieval_metrics_rr(results, cmc_top_k=(1,), precision_top_k=(), map_top_k=(k,), verbose=False)
    dist = torch.cdist(embeddings.float(), embeddings.float())
    dist.fill_diagonal_(float("inf"))
    spread = float(dist.min(1).values.median())
    return {"cmc@1": float(metrics["cmc"][1]), "map@all": float(metrics["map"][k]), "neighbour_distance": spread}


def main() -> int:
    """Train, validate, print the JSON result."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    train_frame, val_frame = read_splits(args.table)
    root = args.table.resolve().parent
    transform = make_transform(args.image_size, args.crop_fraction)
    train_set = ImageLabeledDataset(train_frame, dataset_root=root, transform=transform)
    val_set = ImageQueryGalleryLabeledDataset(val_frame, dataset_root=root, transform=transform)
    sampler = BalanceSampler(train_set.get_labels(), n_labels=args.p, n_instances=args.k)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=0)
    model = TimmExtractor(args.model)
    criterion = TripletLossWithMiner(margin=args.margin, miner=HardTripletsMiner(), reduction="mean")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    log(f"{len(train_set)} train images, {len(set(train_set.get_labels()))} labels; {len(sampler)} batches/epoch")
    images, loop_seconds, step_seconds, last_loss = train_epochs(model, loader, criterion, optimizer, args.epochs)
    result = {
        **validate(model, val_set, args.batch_size),
        "last_epoch_loss": last_loss,
        "images_per_second": images / loop_seconds,
        "images_per_second_steps": images / step_seconds,
        "epochs": args.epochs,
        "oml_version": version("open-metric-learning"),
        "batches_per_epoch": len(sampler),
        "images": images,
        "train_seconds": loop_seconds,
        "step_seconds": step_seconds,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
