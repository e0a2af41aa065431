"""The plan for 100 million images: every number computed from figures measured on this machine by this script.

Run from the repository root with the project's python (a few minutes):

    .venv/bin/python benchmarks/scaling_plan.py [--images 100000000 --model resnet50 --image-size 224]

It prints the markdown of docs/scaling.md's tables. Measured here:
- the shipped backbone (config default model.name=resnet50, data.image_size=224) as lookalike's Extractor
  (pretrained=False: the same FLOPs as the trained weights): images/s on one CPU core (torch.set_num_threads(1),
  a batch of --batch random images, forward pass only: decoding and resizing are not counted) and FLOPs per image
  counted by torch.utils.flop_counter (2 FLOPs per multiply-add);
- bytes per vector of FAISS indexes at the extractor's dimension (fp32, fp16) and at 512 (all four), from the growth
  of their serialized size from 2,000 to 6,000 vectors: Flat (fp32), SQfp16, HNSW32 (fp32 + graph), IVF-PQ with one
  byte per 8 dimensions (+ the 8-byte id IVF lists keep) - training quality does not change the bytes, so PQ is
  trained briefly;
- IVF-PQ scan speed: nanoseconds per code of one query scanning every list of an IVF64,PQ64 index (FAISS runs one
  thread throughout: per-core figures, and OpenMP's spinning threads crawl on a shared, loaded machine);
- re-ranker cost per query at G = 3k, 10k, 30k, 100k (--galleries) (D=128 synthetic clustered unit vectors,
  --queries queries, top --candidates re-ranked): the first call (builds what a gallery needs: gallery k-NN lists,
  centroids) and a second call with the same context (per-query work only), each divided by the queries; a power
  law a * G^b fitted to each gives the growth exponent b.
Assumed (stated in the output): the GPU's dense fp16 throughput from its public spec and a utilisation, the memory of a
Milvus query node and the share of it given to the index, the IVF lists and nprobe at 100M.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import faiss
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from lookalike.core.embeddings import Embeddings
from lookalike.models.extractor import Extractor
from lookalike.rerank import RerankContext, create_reranker
from lookalike.search import exact_knn, search
from lookalike.search.centroids import gallery_centroids

SEED = 0
GALLERIES = (3_000, 10_000, 30_000, 100_000)  # the re-rankers' cost per query at each, and its growth exponent
RERANKERS = ("kreciprocal", "qe", "dba", "icfrr", "centroids")
A100_FP16_DENSE = 312e12  # FLOP/s, NVIDIA A100 datasheet (dense fp16/bf16 tensor core, no sparsity)
GIB = 2**30


def log(message: str = "") -> None:
    """Print one line at once."""
    print(message, flush=True)


# ---------------------------------------------------------------- measured here


def backbone(model: str, image_size: int, batch: int) -> dict[str, float]:
    """Images/s on one core and FLOPs per image of lookalike's extractor for `model` at `image_size`."""
    torch.set_num_threads(1)
    extractor = Extractor(model, pretrained=False, image_size=image_size).eval()
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        extractor(images[:1])  # warm-up: first-call allocations are not counted
        with FlopCounterMode(display=False) as counter:
            extractor(images[:1])
        start = time.perf_counter()
        extractor(images)
        seconds = time.perf_counter() - start
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return {"dim": extractor.dim, "flops": float(counter.get_total_flops()), "per_core": batch / seconds}


def index_bytes(d: int, full: bool, n: tuple[int, int] = (2_000, 6_000)) -> dict[str, float]:
    """Bytes each added vector costs in FAISS formats at dimension d: the serialized size's growth from n[0] to n[1]
    seeded vectors (fixed parts such as IVF centroids left out: at 100M they are a rounding error); HNSW and IVF-PQ
    only when `full` (their training and graph cost minutes at D=2048 on a loaded machine)."""
    x = np.random.default_rng(SEED).standard_normal((n[1], d)).astype(np.float32)
    faiss.normalize_L2(x)
    formats = {"fp32 (Flat)": "Flat", "fp16 (SQfp16)": "SQfp16"}
    formats |= {"HNSW32 fp32": "HNSW32", f"IVF-PQ{d // 8} (+ id)": f"IVF64,PQ{d // 8}"} if full else {}
    sizes = {}
    for name, factory in formats.items():
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if factory.startswith("IVF"):
            faiss.downcast_index(faiss.extract_index_ivf(index)).pq.cp.niter = 2  # the bytes are measured, not quality
        index.train(x[:2048])
        index.add(x[: n[0]])
        first = faiss.serialize_index(index).nbytes
        index.add(x[n[0] :])
        sizes[name] = (faiss.serialize_index(index).nbytes - first) / (n[1] - n[0])
    return sizes


def pq_scan(d: int = 128, n: int = 20_000, queries: int = 20) -> float:
    """Nanoseconds per PQ code when one query scans all lists of an IVF64,PQ64 index (one thread)."""
    x = np.random.default_rng(SEED).standard_normal((n, d)).astype(np.float32)
    index = faiss.index_factory(d, "IVF64,PQ64", faiss.METRIC_INNER_PRODUCT)
    faiss.downcast_index(faiss.extract_index_ivf(index)).pq.cp.niter = 2
    index.train(x[:4096])
    index.add(x)
    index.nprobe = 64
    start = time.perf_counter()
    for q in x[:queries]:
        index.search(q[None], 10)
    seconds = (time.perf_counter() - start) / queries
    return seconds / n * 1e9


def clustered(n: int, d: int, labels_of: int, rng: np.random.Generator, centres: np.ndarray) -> tuple:
    """n unit vectors around `centres` and their cluster labels."""
    labels = rng.integers(0, labels_of, n)
    x = centres[labels] + (0.8 / math.sqrt(d)) * rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def rerank_costs(g: int, queries: int, candidates: int, d: int = 128) -> dict[str, tuple[float, float]]:
    """Per re-ranker (first call, repeat call) seconds per query over a gallery of g synthetic vectors."""
    rng = np.random.default_rng(SEED)
    n_labels = max(1, g // 20)
    centres = rng.standard_normal((n_labels, d), dtype=np.float32)
    q, _ = clustered(queries, d, n_labels, rng, centres)
    x, labels = clustered(g, d, n_labels, rng, centres)
    qe, ge = Embeddings(q, np.arange(queries).astype(str)), Embeddings(x, np.arange(g).astype(str))
    results = search(qe, ge, k=candidates)
    costs = {}
    for name in RERANKERS:
        context, times = RerankContext(queries=qe, gallery=ge), []
        for _ in range(2):
            start = time.perf_counter()
            if name == "centroids":  # gallery -> one centroid per label (once), queries searched against them
                if "centroids" not in context.cache:
                    context.cache["centroids"] = gallery_centroids(ge, labels)
                exact_knn(q, context.cache["centroids"].embeddings.vectors, min(candidates, n_labels))
            else:
                create_reranker(name).rerank(results, context)
            times.append((time.perf_counter() - start) / queries)
        costs[name] = (times[0], times[1])
    return costs


def growth(sizes: tuple[int, ...], costs: list[float]) -> tuple[float, float]:
    """(a, b) of the least-squares fit cost = a * G^b in log-log space."""
    b, log_a = np.polyfit(np.log(sizes), np.log(costs), 1)
    return float(np.exp(log_a)), float(b)


# ---------------------------------------------------------------- the plan


def fmt(x: float, digits: int = 3) -> str:
    """A number with `digits` significant digits, thousands separated."""
    if x == 0:
        return "0"
    places = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:,.{places}f}"


def embed_table(m: dict, images: int, utilisation: float) -> list[str]:
    """Markdown: GPU-hours and CPU core-hours to embed `images`."""
    gpu_rate = A100_FP16_DENSE * utilisation / m["flops"]
    gpu_hours = images / gpu_rate / 3600
    core_hours = images / m["per_core"] / 3600
    return [
        "| quantity | value | from |",
        "|---|---|---|",
        f"| FLOPs per image | {m['flops'] / 1e9:.2f} GFLOPs | measured (torch.utils.flop_counter) |",
        f"| images/s per CPU core | {m['per_core']:.2f} | measured (one core, forward only) |",
        f"| A100 images/s | {fmt(gpu_rate)} | 312 TFLOP/s fp16 dense x {utilisation:.0%} utilisation / FLOPs "
        "per image |",
        f"| A100 GPU-hours for {images:,} images | {fmt(gpu_hours)} | images / A100 images/s |",
        f"| wall-clock on 8 A100s | {fmt(gpu_hours / 8)} h | GPU-hours / 8 (Lightning predict over 8 devices) |",
        f"| CPU core-hours instead | {fmt(core_hours)} | images / images/s per core |",
        "| decode + resize (not counted above) | CPU work per image | must keep up: data.num_workers per GPU |",
    ]


def memory_table(sizes: dict[int, dict[str, float]], images: int, node_gib: float, share: float) -> list[str]:
    """Markdown: bytes per vector and index memory at `images`, with Milvus query nodes of `node_gib`."""
    lines = [
        f"| format | D | bytes/vector (measured) | index at {images / 1e6:,.0f}M | Milvus query nodes "
        f"({node_gib:.0f} GiB, {share:.0%} for the index) |",
        "|---|---|---|---|---|",
    ]
    for d, per in sizes.items():
        for name, b in per.items():
            total = b * images / GIB
            lines.append(f"| {name} | {d} | {b:.1f} | {fmt(total)} GiB | {math.ceil(total / (node_gib * share))} |")
    return lines


def latency_table(m: dict, scan_ns: float, costs: dict, fits: dict, args: argparse.Namespace, d: int) -> list[str]:
    """Markdown: the per-query latency budget with each re-ranker, at 100M over the Milvus query nodes."""
    embed_gpu_ms = m["flops"] / (A100_FP16_DENSE * args.utilisation) * 1e3
    embed_cpu_ms = 1e3 / m["per_core"]
    codes = args.images * args.nprobe / args.nlist
    coarse_ms = args.nlist * d * 2 / 20e9 * 1e3  # one query against the coarse centroids at ~20 GFLOP/s (one core)
    scan_ms = codes * scan_ns / 1e6 / args.nodes
    base = embed_gpu_ms + coarse_ms + scan_ms
    galleries = sorted(costs)
    g = galleries[-1]
    lines = [
        f"IVF{args.nlist},PQ at {args.images / 1e6:,.0f}M, nprobe {args.nprobe}: {fmt(codes)} codes scanned per query, "
        f"split over {args.nodes} query nodes; PQ scan {scan_ns:.2f} ns/code measured on one core.",
        "",
        "| step | ms per query | from |",
        "|---|---|---|",
        f"| embed the query (A100) | {embed_gpu_ms:.2f} | FLOPs per image / (312 TFLOP/s x {args.utilisation:.0%}) |",
        f"| embed the query (one CPU core instead) | {fmt(embed_cpu_ms)} | 1 / images/s per core |",
        f"| coarse quantizer | {coarse_ms:.3f} | {args.nlist} centroids x D={d} at 20 GFLOP/s |",
        f"| IVF-PQ scan | {fmt(scan_ms)} | codes x ns/code / query nodes |",
        f"| **search total (GPU embed)** | **{fmt(base)}** | |",
    ]
    lines += [
        "",
        f"Re-rankers (top {args.candidates} candidates; per query, measured at G = {g:,}; b = growth exponent of the "
        "cost in G, fitted over G = " + ", ".join(f"{x:,}" for x in galleries) + "):",
        "",
        "| re-ranker | first call ms/query (builds gallery side) | b | repeat ms/query | b | budget with it (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name in RERANKERS:
        cold, warm = costs[g][name]
        lines.append(
            f"| {name} | {fmt(cold * 1e3)} | {fits[name][0][1]:.2f} | {fmt(warm * 1e3)} | {fits[name][1][1]:.2f} | "
            f"{fmt(base + warm * 1e3)} |"
        )
    return lines


def main() -> None:
    """Measure, then print the plan's tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000_000)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--utilisation", type=float, default=0.4, help="share of the GPU's dense fp16 peak reached")
    parser.add_argument("--node-gib", type=float, default=64.0, help="memory of one Milvus query node")
    parser.add_argument("--share", type=float, default=0.5, help="share of a node's memory the index may use")
    parser.add_argument("--nlist", type=int, default=65_536)
    parser.add_argument("--nprobe", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=4, help="query nodes the scan is split over")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--galleries", type=int, nargs="+", default=list(GALLERIES))
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)  # OpenMP's spinning threads crawl on a shared, loaded machine; one core is measured
    galleries = tuple(args.galleries)
    log(
        f"scaling_plan: {len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.2f} at start; "
        f"torch {torch.__version__}, faiss {faiss.__version__}"
    )
    m = backbone(args.model, args.image_size, args.batch)
    log(
        f"{args.model} at {args.image_size}: D={m['dim']}, {m['flops'] / 1e9:.2f} GFLOPs/image, "
        f"{m['per_core']:.2f} img/s/core"
    )
    sizes = {d: index_bytes(d, d == 512) for d in sorted({m["dim"], 512})}
    log(f"bytes per vector: {sizes}")
    scan_ns = pq_scan()
    log(f"IVF-PQ scan: {scan_ns:.2f} ns per code")
    costs = {}
    for g in galleries:
        start = time.perf_counter()
        costs[g] = rerank_costs(g, args.queries, args.candidates)
        log(f"re-rankers at G={g:,}: {time.perf_counter() - start:.1f} s")
    fits = {name: [growth(galleries, [costs[g][name][i] for g in galleries]) for i in (0, 1)] for name in RERANKERS}
    pq_d = 512 if 512 in sizes else m["dim"]
    log(f"load average {os.getloadavg()[0]:.2f} at the end\n")
    log(f"### Embedding {args.images:,} images ({args.model} at {args.image_size} px)\n")
    log("\n".join(embed_table(m, args.images, args.utilisation)) + "\n")
    log(f"### Index memory at {args.images:,} vectors\n")
    log("\n".join(memory_table(sizes, args.images, args.node_gib, args.share)) + "\n")
    log(f"### Query latency budget (D={pq_d})\n")
    log("\n".join(latency_table(m, scan_ns, costs, fits, args, pq_d)))
    log("\nRe-ranker cost per query (ms; first call / repeat) by gallery size:\n")
    log("| re-ranker | " + " | ".join(f"G = {g:,}" for g in galleries) + " |")
    log("|---|" + "---|" * len(galleries))
    for name in RERANKERS:
        log(
            f"| {name} | "
            + " | ".join(f"{fmt(costs[g][name][0] * 1e3)} / {fmt(costs[g][name][1] * 1e3)}" for g in galleries)
            + " |"
        )


if __name__ == "__main__":
    main()
