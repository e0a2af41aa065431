"""Compute retrieval metrics with Open Metric Learning; run inside the OML venv.

Usage: python _oml_metrics_worker.py IN.npz OUT.npz

IN.npz holds ``indices`` (Q x K gallery positions, -1 = padding), ``query_labels``,
``gallery_labels``, ``cmc_k``, ``precision_k``, ``map_k`` and ``repeats``.
OUT.npz gets one per-query array per metric (``cmc@1``, ``precision@5``, ...),
``seconds`` (one wall time per repeat) and ``oml_version``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import oml
import torch
from oml.functional.metrics import calc_retrieval_metrics


def to_retrieved_ids(indices: np.ndarray) -> list[torch.Tensor]:
    """Turn a padded Q x K index matrix into OML's list of per-query id tensors."""
    return [torch.from_numpy(row[row >= 0].copy()) for row in indices]


def to_gt_ids(query_labels: np.ndarray, gallery_labels: np.ndarray) -> list[torch.Tensor]:
    """List, for every query, the gallery positions that share its label."""
    order = np.argsort(gallery_labels, kind="stable")
    sorted_labels = gallery_labels[order]
    starts = np.searchsorted(sorted_labels, query_labels, side="left")
    stops = np.searchsorted(sorted_labels, query_labels, side="right")
    return [torch.from_numpy(order[a:b].copy()) for a, b in zip(starts, stops)]


def time_metrics(
    retrieved: list[torch.Tensor], gt: list[torch.Tensor], ks: dict[str, tuple[int, ...]], repeats: int
) -> tuple[dict[str, Any], list[float]]:
    """Call calc_retrieval_metrics ``repeats`` times; return the last result and every wall time."""
    seconds: list[float] = []
    result: dict[str, Any] = {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = calc_retrieval_metrics(
            retrieved_ids=retrieved,
            gt_ids=gt,
            cmc_top_k=ks["cmc"],
            precision_top_k=ks["precision"],
            map_top_k=ks["map"],
            reduce=False,
            verbose=False,
        )
        seconds.append(time.perf_counter() - start)
    return result, seconds


def flatten(result: dict[str, Any]) -> dict[str, np.ndarray]:
    """Turn OML's nested {"cmc": {1: tensor}} dict into {"cmc@1": float64 array}."""
    return {f"{name}@{k}": values.double().numpy() for name, by_k in result.items() for k, values in by_k.items()}


def main(in_path: str, out_path: str) -> None:
    """Load the inputs, time OML and write per-query metrics and timings."""
    data = np.load(in_path)
    retrieved = to_retrieved_ids(data["indices"])
    gt = to_gt_ids(data["query_labels"], data["gallery_labels"])
    ks = {name: tuple(int(k) for k in data[f"{name}_k"]) for name in ("cmc", "precision", "map")}
    result, seconds = time_metrics(retrieved, gt, ks, int(data["repeats"]))
    np.savez(out_path, seconds=np.array(seconds), oml_version=np.array(oml.__version__), **flatten(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
