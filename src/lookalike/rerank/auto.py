"""Gallery-adaptive ("auto") parameters of the training-free re-rankers, resolved at rerank time.

The published defaults (k-reciprocal k1 20 / k2 6, QE n 5, ICFRR KG 256 / KQ 250 / beta 0.5) were set for galleries
of their papers; on a gallery with 20 images a class they lower CMC@1 (ICFRR to 0.03). "auto" derives them from the
gallery instead: its size and the median / smallest class size, from the gallery's labels when the context has them,
else (serving an uploaded query) estimated from the gallery's neighbour distances. Where no setting can help (a
gallery of fewer than MIN_GALLERY items, or classes of a single item), the re-ranker warns in one line and returns
the list unchanged. Explicit values are used as given.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from lookalike.core.errors import LookalikeError, LookalikeWarning
from lookalike.core.results import RetrievalResults
from lookalike.search.exact import exact_knn

AUTO = "auto"
MIN_GALLERY = 3  # fewer gallery items: no neighbourhood to re-rank by
JUMP_RATIO = 3.0  # a step of the median neighbour-distance profile this many times its median step ends a class
ESTIMATE_NEIGHBOURS = 64  # neighbours per gallery item read to estimate the class size without labels
SHAPE_KEY = "gallery_shape"  # context.cache: the GalleryShape of the last gallery, by its ids


@dataclass(frozen=True)
class GalleryShape:
    """Gallery size and class sizes (median, smallest) that auto parameters follow; source: labels or neighbours."""

    n_gallery: int
    class_size: int
    min_class: int
    source: str

    def as_dict(self) -> dict[str, Any]:
        """The shape as results.meta records it."""
        return {
            "n_gallery": self.n_gallery,
            "class_size": self.class_size,
            "min_class": self.min_class,
            "from": self.source,
        }


def is_auto(value: Any) -> bool:
    """Whether a parameter value asks to be resolved from the gallery."""
    return isinstance(value, str) and value == AUTO


def gallery_shape(results: RetrievalResults, context: Any, by: str) -> GalleryShape:
    """The gallery's size and class sizes: counted from context.gallery_labels, else estimated from the gallery's
    neighbour distances (its embeddings, or context.gallery_distances); cached in context.cache per gallery."""
    cached = context.cache.get(SHAPE_KEY)
    ids = results.gallery_ids
    if cached is not None and cached[0] is ids:
        return cached[1]
    n = len(ids)
    if context.gallery_labels is not None and len(context.gallery_labels) == n:
        _, counts = np.unique(np.asarray(context.gallery_labels).astype(str), return_counts=True)
        shape = GalleryShape(
            n, int(np.median(counts)) if len(counts) else 0, int(counts.min()) if len(counts) else 0, "labels"
        )
    elif context.gallery_distances is not None:
        if tuple(np.shape(context.gallery_distances)) != (n, n):
            got = list(np.shape(context.gallery_distances))
            raise LookalikeError(f"rerank {by}: gallery_distances must be [G, G] = [{n}, {n}], got {got}")
        dense = np.asarray(context.gallery_distances, dtype=np.float32)
        shape = estimated_shape(np.sort(dense, axis=1)[:, 1 : ESTIMATE_NEIGHBOURS + 1], n)
    else:
        context.require("gallery", by=by)
        if len(context.gallery) != n:
            raise LookalikeError(
                f"rerank {by}: {len(context.gallery)} gallery embeddings for results over {n} gallery items"
            )
        shape = estimated_shape(neighbour_distances(context.gallery.vectors, context.metric), n)
    context.cache[SHAPE_KEY] = (ids, shape)
    return shape


def neighbour_distances(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Each item's distances to its ESTIMATE_NEIGHBOURS nearest other items [N, k], ascending."""
    n = len(vectors)
    if n < MIN_GALLERY:
        return np.zeros((n, 0), np.float32)
    own = np.arange(n)
    metric = metric if metric in ("cosine", "euclidean") else "cosine"
    return exact_knn(vectors, vectors, min(ESTIMATE_NEIGHBOURS, n - 1), metric, exclude=(own, own))[1]


def estimated_shape(dist: np.ndarray, n: int) -> GalleryShape:
    """Class sizes without labels from each item's ascending neighbour distances [N, k]: where the median distance
    profile jumps clearly (JUMP_RATIO x its median step) the classes end ("neighbours"); without such a jump (classes
    that overlap) the size is guessed from the gallery size, sqrt(G) within 2..20 ("gallery size")."""
    if n < MIN_GALLERY or dist.shape[1] < 2:
        return GalleryShape(n, min(n, 1), min(n, 1), "neighbours")
    steps = np.diff(np.median(np.asarray(dist, np.float64), axis=0))
    j = int(np.argmax(steps))
    if j >= 1 and steps[j] > JUMP_RATIO * max(float(np.median(steps)), 1e-12):
        return GalleryShape(n, j + 2, j + 2, "neighbours")  # the item and its j + 1 nearest before the jump
    guess = int(np.clip(round(np.sqrt(n)), 2, 20))
    return GalleryShape(n, guess, guess, "gallery size")


def unfit_reason(shape: GalleryShape, by: str) -> str | None:
    """Why no setting can help on this gallery (one line), or None when it can be re-ranked."""
    if shape.n_gallery < MIN_GALLERY:
        return f"rerank {by}: a gallery of {shape.n_gallery} items is too small to re-rank by its neighbourhoods"
    if shape.class_size < 2:
        return (
            f"rerank {by}: the gallery's classes have {shape.class_size} item (median, {shape.source}): "
            "no neighbours of the same class to re-rank by"
        )
    return None


def skipped(results: RetrievalResults, record: dict[str, Any], reason: str) -> RetrievalResults:
    """The incoming list unchanged, with a one-line LookalikeWarning and the reason in its meta record."""
    warnings.warn(LookalikeWarning(f"{reason}; the list is left unchanged"), stacklevel=3)
    out = RetrievalResults(
        results.indices, results.distances, results.query_ids, results.gallery_ids, dict(results.meta)
    )
    out.meta["rerank"] = [*out.meta.get("rerank", []), {**record, "skipped": reason}]
    return out


def expansion_n(shape: GalleryShape) -> int:
    """QE / DBA top-n: a tenth of a class's other items (at least 1, at most the published 5)."""
    return int(np.clip(round(0.1 * (shape.class_size - 1)), 1, 5))


def kreciprocal_k(shape: GalleryShape) -> tuple[int, int, float]:
    """k-reciprocal k1 (the class size, 2..20), k2 (0.3 k1, as the published 20 / 6) and lambda (the weight of the
    original distance: k1 / (class size + k1), at least the published 0.3, so a k1 covering the whole class leans on
    the original distance as much as on the Jaccard one)."""
    k1 = int(np.clip(shape.class_size, 2, 20))
    k2 = max(1, round(0.3 * k1))
    return k1, k2, float(max(0.3, k1 / (shape.class_size + k1)))


def icfrr_k(shape: GalleryShape) -> int:
    """ICFRR KG = KQ: half the median class (at least 1, at most the published 256 / 250), so voters and their
    lists stay inside a class instead of measuring how central an item is in the whole gallery."""
    return int(np.clip(round(shape.class_size / 2), 1, min(250, max(shape.n_gallery - 1, 1))))


def icfrr_beta(base: np.ndarray, kq: int) -> float:
    """ICFRR beta: 0.3 x the median spread of the base distances over each list's first KQ items, so that the votes
    (in [0, 1]) reorder neighbours at similar distances rather than swamp the distances."""
    d = np.asarray(base[:, : max(kq, 2)], dtype=np.float64)
    d = np.where(np.isfinite(d), d, np.nan)
    spread = np.nanmax(d, axis=1) - d[:, 0] if d.size else np.zeros(0)
    spread = spread[np.isfinite(spread)]
    return float(0.3 * np.median(spread)) if len(spread) else 0.0


def resolve(
    reranker: Any, names: tuple[str, ...], results: RetrievalResults, context: Any, rule: Any
) -> dict[str, Any] | str:
    """The values of the parameters in `names` given as "auto", from rule(GalleryShape) (a dict over `names`), plus
    the gallery shape under "gallery"; {} when none is auto; a one-line reason when the gallery cannot be re-ranked.

    Args:
        reranker: the re-ranker (its attributes hold the given values).
        names: the parameters that may be "auto".
        results: the incoming list (its gallery).
        context: the RerankContext (gallery labels or embeddings, cache).
        rule: GalleryShape -> {name: value} for every name in `names`.

    Returns:
        {name: resolved value, ..., "gallery": shape} for the auto parameters, {} when there are none, or the reason.
    """
    auto = [n for n in names if is_auto(getattr(reranker, n))]
    if not auto:
        return {}
    shape = gallery_shape(results, context, reranker.name)
    reason = unfit_reason(shape, reranker.name)
    if reason is not None:
        return reason
    values = rule(shape)
    return {**{n: values[n] for n in auto}, "gallery": shape.as_dict()}


def given_or(reranker: Any, name: str, resolved: dict[str, Any]) -> Any:
    """The parameter as given, or its resolved value when it was "auto"."""
    return resolved[name] if name in resolved else getattr(reranker, name)
