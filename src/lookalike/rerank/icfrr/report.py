"""The ICFRR reference's printout: its metrics per iteration, and a run over its cache that writes what it writes
(rankings, the chosen queries' rank strips)."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.core.errors import LookalikeError
from lookalike.core.results import RetrievalResults
from lookalike.metrics import compute_metrics
from lookalike.rerank.icfrr.algorithm import ICFRR
from lookalike.rerank.icfrr.cache import RankingsWriter, icfrr_cache_inputs
from lookalike.viz import save_rank_strips

VIS_DIR, VIS_FILE = "vis", "reranking_iter_{}.png"


def icfrr_metrics(results: RetrievalResults, query_labels: np.ndarray, gallery_labels: np.ndarray) -> dict[str, float]:
    """The reference's printout: mAP@all, mAP@200 and prec@25/100/200, means over all queries.

    As the reference computes them: AP@k divides by the relevant items found in the top k (OML's mAP@k);
    prec@k = relevant in the top k / k (OML's precision@k divides by min(k, relevant)); a query with no
    relevant item counts as 0 (OML leaves it out).
    """
    report = compute_metrics(results, query_labels, gallery_labels, cmc_k=(1,), precision_k=(1,), map_k=(200,))
    hits = np.cumsum(report.relevance, axis=1)
    out = {name: float(np.nan_to_num(report.per_query[name], nan=0.0).mean()) for name in ("map@all", "map@200")}
    for k in (25, 100, 200):
        out[f"prec@{k}"] = float((hits[:, min(k, results.k) - 1] / k).mean())
    return out


def run_icfrr_cache(
    folder: str | os.PathLike,
    kg: int = 256,
    kq: int = 250,
    beta: float = 0.5,
    n_times: int = 5,
    chunk: int = 1024,
    output: str | os.PathLike | None = None,
    strips: RankStrips | None = None,
) -> list[dict[str, float]]:
    """ICFRR on a reference cache folder, exactly (whole lists, the cache's distances): one record per iteration, 0 =
    before.

    Each record holds 'iteration' and, when the folder has labels, the icfrr_metrics of that iteration. With `output`,
    the ranking of every iteration is written as the reference writes it (output/ranks/reranking_iter_{i}.pth, a
    LongTensor [Q, G]) and all of them in output/rankings.npz (arrays reranking_iter_{i}, readable without torch);
    with `strips` too, output/vis/reranking_iter_{i}.png shows the chosen queries' top images after iteration i.
    """
    ids = (strips.query_ids, strips.gallery_ids) if strips is not None else (None, None)
    results, context, labels = icfrr_cache_inputs(folder, *ids)
    if strips is not None:
        strips.check(results.n_queries)
    reranker = ICFRR(kg=kg, kq=kq, beta=beta, n_times=n_times, exact=True, chunk=chunk, distance="search")
    records = []
    with RankingsWriter(output) if output is not None else contextlib.nullcontext() as writer:
        for i, current in enumerate(itertools.chain([results], reranker.iterations(results, context))):
            records.append(_record(i, current, labels))
            if writer is not None:
                writer.add(i, current.indices)
            if strips is not None and output is not None:
                strips.draw(current, Path(output) / VIS_DIR / VIS_FILE.format(i), labels)
    return records


@dataclass(frozen=True)
class RankStrips:
    """Which queries' rank strips to draw from a cache: their rows, how many gallery images, and the image files.

    query_ids / gallery_ids: the image of every cache row and column, relative to image_root (reference_image_ids).
    """

    image_root: Path
    query_ids: Sequence[str]
    gallery_ids: Sequence[str]
    queries: Sequence[int]
    top_k: int = 20

    def check(self, n_queries: int) -> None:
        """Fail with one line when a chosen query is not a row of the cache."""
        bad = [q for q in self.queries if not 0 <= q < n_queries]
        if bad:
            raise LookalikeError(
                f"--query-idxs-to-vis: query {bad[0]} is not a row of the cache (it has {n_queries} queries: "
                f"0..{n_queries - 1})"
            )
        if self.top_k < 1:
            raise LookalikeError(f"--num-gallery-ims-to-vis: expected a positive number of images, got {self.top_k}")

    def draw(self, results: RetrievalResults, path: Path, labels: dict[str, np.ndarray] | None) -> Path:
        """One PNG of the chosen queries after one iteration (green/red frames with labels, grey without)."""
        q, g = (labels["query"], labels["gallery"]) if labels is not None else (None, None)
        return save_rank_strips(results, path, self.image_root, q, g, list(self.queries), self.top_k)


def _record(iteration: int, results: RetrievalResults, labels: dict[str, np.ndarray] | None) -> dict[str, float]:
    """One row of the per-iteration table."""
    metrics = icfrr_metrics(results, labels["query"], labels["gallery"]) if labels is not None else {}
    return {"iteration": iteration, **metrics}
