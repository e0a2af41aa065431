"""Compare lookalike's retrieval metrics with Open Metric Learning 4.0.0: values and speed.

Run from the repository root with the project's python:

    .venv/bin/python benchmarks/bench_metrics.py

On first use it creates ``.bench-venvs/oml`` (python3.11) and installs
``open-metric-learning==4.0.0`` there; OML then runs in a subprocess
(``_oml_metrics_worker.py``) and the two sides exchange arrays through a temporary .npz.
Exits non-zero when any per-query metric differs by 1e-6 or more on a query that has
at least one relevant gallery item.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".bench-venvs" / "oml"
VENV_STAMP = VENV / ".installed"
WORKER = Path(__file__).resolve().with_name("_oml_metrics_worker.py")
PIP_PACKAGES = (
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy<2",
    "open-metric-learning==4.0.0",
    "omegaconf",  # imported by oml.const but missing from OML 4.0.0's requirements
)

N_QUERIES = 10_000
N_GALLERY = 20_000
N_CLASSES = 1_000
TOP_K = 100
KS = (1, 5, 10, 100)
SEED = 0
TOLERANCE = 1e-6
TARGET_SPEEDUP = 20.0


@dataclass(frozen=True)
class Synthetic:
    """Inputs shared by both implementations."""

    indices: np.ndarray  # (Q, K) int64 gallery positions, best first
    distances: np.ndarray  # (Q, K) float32, non-decreasing, with ties
    query_labels: np.ndarray  # (Q,) int64
    gallery_labels: np.ndarray  # (G,) int64


def log(message: str) -> None:
    """Print one progress line at once."""
    print(message, flush=True)


def venv_python() -> Path:
    """Path of the OML venv's interpreter."""
    return VENV / "bin" / "python"


def base_python() -> str:
    """Find python3.11 to build the OML venv with."""
    found = shutil.which("python3.11")
    if found is None:
        sys.exit("bench_metrics: python3.11 is needed to build the OML venv, and none is on PATH")
    return found


def run_step(description: str, command: list[str]) -> None:
    """Run one setup command, echoing what it does; stop the benchmark if it fails."""
    log(f"[setup] {description}")
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        sys.exit(f"bench_metrics: setup step failed ({description}), exit code {completed.returncode}")
    log(f"[setup]   done in {time.perf_counter() - started:.0f} s")


def ensure_oml_venv() -> Path:
    """Create .bench-venvs/oml with OML 4.0.0 installed unless it is already there."""
    python = venv_python()
    if VENV_STAMP.exists() and python.exists():
        log(f"[setup] reusing OML venv at {VENV.relative_to(ROOT)}")
        return python
    if not python.exists():
        interpreter = base_python()
        run_step(f"creating venv {VENV.relative_to(ROOT)} with {interpreter}", [interpreter, "-m", "venv", str(VENV)])
    pip = [str(python), "-m", "pip", "install", "--quiet", "--progress-bar", "off"]
    run_step("upgrading pip", [*pip, "--upgrade", "pip"])
    run_step(f"installing {' '.join(PIP_PACKAGES)} (a few minutes the first time)", [*pip, *PIP_PACKAGES])
    run_step("checking that OML imports", [str(python), "-c", "import oml.functional.metrics"])
    VENV_STAMP.touch()
    return python


def gallery_members(gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gallery positions grouped by label: (order, start of each label, count of each label)."""
    order = np.argsort(gallery_labels, kind="stable")
    counts = np.bincount(gallery_labels, minlength=N_CLASSES)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return order, starts, counts


def draw_labels(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Skewed gallery labels (some classes exceed K) and query labels, ~5% absent from the gallery."""
    weights = 1.0 / np.arange(1, N_CLASSES + 1)
    gallery_labels = rng.choice(N_CLASSES, size=N_GALLERY, p=weights / weights.sum())
    query_labels = rng.integers(0, int(N_CLASSES * 1.05), size=N_QUERIES)
    return query_labels.astype(np.int64), gallery_labels.astype(np.int64)


def draw_row(rng: np.random.Generator, members: np.ndarray, gallery_labels: np.ndarray, label: int) -> np.ndarray:
    """One query's top-K: a random share of its relevant items mixed with distinct irrelevant ones."""
    n_hits = min(len(members), rng.binomial(TOP_K, rng.uniform(0.0, 0.6)))
    hits = rng.choice(members, size=n_hits, replace=False)
    misses = np.empty(0, dtype=np.int64)
    while len(misses) < TOP_K - n_hits:
        candidates = rng.integers(0, len(gallery_labels), size=2 * TOP_K)
        misses = np.unique(np.concatenate((misses, candidates[gallery_labels[candidates] != label])))
    misses = rng.permutation(misses)[: TOP_K - n_hits]
    return rng.permutation(np.concatenate((hits, misses)))


def make_synthetic(seed: int) -> Synthetic:
    """Build Q x K results with tied distances, hits at random ranks and queries with no relevant item."""
    rng = np.random.default_rng(seed)
    query_labels, gallery_labels = draw_labels(rng)
    order, starts, counts = gallery_members(gallery_labels)
    rows = []
    for label in query_labels:
        known = label < N_CLASSES
        members = order[starts[label] : starts[label] + counts[label]] if known else order[:0]
        rows.append(draw_row(rng, members, gallery_labels, int(label)))
    distances = np.sort(np.round(rng.uniform(0.0, 2.0, size=(N_QUERIES, TOP_K)), 2), axis=1)
    return Synthetic(np.stack(rows).astype(np.int64), distances.astype(np.float32), query_labels, gallery_labels)


def n_relevant(data: Synthetic) -> np.ndarray:
    """Number of gallery items sharing each query's label."""
    counts = np.bincount(data.gallery_labels, minlength=int(data.query_labels.max()) + 1)
    return counts[data.query_labels]


def run_lookalike(data: Synthetic, repeats: int) -> tuple[dict[str, np.ndarray], float, int]:
    """Time lookalike.metrics.compute_metrics; return per-query values, best seconds, n_no_relevant."""
    from lookalike.core.results import RetrievalResults
    from lookalike.metrics import compute_metrics

    results = RetrievalResults(
        indices=data.indices,
        distances=data.distances,
        query_ids=np.arange(len(data.query_labels)),
        gallery_ids=np.arange(len(data.gallery_labels)),
    )
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        report = compute_metrics(results, data.query_labels, data.gallery_labels, cmc_k=KS, precision_k=KS, map_k=KS)
        best = min(best, time.perf_counter() - start)
    per_query = {name: np.asarray(values, dtype=np.float64) for name, values in report.per_query.items()}
    return per_query, best, len(report.no_relevant_ids)


def run_oml(python: Path, data: Synthetic, repeats: int) -> tuple[dict[str, np.ndarray], float, str]:
    """Run the OML worker in its venv; return per-query values, best seconds and OML's version."""
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        in_path, out_path = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        ks = np.array(KS, dtype=np.int64)
        np.savez(
            in_path,
            indices=data.indices,
            query_labels=data.query_labels,
            gallery_labels=data.gallery_labels,
            cmc_k=ks,
            precision_k=ks,
            map_k=ks,
            repeats=np.array(repeats),
        )
        subprocess.run([str(python), str(WORKER), str(in_path), str(out_path)], check=True)
        with np.load(out_path) as out:
            arrays = {name: out[name] for name in out.files}
    version = str(arrays.pop("oml_version"))
    seconds = arrays.pop("seconds")
    return arrays, float(seconds.min()), version


def metric_names() -> list[str]:
    """Metric keys compared, in print order."""
    return [f"{name}@{k}" for name in ("cmc", "precision", "map") for k in KS]


def compare(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, float]:
    """Max absolute per-query difference on the masked queries (NaN on our side counts as a failure)."""
    return {name: float(np.max(np.abs(ours[name][mask] - theirs[name][mask]))) for name in metric_names()}


def print_table(
    ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], mask: np.ndarray, diffs: dict[str, float]
) -> None:
    """Print means of both sides and the max difference for every metric."""
    log(f"{'metric':<14}{'lookalike':>12}{'OML':>12}{'max |diff|':>14}")
    for name in metric_names():
        mean_ours, mean_theirs = ours[name][mask].mean(), theirs[name][mask].mean()
        log(f"{name:<14}{mean_ours:>12.6f}{mean_theirs:>12.6f}{diffs[name]:>14.3e}")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the best counts (default 3)")
    return parser.parse_args()


def main() -> int:
    """Set up OML, compute the metrics on both sides, print the comparison; 0 when they agree."""
    args = parse_args()
    python = ensure_oml_venv()
    log(f"[data] Q={N_QUERIES:,} queries, K={TOP_K}, gallery={N_GALLERY:,}, seed={SEED}")
    data = make_synthetic(SEED)
    counts = n_relevant(data)
    mask = counts > 0
    log(f"[data] queries with no relevant item: {int((~mask).sum())}; max relevant per query: {int(counts.max())}")
    log(f"[lookalike] computing metrics (best of {args.repeats}) ...")
    ours, our_time, our_no_relevant = run_lookalike(data, args.repeats)
    log(f"[OML] computing metrics in {VENV.relative_to(ROOT)} (best of {args.repeats}) ...")
    theirs, their_time, version = run_oml(python, data, args.repeats)
    diffs = compare(ours, theirs, mask)
    print_table(ours, theirs, mask, diffs)
    worst = max(diffs.values(), key=lambda d: np.inf if np.isnan(d) else d)
    agree = all(d < TOLERANCE for d in diffs.values()) and our_no_relevant == int((~mask).sum())
    ratio = their_time / our_time
    log(f"lookalike reports n_no_relevant={our_no_relevant} (expected {int((~mask).sum())})")
    log(f"max |diff| over {int(mask.sum())} queries with a relevant item: {worst:.3e} (tolerance {TOLERANCE:.0e})")
    log(f"time: lookalike {our_time * 1e3:.1f} ms, OML {version} {their_time * 1e3:.1f} ms")
    verdict = "met" if ratio >= TARGET_SPEEDUP else "NOT met"
    log(f"speed ratio OML / lookalike: {ratio:.1f}x (target >= {TARGET_SPEEDUP:.0f}x: {verdict})")
    log("RESULT: " + ("metrics agree" if agree else "METRICS DIFFER"))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
