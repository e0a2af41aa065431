"""Pictures of retrieval: a grid of queries and their top-k (green right, red wrong) and a CMC curve."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from lookalike.atomic import atomic_path
from lookalike.data.images import read_image
from lookalike.search.results import RetrievalResults

RIGHT, WRONG, QUERY, UNKNOWN = "#2ca02c", "#d62728", "#1f77b4", "#7f7f7f"


def _cell(path: Path, size: int) -> np.ndarray:
    """The image letterboxed into a size x size cell, so every cell has the same shape."""
    img = ImageOps.contain(read_image(str(path)), (size, size), Image.NEAREST)
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    top, left = (size - img.height) // 2, (size - img.width) // 2
    canvas[top : top + img.height, left : left + img.width] = np.asarray(img)
    return canvas


def spread_queries(n_queries: int, n: int) -> list[int]:
    """n query positions spread evenly over all queries (tables are often sorted by label)."""
    return sorted(set(np.linspace(0, n_queries - 1, min(n, n_queries)).round().astype(int).tolist()))


def _frame(ax, color: str, width: float = 4.0) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def save_result_grid(
    results: RetrievalResults,
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    relevance: np.ndarray | None = None,
    queries: Sequence[int] | None = None,
    top_k: int = 5,
    cell_size: int = 96,
) -> Path:
    """Write a PNG: one row per query (blue frame) followed by its top-k, framed green/red by `relevance`."""
    root = Path(image_root)
    rows = list(queries) if queries is not None else spread_queries(results.n_queries, 8)
    top_k = min(top_k, results.k)
    fig = Figure(figsize=((top_k + 1) * cell_size / 60, len(rows) * cell_size / 55), dpi=100)
    axes = fig.subplots(len(rows), top_k + 1, squeeze=False)
    for r, q in enumerate(rows):
        ax = axes[r, 0]
        ax.imshow(_cell(root / str(results.query_ids[q]), cell_size))
        ax.set_title("query", fontsize=8)
        _frame(ax, QUERY)
        for c in range(top_k):
            ax, g = axes[r, c + 1], int(results.indices[q, c])
            if g < 0:
                ax.axis("off")
                continue
            ax.imshow(_cell(root / str(results.gallery_ids[g]), cell_size))
            ax.set_title(f"#{c + 1}  d={results.distances[q, c]:.3g}", fontsize=7)
            color = UNKNOWN if relevance is None else (RIGHT if relevance[q, c] else WRONG)
            _frame(ax, color)
    fig.tight_layout()
    return _save(fig, path)


def save_cmc_curve(curves: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write a PNG of CMC@k against k, one line per named curve (e.g. before / after re-ranking)."""
    fig = Figure(figsize=(5, 3.6), dpi=100)
    ax = fig.subplots()
    for name, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, marker="." if len(curve) <= 30 else None, label=name)
    ax.set_xlabel("k")
    ax.set_ylabel("CMC@k")
    ax.set_ylim(0, 1.02)
    ax.set_xscale("log" if max(len(c) for c in curves.values()) > 30 else "linear")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Cumulative matching characteristic")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
