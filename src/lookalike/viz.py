"""Pictures of retrieval: a grid of queries and their top-k (green right, red wrong; ranks, labels, distances and a
legend), a CMC curve, and ICFRR's pictures (rank strips after an iteration, the metrics against the iteration)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageOps

from lookalike.core.atomic import atomic_path
from lookalike.core.errors import LookalikeError
from lookalike.core.results import RetrievalResults
from lookalike.data.images import read_image
from lookalike.metrics import relevance as label_relevance

if TYPE_CHECKING:
    from lookalike.core.table import DatasetTable

RIGHT, WRONG, QUERY, UNKNOWN = "#2ca02c", "#d62728", "#1f77b4", "#7f7f7f"
SCORE_RERANKERS = ("icfrr",)  # re-rankers whose distances are negated similarity scores: grids show them as scores
ICFRR_CURVES = (("map@all", "mAP@all"), ("map@200", "mAP@200"), ("prec@100", "P@100"), ("prec@200", "P@200"))


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


def format_distance(value: float) -> str:
    """A distance to 3 significant digits; float noise around zero (|d| < 1e-6, an image against itself) shows as 0."""
    if not np.isfinite(value):
        return str(value)
    return "0" if abs(value) < 1e-6 else f"{value:.3g}"


def table_labels(table: DatasetTable, results: RetrievalResults) -> tuple[np.ndarray, np.ndarray]:
    """The labels of the results' queries and gallery items, looked up by path in the table ("" for a path not in
    it)."""
    return tuple(table.labels_of(ids, missing="").astype(str) for ids in (results.query_ids, results.gallery_ids))


def _caption(head: str, label: str | None, wrap: int) -> str:
    """The text under a grid cell: the rank (or "query") and the whole label, wrapped to the cell's width."""
    return head if not label else "\n".join(textwrap.wrap(f"{head}  {label}", wrap))


def _legend(fig: Figure, judged: bool) -> None:
    """What the frame colours mean, below the grid."""
    kinds = [(QUERY, "query")] + (
        [(RIGHT, "match (same label)"), (WRONG, "not a match")] if judged else [(UNKNOWN, "not judged (no labels)")]
    )
    handles = [Patch(facecolor="white", edgecolor=color, linewidth=2.5, label=text) for color, text in kinds]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)


def result_grid_figure(
    results: RetrievalResults,
    image_root: str | os.PathLike,
    relevance: np.ndarray | None = None,
    queries: Sequence[int] | None = None,
    top_k: int = 5,
    cell_size: int = 96,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
    scores: bool = False,
) -> Figure:
    """The grid as a figure: per row the query (blue frame) and its top-k framed green/red by `relevance`, each with its
    rank, label (`labels`: query and gallery labels in the results' order) and distance under it, and a colour legend.
    `scores`: the distances are negated similarity scores (ICFRR) and are shown as "score" = -distance."""
    root = Path(image_root)
    rows = list(queries) if queries is not None else spread_queries(results.n_queries, 8)
    top_k = min(top_k, results.k)
    q_labels, g_labels = labels if labels is not None else (None, None)
    wrap = max(
        12, cell_size // 4
    )  # characters per line: a column is cell_size * 5/3 px wide, 7-pt text ~6 px a character
    fig = Figure(
        figsize=((top_k + 1) * cell_size / 60, len(rows) * cell_size / 45 + 0.4), dpi=100, layout="constrained"
    )
    axes = fig.subplots(len(rows), top_k + 1, squeeze=False)
    for r, q in enumerate(rows):
        ax = axes[r, 0]
        ax.imshow(_cell(root / str(results.query_ids[q]), cell_size))
        ax.set_xlabel(_caption("query", None if q_labels is None else str(q_labels[q]), wrap), fontsize=7)
        _frame(ax, QUERY)
        for c in range(top_k):
            ax, g = axes[r, c + 1], int(results.indices[q, c])
            if g < 0:
                ax.axis("off")
                continue
            ax.imshow(_cell(root / str(results.gallery_ids[g]), cell_size))
            d = float(results.distances[q, c])
            value = f"score = {format_distance(-d)}" if scores else f"d = {format_distance(d)}"
            ax.set_xlabel(
                _caption(f"#{c + 1}", None if g_labels is None else str(g_labels[g]), wrap) + f"\n{value}", fontsize=7
            )
            _frame(ax, UNKNOWN if relevance is None else (RIGHT if relevance[q, c] else WRONG))
    _legend(fig, relevance is not None)
    return fig


def save_result_grid(results: RetrievalResults, path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """Write the PNG of `result_grid_figure(results, *args, **kwargs)` (image_root, relevance, queries, ...).

    Args:
        results: the lists to draw.
        path: the PNG to write (atomically).
        *args, **kwargs: result_grid_figure's other arguments, image_root first.

    Returns:
        The path written.
    """
    return save_figure(result_grid_figure(results, *args, **kwargs), path)


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
    return save_figure(fig, path)


def plot_icfrr_curve(records: Sequence[dict[str, float]], path: str | os.PathLike) -> Path:
    """Write a PNG of mAP@all, mAP@200, P@100 and P@200 against the iteration (the ICFRR reference's four curves).

    Args:
        records: one dict per iteration (0 = before) with 'iteration' and those metrics (run_icfrr_cache with labels).
        path: the PNG to write (atomically).

    Returns:
        The path written.
    """
    if not records or any(key not in records[0] for key, _ in ICFRR_CURVES):
        keys = ", ".join(k for k, _ in ICFRR_CURVES)
        raise LookalikeError(f"records: expected per-iteration records with {keys} (run_icfrr_cache with labels)")
    x = [r["iteration"] for r in records]
    fig = Figure(figsize=(5, 3.6), dpi=100)
    ax = fig.subplots()
    for (key, label), marker in zip(ICFRR_CURVES, "ooss"):
        ax.plot(x, [r[key] for r in records], marker=marker if len(x) <= 30 else None, label=label)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.set_title("ICFRR re-ranking")
    fig.tight_layout()
    return save_figure(fig, path)


def save_rank_strips(
    results: RetrievalResults,
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    query_labels: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    queries: Sequence[int] | None = None,
    top_k: int = 10,
) -> Path:
    """Write a PNG: for each chosen query its image then its top-k, framed green/red when labels are given (ICFRR's
    rank strips after an iteration).

    Args:
        results: the lists; image paths are image_root / their ids (give results_from_distances the file names).
        path: the PNG to write (atomically).
        image_root: the folder the ids are relative to.
        query_labels, gallery_labels: labels in the results' order, to frame matches green and others red.
        queries: the query rows to draw (default: 8 spread over all).
        top_k: gallery images per query.

    Returns:
        The path written.
    """
    labels = (query_labels, gallery_labels) if query_labels is not None and gallery_labels is not None else None
    rel = label_relevance(results, *labels) if labels is not None else None
    return save_result_grid(results, path, image_root, relevance=rel, queries=queries, top_k=top_k, labels=labels)


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as PNG atomically (a killed run leaves no half picture).

    Args:
        fig: the figure.
        path: the .png file.

    Returns:
        The path written.
    """
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
