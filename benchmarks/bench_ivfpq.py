"""IVF-PQ over 1M vectors built from shards (lookalike) vs FAISS built in one go from the full in-memory array.

Run from the repository root with the project's python:

    .venv/bin/python benchmarks/bench_ivfpq.py [--n 1000000 --d 128 --factory IVF1024,PQ32 --train-size 65536]

Data: N seeded clustered vectors (4,096 Gaussian centres, noise 0.6 per coordinate, so each vector has real nearest
neighbours and recall is meaningful), written as lookalike shard files of 50,000 rows (streamed: the writer never
holds more than one shard), and 1,000 held-out queries drawn the same way. Cosine.
Sides, each in a fresh subprocess (`--worker NAME`) whose peak is VmHWM from /proc/self/status:
- lookalike: `build_faiss_from_shards(folder, factory, train_size=...)` (sample, then add shard by shard);
- faiss-one-go (the peer): the shards concatenated into one float32 array [N, D] (what a build without shards needs),
  then `FaissIndex(factory).add(array)`: FAISS trains on the full array (its k-means subsamples 256 points per list)
  and adds everything at once.
Build time excludes reading the data; peak RSS includes it (holding the data is the cost being compared). Index bytes
are the serialized index. FAISS runs one OpenMP thread per side (`--threads`): on a shared, loaded machine OpenMP's
spinning threads made PQ training 6x slower with two. Recall@k is against exact cosine search over all N vectors
(streamed over the shards).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from lookalike.search import FaissIndex, build_faiss_from_shards
from lookalike.shards import Manifest, iter_shards, prepare_folder, write_shard

SEED, CENTRES, NOISE, SHARD = 0, 4096, 0.6, 50_000
SIDES = ("lookalike-shards", "faiss-one-go")
MIB = 2**20


def log(message: str = "") -> None:
    """Print one line at once."""
    print(message, flush=True)


def draw(n: int, d: int, seed: int) -> np.ndarray:
    """n clustered vectors around the benchmark's fixed centres, from their own seed."""
    centres = np.random.default_rng(SEED).standard_normal((CENTRES, d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return centres[rng.integers(0, CENTRES, n)] + NOISE * rng.standard_normal((n, d)).astype(np.float32)


def write_data(folder: Path, n: int, d: int) -> Path:
    """The N vectors as a shard folder, one shard generated and written at a time."""
    manifest = Manifest(SHARD, n, d, "synthetic", {"seed": SEED})
    folder = prepare_folder(folder, manifest)
    for s in range(manifest.n_shards):
        start, end = manifest.rows(s)
        write_shard(folder, manifest, s, np.arange(start, end).astype(str), draw(end - start, d, SEED + 1 + s))
    return folder


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact(folder: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k positions of every query over all shards, one shard in memory at a time."""
    q = unit(queries)
    best_s, best_i, offset = np.full((len(q), 0), -np.inf, np.float32), np.zeros((len(q), 0), np.int64), 0
    for _, vectors in iter_shards(folder):
        scores = q @ unit(vectors).T
        s = np.concatenate([best_s, scores], 1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(offset, offset + len(vectors)), scores.shape)], 1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
        offset += len(vectors)
    return best_i


def rss_mib() -> tuple[float, float]:
    """This process's current and peak resident memory (VmRSS, VmHWM) in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def worker(side: str, folder: Path, args: argparse.Namespace, out: Path) -> None:
    """Build one side in this fresh process; save its neighbours of the queries, print JSON of time and memory."""
    faiss.omp_set_num_threads(args.threads)
    queries = draw(args.queries, args.d, 10**6)
    base, _ = rss_mib()
    if side == "lookalike-shards":
        start = time.perf_counter()
        index = build_faiss_from_shards(folder, args.factory, train_size=args.train_size, nprobe=args.nprobe)
    else:
        vectors = np.concatenate([v for _, v in iter_shards(folder)])
        start = time.perf_counter()
        index = FaissIndex(args.factory, nprobe=args.nprobe).add(vectors)
    seconds = time.perf_counter() - start
    found, _ = index.search(queries, args.k)
    np.save(out, found)
    _, peak = rss_mib()
    size = faiss.serialize_index(index.index).nbytes
    print(json.dumps({"build_s": seconds, "peak": peak, "peak_extra": peak - base, "bytes": size}))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k found."""
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def main() -> None:
    """Write the data, the exact answers, then each side in its own process; one table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--factory", default="IVF1024,PQ32")
    parser.add_argument("--train-size", type=int, default=65_536)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads of each side")
    parser.add_argument("--worker", choices=SIDES)
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.folder, args, args.out)
    log(
        f"N={args.n} D={args.d} factory={args.factory} train_size={args.train_size} nprobe={args.nprobe} "
        f"queries={args.queries} k={args.k} threads={args.threads}; {len(os.sched_getaffinity(0))} cores, load average "
        f"{os.getloadavg()[0]:.2f} at start; faiss {faiss.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = write_data(Path(tmp) / "emb.npz.shards", args.n, args.d)
        log(f"wrote {args.n} vectors as shards: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        truth = exact(folder, draw(args.queries, args.d, 10**6), args.k)
        log(f"exact top-{args.k}: {time.perf_counter() - start:.1f} s")
        stats = {}
        for side in SIDES:
            out = Path(tmp) / f"{side}.npy"
            flags = ["--folder", str(folder), "--out", str(out)]
            for name in ("n", "d", "factory", "train_size", "nprobe", "queries", "k", "threads"):
                flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            run = subprocess.run([sys.executable, __file__, "--worker", side, *flags], capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"{side} failed:\n{run.stderr[-2000:]}")
            stats[side] = json.loads(run.stdout.strip().splitlines()[-1]) | {"recall": recall(np.load(out), truth)}
            s = stats[side]
            log(
                f"{side}: build {s['build_s']:.1f} s, peak RSS {s['peak']:.0f} MiB ({s['peak_extra']:.0f} MiB over "
                f"the process before building), index {s['bytes'] / MIB:.1f} MiB, recall@{args.k} {s['recall']:.3f}"
            )
    a, b = stats["lookalike-shards"], stats["faiss-one-go"]
    log(f"vectors as float32: {args.n * args.d * 4 / MIB:.0f} MiB; load average {os.getloadavg()[0]:.2f} at the end")
    log(
        f"ratio lookalike/one-go: build time {a['build_s'] / b['build_s']:.2f}x, "
        f"peak RSS {a['peak'] / b['peak']:.2f}x, extra peak {a['peak_extra'] / b['peak_extra']:.2f}x, "
        f"index bytes {a['bytes'] / b['bytes']:.2f}x, recall {a['recall'] - b['recall']:+.3f}"
    )


if __name__ == "__main__":
    main()
