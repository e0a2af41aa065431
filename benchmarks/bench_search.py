"""Compare lookalike's exact k-NN search with FAISS IndexFlatIP: agreement, speed and peak memory.

Run from the repository root with the project's python:

    .venv/bin/python benchmarks/bench_search.py [--q 2000 --g 20000 --d 256 --k 100 --repeats 5] [--skip-memory]

Both sides search the same seeded random unit vectors on the CPU with all cores.
Speed: best wall time of `--repeats` runs, the two sides interleaved. lookalike is timed on the
whole `exact_knn` call (numpy in, numpy out); FAISS on `index.search` only, with the gallery
added beforehand (the add time is printed separately).
Memory: each (side, G) runs in a fresh subprocess (`--memory-worker G --side ...`) that loads the
data, resets its peak-RSS mark, records its RSS, searches, and reports the peak RSS minus that RSS.
The peak is read from /proc/self/status (VmHWM), not getrusage's ru_maxrss: on Linux a child's
ru_maxrss starts at its parent's peak (it survives exec), and this parent holds torch and the data,
so ru_maxrss would hide any search peak below roughly 1 GB. VmHWM belongs to the process's own
memory map and is reset by writing 5 to /proc/self/clear_refs.
Exits non-zero when the neighbours differ from FAISS's beyond ties (1e-5 in distance).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from lookalike.search import exact_knn

SEED = 0
TIE_TOLERANCE = 1e-5
TARGET_RATIO = 1.2
MEMORY_GALLERIES = (20_000, 80_000, 320_000)
SIDES = ("lookalike", "faiss")
MIB = 2**20


@dataclass(frozen=True)
class Agreement:
    """How lookalike's neighbours compare with FAISS's."""

    same_sets: int  # rows whose top-k sets are identical
    tie_rows: int  # rows that differ only by items at the boundary distance
    bad_rows: int  # rows that differ beyond ties
    max_dist_diff: float  # largest |distance| difference at equal rank


def log(message: str = "") -> None:
    """Print one line at once."""
    print(message, flush=True)


def n_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def use_all_cores() -> None:
    """Let torch and FAISS each use every available core."""
    torch.set_num_threads(n_cores())
    faiss.omp_set_num_threads(n_cores())


def unit_vectors(rng: np.random.Generator, n: int, d: int, chunk: int = 65_536) -> np.ndarray:
    """n random float32 unit vectors [n, d], built in chunks so no temporary outgrows the result."""
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        block = out[start : start + chunk]
        rng.standard_normal(out=block, dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return out


def make_data(n_q: int, n_g: int, d: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded query and gallery unit vectors."""
    rng = np.random.default_rng(seed)
    return unit_vectors(rng, n_q, d), unit_vectors(rng, n_g, d)


def flat_index(gallery: np.ndarray) -> faiss.IndexFlatIP:
    """A FAISS inner-product flat index holding the gallery."""
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    return index


def search_lookalike(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """lookalike's exact cosine search: indices and ascending distances."""
    return exact_knn(queries, gallery, k, metric="cosine")


def search_faiss(index: faiss.IndexFlatIP, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS search converted to lookalike's convention: indices and ascending 1 - cosine."""
    scores, idx = index.search(queries, k)
    return idx.astype(np.int64), (1.0 - scores).astype(np.float32)


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over `repeats` interleaved rounds (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def row_is_tie(q: np.ndarray, gallery: np.ndarray, ids_a: np.ndarray, ids_b: np.ndarray, boundary: float) -> bool:
    """True when every item in only one of the two sets lies at the boundary distance (float64)."""
    diff = np.setxor1d(ids_a, ids_b)
    exact = 1.0 - gallery[diff].astype(np.float64) @ q.astype(np.float64)
    return bool(np.all(np.abs(exact - boundary) <= TIE_TOLERANCE))


def compare(
    queries: np.ndarray, gallery: np.ndarray, ours: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]
) -> Agreement:
    """Per-row neighbour sets of lookalike vs FAISS, forgiving ties at the k-th distance."""
    (idx_a, dist_a), (idx_b, dist_b) = ours, ref
    same = np.all(np.sort(idx_a, axis=1) == np.sort(idx_b, axis=1), axis=1)
    ties = bad = 0
    for row in np.flatnonzero(~same):
        boundary = float(dist_b[row, -1])
        close = abs(float(dist_a[row, -1]) - boundary) <= TIE_TOLERANCE
        if close and row_is_tie(queries[row], gallery, idx_a[row], idx_b[row], boundary):
            ties += 1
        else:
            bad += 1
    max_diff = float(np.max(np.abs(dist_a.astype(np.float64) - dist_b))) if dist_a.size else 0.0
    return Agreement(int(same.sum()), ties, bad, max_diff)


def report_agreement(agreement: Agreement, n_q: int) -> bool:
    """Print the agreement; True when it is exact up to ties."""
    log(
        f"agreement: identical top-k sets in {agreement.same_sets}/{n_q} rows "
        f"({100 * agreement.same_sets / n_q:.2f}%), "
        f"{agreement.tie_rows} rows differ only by ties, {agreement.bad_rows} rows disagree"
    )
    log(
        f"agreement: max |distance difference| at equal rank {agreement.max_dist_diff:.2e} (tolerance "
        f"{TIE_TOLERANCE:g})"
    )
    ok = agreement.bad_rows == 0 and agreement.max_dist_diff <= TIE_TOLERANCE
    log(f"agreement: {'OK' if ok else 'FAILED'}")
    return ok


def run_speed(args: argparse.Namespace) -> bool:
    """Agreement check and best-of-N timings at the requested size; True when the neighbours agree."""
    queries, gallery = make_data(args.q, args.g, args.d)
    started = time.perf_counter()
    index = flat_index(gallery)
    add_time = time.perf_counter() - started
    ok = report_agreement(
        compare(queries, gallery, search_lookalike(queries, gallery, args.k), search_faiss(index, queries, args.k)),
        args.q,
    )
    best = best_times(
        {
            "lookalike": lambda: search_lookalike(queries, gallery, args.k),
            "faiss": lambda: index.search(queries, args.k),
        },
        args.repeats,
    )
    log(f"time: lookalike exact_knn (whole call)  best of {args.repeats}: {best['lookalike']:.3f} s")
    log(
        f"time: FAISS IndexFlatIP.search (search only) best of {args.repeats}: {best['faiss']:.3f} s   (add, once: "
        f"{add_time:.3f} s)"
    )
    ratio = best["lookalike"] / best["faiss"]
    log(
        f"time: lookalike / FAISS wall-time ratio = {ratio:.2f}  (target <= {TARGET_RATIO}: "
        f"{'met' if ratio <= TARGET_RATIO else 'NOT met'})"
    )
    return ok


def rss_now() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process's memory map (VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> bool:
    """Set the peak-RSS mark to the current RSS; False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def searcher(side: str, gallery: np.ndarray) -> Callable[[np.ndarray, int], object]:
    """A search over `gallery` by one side; FAISS builds its index (a copy of the gallery) here."""
    if side == "faiss":
        index = flat_index(gallery)
        return lambda queries, k: search_faiss(index, queries, k)
    return lambda queries, k: search_lookalike(queries, gallery, k)


def memory_worker(side: str, n_q: int, n_g: int, d: int, k: int) -> dict[str, int]:
    """In a fresh process: load data, then measure the peak RSS one search adds on top of it."""
    use_all_cores()
    warm_q, warm_g = make_data(8, 1_000, d, seed=SEED + 1)
    searcher(side, warm_g)(warm_q, 10)  # load the libraries' code and thread pools first
    queries, gallery = make_data(n_q, n_g, d)
    loaded = rss_now()
    search = searcher(side, gallery)
    reset = reset_peak_rss()
    before, peak_before = rss_now(), peak_rss()
    search(queries, k)
    return {
        "loaded": loaded,
        "before": before,
        "peak_before": peak_before,
        "peak_after": peak_rss(),
        "reset": int(reset),
    }


def measure(side: str, n_g: int, args: argparse.Namespace) -> dict[str, int]:
    """Run one memory worker in a fresh subprocess and return what it measured."""
    command = [
        sys.executable,
        __file__,
        "--memory-worker",
        str(n_g),
        "--side",
        side,
        "--q",
        str(args.q),
        "--d",
        str(args.d),
        "--k",
        str(args.k),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"bench_search: memory worker {side} G={n_g} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n_bytes: float) -> str:
    """Bytes as MiB, right-aligned."""
    return f"{n_bytes / MIB:9.1f}"


def memory_row(n_g: int, args: argparse.Namespace) -> dict[str, int]:
    """Measure both sides at one gallery size, print their table row, and return each side's extra bytes."""
    runs = {side: measure(side, n_g, args) for side in SIDES}
    extras = {side: run["peak_after"] - run["before"] for side, run in runs.items()}
    for side, run in runs.items():
        if not run["reset"] or run["peak_before"] > run["before"] + 16 * MIB:
            log(
                f"memory: warning: {side} G={n_g:,}: the peak mark was not reset or already above RSS; its extra may "
                "be hidden"
            )
    full, index_size = args.q * n_g * 4, runs["faiss"]["before"] - runs["faiss"]["loaded"]
    log(
        f"memory: {n_g:>9,} {mib(full)} {mib(n_g * args.d * 4)} {mib(extras['lookalike'])} {mib(extras['faiss'])} "
        f"{mib(index_size)} {100 * extras['lookalike'] / full:8.1f}%"
    )
    return extras


def report_growth(side: str, extras: list[int], args: argparse.Namespace) -> None:
    """How much a side's extra memory grows per gallery item, next to a Q x G matrix and a gallery copy."""
    growth, span = extras[-1] - extras[0], MEMORY_GALLERIES[-1] - MEMORY_GALLERIES[0]
    log(
        f"memory: {side}: extra grows by {growth / MIB:.1f} MiB from G={MEMORY_GALLERIES[0]:,} to "
        f"{MEMORY_GALLERIES[-1]:,} "
        f"({growth / span:.0f} B per gallery item; a Q x G float32 matrix is {4 * args.q} B per item, a G x D copy "
        f"{4 * args.d} B)"
    )


def run_memory(args: argparse.Namespace) -> None:
    """Extra peak memory of one search per gallery size, each side in fresh processes."""
    log(
        f"\nmemory: peak RSS during the search minus RSS before it (fresh process each; Q={args.q:,}, D={args.d}, "
        f"K={args.k}), MiB"
    )
    log("memory: FAISS's 'before' already includes its index (the gallery copy made by add, column 'FAISS idx')")
    log(
        f"memory: {'G':>9} {'Q x G f32':>9} {'G x D f32':>9} {'lookalike':>9} {'FAISS':>9} {'FAISS idx':>9} "
        f"{'lk / QxG':>9}"
    )
    rows = [memory_row(n_g, args) for n_g in MEMORY_GALLERIES]
    for side in SIDES:
        report_growth(side, [row[side] for row in rows], args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--q", type=int, default=2_000, help="number of queries")
    parser.add_argument("--g", type=int, default=20_000, help="gallery size for the speed test")
    parser.add_argument("--d", type=int, default=256, help="embedding dimension")
    parser.add_argument("--k", type=int, default=100, help="neighbours per query")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side; the best counts")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-worker", type=int, metavar="G", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, default="lookalike", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one memory worker) and return the exit status."""
    args = parse_args(argv)
    if args.memory_worker is not None:
        print(json.dumps(memory_worker(args.side, args.q, args.memory_worker, args.d, args.k)))
        return 0
    use_all_cores()
    log(f"bench_search: Q={args.q:,} G={args.g:,} D={args.d} K={args.k}, cosine, seed {SEED}, repeats {args.repeats}")
    log(
        f"threads: cores available {n_cores()}, torch.get_num_threads() = {torch.get_num_threads()}, "
        f"faiss.omp_get_max_threads() = {faiss.omp_get_max_threads()}"
    )
    log(f"versions: torch {torch.__version__}, faiss {faiss.__version__}, numpy {np.__version__}")
    ok = run_speed(args)
    if not args.skip_memory:
        run_memory(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
