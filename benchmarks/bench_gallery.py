"""Gallery backends at scale: search latency (p50/p95, one query at a time) and extra memory of FAISS and Milvus Lite.

Run from the repository root with the project's python:

    .venv/bin/python benchmarks/bench_gallery.py [--g 100000 --d 128 --queries 1000 --k 10 --rounds 5]

Data: G seeded random unit vectors (cosine), and held-out queries drawn the same way.
Backends: FAISS IndexFlatIP, FAISS HNSW32 (efSearch 128), Milvus Lite FLAT and HNSW (M 32, ef 128) through
lookalike's MilvusGallery (a .db file in a temporary folder: pymilvus starts Milvus Lite inside this process).
Latency: every backend is built once, then `--rounds` rounds each search a slice of the queries one at a time on
every backend in turn (interleaved, so a change in the machine's load hits all of them alike); p50/p95 over all
queries. FAISS is timed on `index.search`, Milvus on `MilvusGallery.search` (numpy in, RetrievalResults out).
Recall@k is against FAISS's flat search.
Memory: each backend is built again in a fresh subprocess (`--memory-worker NAME`) that first makes the data and
imports every library (the baseline RSS), then builds the index; it reports RSS after the build minus the baseline, and
the peak (VmHWM, from /proc/self/status) minus the baseline. Milvus Lite 3.x runs in this process (pure Python gRPC
server threads over numpy/FAISS), so its extra memory is part of this process's RSS; it also writes the .db folder,
whose size on disk is reported.
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

from lookalike.search.milvus import MilvusGallery

SEED = 0
BACKENDS = ("faiss-flat", "faiss-hnsw32", "milvus-lite-flat", "milvus-lite-hnsw")
MIB = 2**20


def log(message: str = "") -> None:
    """Print one line at once."""
    print(message, flush=True)


def data(g: int, d: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded unit vectors: the gallery [g, d] and held-out queries [q, d]."""
    x = np.random.default_rng(SEED).standard_normal((g + q, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:g], x[g:]


def build(name: str, gallery: np.ndarray, folder: Path):
    """A search function `f(query [1, d], k) -> neighbour ids [k]` over the gallery in backend `name`."""
    if name.startswith("faiss"):
        index = faiss.IndexFlatIP(gallery.shape[1]) if name == "faiss-flat" else _hnsw(gallery.shape[1])
        index.add(gallery)
        return lambda query, k: index.search(query, k)[1][0]
    kind = "FLAT" if name.endswith("flat") else "HNSW"
    params = {} if kind == "FLAT" else {"M": 32, "efConstruction": 200, "ef": 128}
    store = MilvusGallery.connect(str(folder / f"{name}.db"), "bench", gallery.shape[1], "cosine", kind, params)
    store.add(np.arange(len(gallery)).astype(str), gallery)

    def search(query: np.ndarray, k: int) -> np.ndarray:
        found = store.search(query, k)
        return found.gallery_ids[found.indices[0]].astype(np.int64)

    return search


def _hnsw(d: int):
    """FAISS HNSW32 for inner products, efSearch 128 (lookalike's default for HNSW)."""
    index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 128
    return index


def rss_mib() -> tuple[float, float]:
    """This process's current and peak resident memory (VmRSS, VmHWM) in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def memory_worker(name: str, g: int, d: int) -> None:
    """Build one backend in this fresh process; print JSON with its extra RSS and peak over the baseline."""
    gallery, _ = data(g, d, 1)
    with tempfile.TemporaryDirectory() as tmp:
        Path("/proc/self/clear_refs").write_text("5")
        base, _ = rss_mib()
        start = time.perf_counter()
        search = build(name, gallery, Path(tmp))
        seconds = time.perf_counter() - start
        search(gallery[:1], 10)  # a first search: lazily loaded parts are in memory
        now, peak = rss_mib()
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / MIB
        print(json.dumps({"extra": now - base, "peak": peak - base, "build_s": seconds, "disk": disk}))


def latency(g: int, d: int, n_queries: int, k: int, rounds: int, milvus_queries: int) -> dict[str, dict]:
    """Build every backend, then interleaved rounds of single-query searches; per backend p50/p95 (ms) and recall.
    Milvus backends search the first milvus_queries / rounds queries of each round."""
    gallery, queries = data(g, d, n_queries)
    stats: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        searches = {}
        for name in BACKENDS:
            start = time.perf_counter()
            searches[name] = build(name, gallery, Path(tmp))
            log(f"built {name}: {time.perf_counter() - start:.1f} s")
        times = {name: [] for name in BACKENDS}
        found = {name: np.full((n_queries, k), -1, np.int64) for name in BACKENDS}
        share = {name: n_queries if name.startswith("faiss") else milvus_queries for name in BACKENDS}
        for part in np.array_split(np.arange(n_queries), rounds):
            for name in BACKENDS:
                for i in part[: -(-share[name] // rounds)]:
                    start = time.perf_counter()
                    found[name][i] = searches[name](queries[i : i + 1], k)
                    times[name].append(time.perf_counter() - start)
        truth = found["faiss-flat"]
        for name in BACKENDS:
            ms = np.asarray(times[name]) * 1000
            rows = (found[name] >= 0).all(1)
            recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found[name][rows], truth[rows])])
            stats[name] = {
                "queries": int(rows.sum()),
                "p50": float(np.percentile(ms, 50)),
                "p95": float(np.percentile(ms, 95)),
                "recall": recall,
            }
    return stats


def main() -> None:
    """Latency in this process, memory in one fresh subprocess per backend; one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--g", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--milvus-queries", type=int, default=None, help="queries timed on Milvus (default: all)")
    parser.add_argument("--memory-worker", choices=BACKENDS)
    args = parser.parse_args()
    if args.memory_worker:
        return memory_worker(args.memory_worker, args.g, args.d)
    cores = len(os.sched_getaffinity(0))
    log(
        f"G={args.g} D={args.d} queries={args.queries} k={args.k} rounds={args.rounds}; {cores} cores, load average "
        f"{os.getloadavg()[0]:.2f} at start; faiss {faiss.__version__}"
    )
    stats = latency(args.g, args.d, args.queries, args.k, args.rounds, args.milvus_queries or args.queries)
    for name in BACKENDS:  # the latency now: the memory runs that follow rebuild every backend (minutes)
        s = stats[name]
        log(f"{name}: {s['queries']} queries, p50 {s['p50']:.2f} ms, p95 {s['p95']:.2f} ms, recall {s['recall']:.3f}")
    for name in BACKENDS:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-worker", name, "--g", str(args.g), "--d", str(args.d)],
            capture_output=True,
            text=True,
            check=True,
        )
        stats[name].update(json.loads(out.stdout.strip().splitlines()[-1]))
    log(f"load average {os.getloadavg()[0]:.2f} at end")
    log(
        "| backend | queries timed | p50 ms | p95 ms | recall vs flat | build s | extra RSS MiB | peak MiB | disk MiB |"
    )
    log("|---|---|---|---|---|---|---|---|---|")
    for name in BACKENDS:
        s = stats[name]
        log(
            f"| {name} | {s['queries']} | {s['p50']:.2f} | {s['p95']:.2f} | {s['recall']:.3f} | {s['build_s']:.1f} | "
            f"{s['extra']:.0f} | {s['peak']:.0f} | {s['disk']:.0f} |"
        )


if __name__ == "__main__":
    main()
