"""Latency of the web app under concurrent load: `lookalike serve` over HTTP vs the same searches in-process.

Run from the repository root with the project's python:

    .venv/bin/python benchmarks/bench_serve.py [--requests 200] [--concurrency 16] [--weights CKPT] [--rerankers qe]

Builds an index of the Omniglot validation split (820 images, ResNet-18 at 64 px: untrained, or --weights a
checkpoint of configs/omniglot.yaml) in .bench-cache/bench_serve, starts `lookalike serve` on a loopback port, and
sends --requests POST /search from a bounded pool of --concurrency threads (every other request uploads an image,
the others pick a gallery item; k=10). The peer is the same work without the web layer: the same requests run
one after another in this process through GalleryIndex (decode, embed, search, re-rank). Prints p50 / p95 / max
latency, throughput, and the ratio of HTTP p50 to the in-process p50. Exits non-zero when any request fails.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from lookalike.data.bundled import OMNIGLOT_ZIP

from bench_metrics import ROOT, log

DATA_ZIP = OMNIGLOT_ZIP
CACHE = ROOT / ".bench-cache" / "bench_serve"
LOOKALIKE = str(Path(sys.executable).parent / "lookalike")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at most (default 16)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--weights", help="extractor checkpoint (configs/omniglot.yaml's model); default: untrained")
    parser.add_argument("--rerankers", default="", help="comma-separated re-rankers applied to every third request, e.g. qe")
    return parser.parse_args()


def build(args: argparse.Namespace) -> Path:
    """Unzip Omniglot, write its table, and build the index with the omniglot config."""
    from lookalike.config import load_config
    from lookalike.data.folder import import_folder
    from lookalike.pipeline import extractor_from_config, table_from_config
    from lookalike.serve import build_index

    images = CACHE / "images"
    if not (images / "images_background_small1").is_dir():
        with zipfile.ZipFile(DATA_ZIP) as zipped:
            zipped.extractall(images)
    table = CACHE / "table.csv"
    import_folder(images / "images_background_small1", validation_fraction=0.3, seed=0).save(table)
    rerank = f"rerank=[{args.rerankers}]" if args.rerankers else "rerank=[]"
    overrides = [f"data.table={table}", f"serve.index_dir={CACHE / 'index'}", "serve.gallery=validation", rerank]
    overrides += [f"model.weights={args.weights}"] if args.weights else []
    cfg = load_config(ROOT / "configs" / "omniglot.yaml", overrides)
    return build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))


def requests_for(args: argparse.Namespace, paths: np.ndarray) -> list[dict]:
    """The request mix: uploads and gallery picks alternate; every third request also re-ranks."""
    names = [n for n in args.rerankers.split(",") if n]
    out = []
    for i in range(args.requests):
        request = {"k": args.k, "rerankers": names if i % 3 == 0 else []}
        if i % 2:
            request["upload"] = Path(paths[i % len(paths)]).read_bytes()
        else:
            request["gallery_id"] = (7 * i) % len(paths)
        out.append(request)
    return out


def over_http(client: httpx.Client, base: str, request: dict) -> tuple[int, float]:
    """One POST /search on the shared keep-alive client; its status and seconds."""
    files = {"file": ("q.png", request["upload"], "image/png")} if "upload" in request else None
    data = {"k": request["k"], "rerankers": request["rerankers"]} | ({"gallery_id": request["gallery_id"]} if "gallery_id" in request else {})
    started = time.perf_counter()
    status = client.post(f"{base}/search", files=files, data=data).status_code
    return status, time.perf_counter() - started


def in_process(index, request: dict, max_bytes: int, max_pixels: int) -> float:
    """The same search without HTTP; its seconds."""
    from lookalike.serve import decode_upload

    started = time.perf_counter()
    if "upload" in request:
        vector, own = index.embed(decode_upload(request["upload"], max_bytes, max_pixels)), None
    else:
        vector, own = index.gallery.vectors[request["gallery_id"]], request["gallery_id"]
    index.search(vector, request["k"], request["rerankers"], gallery_position=own)
    return time.perf_counter() - started


def start_server(folder: Path) -> tuple[subprocess.Popen, str, float]:
    """`lookalike serve` on a free port; the process, its URL and the seconds until /health answered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    process = subprocess.Popen([LOOKALIKE, "serve", str(folder), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return process, base, time.perf_counter() - started
        except httpx.TransportError:
            if process.poll() is not None:
                sys.exit("bench_serve: lookalike serve exited")
            time.sleep(0.2)


def summary(name: str, seconds: list[float], wall: float) -> float:
    """Log p50 / p95 / max and throughput; return p50 in ms."""
    ms = np.array(seconds) * 1000
    p50, p95 = np.percentile(ms, 50), np.percentile(ms, 95)
    log(f"{name:<11} p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  max {ms.max():7.1f} ms  {len(ms) / wall:6.1f} searches/s")
    return float(p50)


def main() -> int:
    """Build, serve, load, compare; non-zero when a request fails."""
    from lookalike.serve import load_index

    args = parse_args()
    folder = build(args)
    index = load_index(folder)
    serve = index.settings["serve"]
    requests = requests_for(args, index.paths)
    log(f"bench_serve: {len(index)} gallery images, {index.settings['model']['name']} "
        f"({'trained: ' + args.weights if args.weights else 'untrained'}), {args.requests} requests, "
        f"{args.concurrency} in flight, k={args.k}, re-rankers on every third: {args.rerankers or 'none'}")
    process, base, startup = start_server(folder)
    log(f"server start (process launch to first /health): {startup:.1f} s")
    try:
        started = time.perf_counter()
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        with httpx.Client(timeout=300, limits=limits) as client, ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            answers = list(pool.map(lambda r: over_http(client, base, r), requests))
        wall = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=30)
    failed = sum(status != 200 for status, _ in answers)
    log(f"HTTP: {len(answers) - failed}/{len(answers)} succeeded")
    http_p50 = summary("HTTP", [s for _, s in answers], wall)
    started = time.perf_counter()
    local = [in_process(index, r, int(serve["max_upload_mb"] * 1_000_000), int(serve["max_pixels"])) for r in requests]
    local_p50 = summary("in-process", local, time.perf_counter() - started)
    log(f"ratio HTTP p50 / in-process p50: {http_p50 / local_p50:.1f} (HTTP requests wait in a queue of up to "
        f"{args.concurrency}; searches run one at a time)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
