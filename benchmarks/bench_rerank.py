"""Training-free re-rankers against straightforward dense per-query implementations of the same equations.

Run from the repository root with the project's python:

    .venv/bin/python benchmarks/bench_rerank.py            # agreement + speed, Q=500, G=5,000, D=64 (about 40 s)
    .venv/bin/python benchmarks/bench_rerank.py --scale    # time and peak memory at Q=10,000, G=100,000, D=128 (~5 min)

Data: seeded synthetic clustered unit vectors (queries and gallery drawn from the same clusters, the cluster
is the label). Each re-ranker is one entry of ENTRIES: how to build it for whole lists (exact mode), how to
build it for the scale run, and a peer: a dense implementation written here, one query at a time in numpy.

Agreement and speed: both sides get bitwise-identical distances. lookalike gets the exact search results
with K = G and the gallery embeddings; the peer gets the dense [Q, G] and [G, G] matrices made from the same
search (as the ICFRR reference reads them from its cache). Cold: lookalike builds its gallery neighbour lists
(fresh context; best of --repeats) and the peer its rank matrix, both timed. Warm: lookalike reuses the lists
in its context cache, the peer's loop alone is counted. Exits non-zero when a final ranking differs.
Scale: each entry runs in a fresh subprocess that builds the data, searches the top --candidates, builds the
gallery neighbour lists and re-ranks (each timed apart), and reports its peak RSS (VmHWM from
/proc/self/status: the whole process, data and search included).
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

import numpy as np
import torch

from lookalike.core.embeddings import Embeddings
from lookalike.core.results import RetrievalResults
from lookalike.metrics import compute_metrics
from lookalike.rerank import ICFRR, KReciprocal, RerankContext, Reranker
from lookalike.rerank.icfrr import dense_gallery_distances, dense_query_distances, icfrr_weights, rank_lists
from lookalike.search import search

SEED = 0
CLUSTER_SIZE = 250  # gallery items per cluster on average
NOISE = 1.6  # within-cluster spread (relative to the unit-norm cluster centres): mAP@all about 0.65 before re-ranking
TARGET_PEAK_GB = 8.0
GB = 1e9
TIE_TOLERANCE = 1e-6  # final distances closer than this may come out in either order (float64 rounding differs)


@dataclass(frozen=True)
class Dense:
    """What a peer gets: dense [Q, G] and [G, G] distances from the same search, and the raw vectors."""

    qg: np.ndarray
    gg: np.ndarray
    queries: np.ndarray
    gallery: np.ndarray


@dataclass(frozen=True)
class Entry:
    """One re-ranker in the benchmark; add another as one more item of ENTRIES (with its own command-line
    parameters in parse_args). The peer gets dense [Q, G] and [G, G] distances and returns the final rankings
    [Q, G] and the seconds it spent preparing (what it reuses across queries); prepare, when given, fills the
    context cache before the scale run's re-rank is timed, so that the two are reported apart."""

    exact: Callable[[argparse.Namespace], Reranker]  # re-scores whole lists (K = G): compared with the peer
    scale: Callable[[argparse.Namespace], Reranker]  # the configuration timed at scale
    peer: Callable[[Dense, argparse.Namespace], tuple[np.ndarray, float]]  # dense inputs -> rankings [Q, G], prep s
    about: str  # the parameters, for the log
    prepare: Callable[[RetrievalResults, RerankContext, argparse.Namespace], object] | None = (
        None  # fills the context cache
    )
    target: float | None = None  # the speed-up over the peer the issue asks for, if any


def log(message: str = "") -> None:
    """Print one line at once."""
    print(message, flush=True)


# ---------------------------------------------------------------- ICFRR


def icfrr_peer(dense: Dense, args: argparse.Namespace) -> tuple[np.ndarray, float]:
    """ICFRR as the equations read, query by query on dense matrices: ranks of every gallery item in every
    gallery list (rank -1 for the first), w(rank) per voter row, mean over the top-KQ, re-sort; stable sorts.
    Returns the final rankings [Q, G] and the seconds spent on the rank matrix."""
    qg, gg = dense.qg, dense.gg
    started = time.perf_counter()
    n_gallery = gg.shape[1]
    ranks = np.argsort(np.argsort(gg, axis=1, kind="stable"), axis=1, kind="stable") - 1
    prepared = time.perf_counter() - started
    w = np.zeros(n_gallery)  # w[-1] (rank -1) is w[G-1]: 0
    kg = min(args.kg, n_gallery)
    w[:kg] = icfrr_weights(n_gallery, kg)
    out = np.empty(qg.shape, np.int64)
    for q in range(len(qg)):
        order = np.argsort(qg[q], kind="stable")
        base = -qg[q][order].astype(np.float64)
        for _ in range(args.n_times):
            delta = w[ranks[order[: args.kq]]].mean(axis=0)
            order = order[np.argsort(-(base + args.beta * delta[order]), kind="stable")]
        out[q] = order
    return out, prepared


def icfrr_exact(args: argparse.Namespace) -> Reranker:
    """ICFRR re-scoring the whole list."""
    return ICFRR(kg=args.kg, kq=args.kq, beta=args.beta, n_times=args.n_times, exact=True, distance="search")


def icfrr_scale(args: argparse.Namespace) -> Reranker:
    """ICFRR on the top --candidates of each list."""
    return ICFRR(
        kg=args.kg, kq=args.kq, beta=args.beta, n_times=args.n_times, candidates=args.candidates, distance="search"
    )


# ---------------------------------------------------------------- k-reciprocal


def kreciprocal_peer(dense: Dense, args: argparse.Namespace) -> tuple[np.ndarray, float]:
    """k-reciprocal as the paper's public code computes it: dense (Q+G)^2 distances, one item at a time for the
    reciprocal sets and their expansion, dense V, local query expansion, then per query the Jaccard sums through
    an inverted index of V's non-zeros. Ties in the final distance keep the original order.
    Returns the final rankings [Q, G] and the seconds spent before the per-query Jaccard loop."""
    started = time.perf_counter()
    x = np.concatenate([dense.queries, dense.gallery]).astype(np.float64)
    n_q, n = len(dense.queries), len(dense.queries) + len(dense.gallery)
    sq = (x * x).sum(1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    dist /= dist.max(axis=1, keepdims=True)
    rank = np.argsort(dist, axis=1, kind="stable")
    v = np.zeros((n, n))
    for i in range(n):
        r = _reciprocal(rank, i, args.k1)
        expansion = r
        for c in r:
            rc = _reciprocal(rank, c, round(args.k1 / 2))
            if 3 * len(np.intersect1d(rc, r)) > 2 * len(rc):
                expansion = np.union1d(expansion, rc)
        weight = np.exp(-dist[i, expansion])
        v[i, expansion] = weight / weight.sum()
    if args.k2 > 1:
        v = v[rank[:, : args.k2]].mean(axis=1)
    postings = [np.nonzero(v[n_q:, j])[0] for j in range(n)]  # gallery rows holding column j
    prepared = time.perf_counter() - started
    out = np.empty(dense.qg.shape, np.int64)
    for q in range(n_q):
        shared = np.zeros(n - n_q)
        for j in np.nonzero(v[q])[0]:
            rows = postings[j]
            shared[rows] += np.minimum(v[q, j], v[n_q + rows, j])
        final = (1 - args.lambda_value) * (1.0 - shared / (2.0 - shared)) + args.lambda_value * dist[q, n_q:]
        order = np.argsort(dense.qg[q], kind="stable")
        out[q] = order[np.argsort(final[order], kind="stable")]
    return out, prepared


def _reciprocal(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """R(i, k): the items among i's k + 1 nearest that have i among their k + 1 nearest."""
    forward = rank[i, : k + 1]
    return forward[(rank[forward, : k + 1] == i).any(axis=1)]


ENTRIES: dict[str, Entry] = {
    "icfrr": Entry(
        icfrr_exact,
        icfrr_scale,
        icfrr_peer,
        "KG={a.kg} KQ={a.kq} beta={a.beta} n_times={a.n_times}",
        prepare=lambda results, context, args: rank_lists(results, context, args.kg),
        target=20.0,
    ),
    "kreciprocal": Entry(
        lambda a: KReciprocal(k1=a.k1, k2=a.k2, lambda_value=a.lambda_value),
        lambda a: KReciprocal(k1=a.k1, k2=a.k2, lambda_value=a.lambda_value, candidates=a.candidates),
        kreciprocal_peer,
        "k1={a.k1} k2={a.k2} lambda={a.lambda_value}",
    ),
}


# ---------------------------------------------------------------- data


def clustered(n_q: int, n_g: int, d: int, seed: int = SEED) -> tuple[Embeddings, Embeddings, np.ndarray, np.ndarray]:
    """Seeded query and gallery unit vectors around shared cluster centres, with their cluster labels."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n_g // CLUSTER_SIZE)
    centres = rng.standard_normal((n_clusters, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(n: int, prefix: str) -> tuple[Embeddings, np.ndarray]:
        labels = rng.integers(0, n_clusters, n)
        x = centres[labels] + (NOISE / np.sqrt(d)) * rng.standard_normal((n, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return Embeddings(x, np.char.add(prefix, np.arange(n).astype(str))), labels

    (queries, q_labels), (gallery, g_labels) = draw(n_q, "q"), draw(n_g, "g")
    return queries, gallery, q_labels, g_labels


def map_all(results: RetrievalResults, q_labels: np.ndarray, g_labels: np.ndarray) -> float:
    """mAP@all (OML's definition) of a ranking."""
    return compute_metrics(results, q_labels, g_labels, map_k=(100,)).means["map@all"]


def n_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------- agreement and speed


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def run_exact(name: str, entry: Entry, args: argparse.Namespace) -> bool:
    """Agreement with the peer on whole lists and the wall-time ratios; True when every ranking is identical.

    Cold: lookalike starts from a fresh context, the peer from the dense matrices. Warm (entries with a cache):
    lookalike reuses its gallery neighbour lists, the peer its prepared rank matrix.
    """
    queries, gallery, q_labels, g_labels = clustered(args.q, args.g, args.d)
    results = search(queries, gallery, k=args.g)
    dense = Dense(dense_query_distances(results), dense_gallery_distances(gallery), queries.vectors, gallery.vectors)
    reranker = entry.exact(args)
    cold, ours = best_time(
        lambda: reranker.rerank(results, RerankContext(queries=queries, gallery=gallery)), args.repeats
    )
    started = time.perf_counter()
    peer, peer_prepare = entry.peer(dense, args)
    peer_total = time.perf_counter() - started
    same = np.all(ours.indices == peer, axis=1)
    tied = ~same & orders_agree_up_to_ties(ours, peer)
    log(f"{name}: {entry.about.format(a=args)}, whole lists (K = G = {args.g:,})")
    log(
        f"{name}: identical final rankings in {int(same.sum())}/{args.q} queries, the other {int(tied.sum())} differ "
        "only by "
        f"swaps of items whose distances agree within {TIE_TOLERANCE:g}: {'OK' if (same | tied).all() else 'FAILED'}"
    )
    before, after = map_all(results, q_labels, g_labels), map_all(ours, q_labels, g_labels)
    log(f"{name}: mAP@all {before:.4f} before -> {after:.4f} after")
    log(
        f"{name}: cold: lookalike {cold:.3f} s (best of {args.repeats}), peer {peer_total:.2f} s -> "
        f"{peer_total / cold:.1f}x"
    )
    if entry.prepare is not None:
        warm_context = RerankContext(queries=queries, gallery=gallery)
        reranker.rerank(results, warm_context)
        warm, _ = best_time(lambda: reranker.rerank(results, warm_context), args.repeats)
        log(
            f"{name}: warm (lists cached / rank matrix ready): lookalike {warm:.3f} s (best of {args.repeats}), "
            f"peer {peer_total - peer_prepare:.2f} s -> {(peer_total - peer_prepare) / warm:.1f}x"
        )
    if entry.target is not None:
        ratio = peer_total / cold
        log(
            f"{name}: speed-up (cold) {ratio:.1f}x (target >= {entry.target:g}x: "
            f"{'met' if ratio >= entry.target else 'NOT met'})"
        )
    return bool((same | tied).all())


def orders_agree_up_to_ties(ours: RetrievalResults, peer: np.ndarray) -> np.ndarray:
    """Per query: the peer's ranking also sorts lookalike's distances (within TIE_TOLERANCE, float64 rounding)."""
    by_item = np.empty(ours.distances.shape, np.float64)
    np.put_along_axis(by_item, ours.indices, ours.distances, 1)
    along_peer = np.take_along_axis(by_item, peer, 1)
    return (np.diff(along_peer, axis=1) >= -TIE_TOLERANCE).all(axis=1)


# ---------------------------------------------------------------- scale


def peak_rss() -> int:
    """Peak resident set size of this process (VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def scale_worker(name: str, args: argparse.Namespace) -> dict[str, float]:
    """In a fresh process: data, search the top candidates, re-rank; times and peak memory."""
    torch.set_num_threads(n_cores())
    queries, gallery, q_labels, g_labels = clustered(args.q, args.g, args.d)
    entry, context = ENTRIES[name], RerankContext(queries=queries, gallery=gallery)
    started = time.perf_counter()
    results = search(queries, gallery, k=args.candidates)
    searched = time.perf_counter()
    if entry.prepare is not None:
        entry.prepare(results, context, args)
    prepared = time.perf_counter()
    reranked = entry.scale(args).rerank(results, context)
    done = time.perf_counter()
    return {
        "search_s": searched - started,
        "prepare_s": prepared - searched,
        "rerank_s": done - prepared,
        "peak": peak_rss(),
        "map_before": map_all(results, q_labels, g_labels),
        "map_after": map_all(reranked, q_labels, g_labels),
    }


def run_scale(name: str, entry: Entry, args: argparse.Namespace) -> bool:
    """One entry at scale in a fresh subprocess; True when its peak memory is within the target."""
    command = [
        sys.executable,
        __file__,
        "--scale-worker",
        name,
        "--q",
        str(args.q),
        "--g",
        str(args.g),
        "--d",
        str(args.d),
        "--kg",
        str(args.kg),
        "--kq",
        str(args.kq),
        "--beta",
        str(args.beta),
        "--n-times",
        str(args.n_times),
        "--candidates",
        str(args.candidates),
        "--k1",
        str(args.k1),
        "--k2",
        str(args.k2),
        "--lambda-value",
        str(args.lambda_value),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"bench_rerank: scale worker {name} failed:\n{done.stderr}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    log(f"{name}: {entry.about.format(a=args)}, top {args.candidates:,} candidates per query")
    log(
        f"{name}: search (exact, top {args.candidates:,}) {r['search_s']:.1f} s; gallery neighbour lists "
        f"{r['prepare_s']:.1f} s; "
        f"re-rank {r['rerank_s']:.1f} s; total after the search {r['prepare_s'] + r['rerank_s']:.1f} s"
    )
    log(f"{name}: mAP@all over the top {args.candidates:,}: {r['map_before']:.4f} before -> {r['map_after']:.4f} after")
    ok = r["peak"] / GB <= TARGET_PEAK_GB
    log(
        f"{name}: peak RSS of the whole process {r['peak'] / GB:.2f} GB (target <= {TARGET_PEAK_GB:g} GB: "
        f"{'met' if ok else 'NOT met'})"
    )
    return ok


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --scale switches the sizes to Q=10,000, G=100,000, D=128."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", action="store_true", help="time and peak memory at Q=10,000, G=100,000, D=128")
    parser.add_argument("--only", choices=sorted(ENTRIES), action="append", help="run only these re-rankers")
    parser.add_argument("--q", type=int, help="queries (default 500, or 10,000 with --scale)")
    parser.add_argument("--g", type=int, help="gallery size (default 5,000, or 100,000 with --scale)")
    parser.add_argument("--d", type=int, help="embedding dimension (default 64, or 128 with --scale)")
    parser.add_argument("--kg", type=int, default=256, help="ICFRR: gallery-gallery list length KG")
    parser.add_argument("--kq", type=int, default=250, help="ICFRR: voters KQ")
    parser.add_argument("--beta", type=float, default=0.5, help="ICFRR: beta")
    parser.add_argument("--n-times", type=int, default=5, help="ICFRR: iterations")
    parser.add_argument("--k1", type=int, default=20, help="k-reciprocal: k1")
    parser.add_argument("--k2", type=int, default=6, help="k-reciprocal: k2")
    parser.add_argument("--lambda-value", type=float, default=0.3, help="k-reciprocal: lambda")
    parser.add_argument("--candidates", type=int, default=2000, help="scale run: candidates per query (M)")
    parser.add_argument("--repeats", type=int, default=3, help="timed lookalike runs; the best counts")
    parser.add_argument("--scale-worker", choices=sorted(ENTRIES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = (10_000, 100_000, 128) if args.scale or args.scale_worker else (500, 5_000, 64)
    args.q, args.g, args.d = (v if v is not None else s for v, s in zip((args.q, args.g, args.d), sizes))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one scale worker) and return the exit status."""
    args = parse_args(argv)
    if args.scale_worker:
        print(json.dumps(scale_worker(args.scale_worker, args)))
        return 0
    torch.set_num_threads(n_cores())
    names = args.only or list(ENTRIES)
    log(
        f"bench_rerank: Q={args.q:,} G={args.g:,} D={args.d}, {max(1, args.g // CLUSTER_SIZE)} clusters, cosine, seed "
        f"{SEED}; "
        f"{n_cores()} cores; torch {torch.__version__}, numpy {np.__version__}"
    )
    run = run_scale if args.scale else run_exact
    ok = [run(name, ENTRIES[name], args) for name in names]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
