"""Latency of the web app under concurrent load: `lookalike serve` over HTTP vs the same searches in-process.

Run from the repository root with the project's python:

    .venv/bin/python benchmarks/bench_serve.py [--requests 200] [--concurrency 16] [--weights CKPT] [--rerankers qe]

Builds an index of the Omniglot validation split (820 images, ResNet-18 at 64 px: untrained, or --weights a
checkpoint of configs/omniglot.yaml) in .bench-cache/bench_serve, starts `lookalike serve` on a loopback port, and
sends --requests POST /search from a bounded pool of --concurrency threads (every other request uploads an image,
the others pick a gallery item; k=10). The peer is the same work without the web layer: the same requests run
one after another in this process through GalleryIndex (decode, embed, search, re-rank). Prints p50 / p95 / max
latency, throughput, and the ratio of HTTP p50 to the in-process p50.

Then the attacks of issue 14 against the same server: --bursts bursts of --burst-size concurrent searches (the
server's RSS after each), a 1 x 200,000 PNG, one request naming a re-ranker 998 times, a chunked 300 MB upload
(bytes sent before the answer), and --slow-clients connections that send part of a request and stall (seconds
until the server has closed them all, and a normal search meanwhile). Prints the server's peak RSS (VmHWM).
Exits non-zero when a normal request fails or an attack is not refused.
"""

from __future__ import annotations

import argparse
import resource
import select
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench_metrics import ROOT, log
from lookalike.data.bundled import OMNIGLOT_ZIP

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
    parser.add_argument(
        "--rerankers", default="", help="comma-separated re-rankers applied to every third request, e.g. qe"
    )
    parser.add_argument(
        "--bursts", type=int, default=5, help="bursts of concurrent searches, RSS after each (default 5)"
    )
    parser.add_argument("--burst-size", type=int, default=250, help="concurrent searches per burst (default 250)")
    parser.add_argument("--slow-clients", type=int, default=1100, help="stalled connections (default 1100)")
    parser.add_argument("--chunked-mb", type=int, default=300, help="size of the chunked upload attack (default 300)")
    parser.add_argument(
        "--no-attacks",
        action="store_true",
        help="only the bursts (e.g. against an older server: its tall-image attack allocates tens of GB)",
    )
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
    # kreciprocal for the attack
    rerank = f"rerank=[{', '.join(dict.fromkeys(['kreciprocal', *filter(None, args.rerankers.split(','))]))}]"
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
    data = {"k": request["k"], "rerankers": request["rerankers"]} | (
        {"gallery_id": request["gallery_id"]} if "gallery_id" in request else {}
    )
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
    process = subprocess.Popen(
        [LOOKALIKE, "serve", str(folder), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return process, base, time.perf_counter() - started
        except httpx.TransportError:
            if process.poll() is not None:
                sys.exit("bench_serve: lookalike serve exited")
            time.sleep(0.2)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (VmRSS) or its peak (VmHWM) in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bursts(args: argparse.Namespace, base: str, requests: list[dict], pid: int) -> list[float]:
    """--bursts bursts of --burst-size searches all in flight at once; the server's RSS (MB) after each."""
    after = []
    limits = httpx.Limits(max_connections=args.burst_size, max_keepalive_connections=0)
    for burst in range(args.bursts):
        with (
            httpx.Client(timeout=300, limits=limits) as client,
            ThreadPoolExecutor(max_workers=args.burst_size) as pool,
        ):
            batch = [requests[(burst * args.burst_size + i) % len(requests)] for i in range(args.burst_size)]
            codes = [status for status, _ in pool.map(lambda r: over_http(client, base, r), batch)]
        after.append(rss_mb(pid))
        log(
            f"burst {burst + 1}: {codes.count(200)}/{len(codes)} succeeded ({sorted(set(codes))}), server RSS "
            f"{after[-1]:,.0f} MB"
        )
    return after


def png_bytes(width: int, height: int) -> bytes:
    """A valid all-black grey PNG of width x height, compressed row block by row block (1 x 200,000 is 467 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, rows = zlib.compressobj(9), b"\0" * ((width + 1) * min(height, 1 << 16))
    pixels = b"".join(
        packer.compress(rows[: (width + 1) * min(1 << 16, height - top)]) for top in range(0, height, 1 << 16)
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels + packer.flush()) + chunk(b"IEND", b"")


def attack(name: str, base: str, pid: int, **request) -> bool:
    """One hostile POST /search: its status, seconds, answer size and the server's RSS after; True when refused."""
    started = time.perf_counter()
    response = httpx.post(f"{base}/search", timeout=600, **request)
    seconds = time.perf_counter() - started
    log(
        f"{name:<28} {response.status_code} in {seconds:6.2f} s, {len(response.content):,} bytes answered, "
        f"server RSS {rss_mb(pid):,.0f} MB: {response.json().get('detail', '')[:110]}"
    )
    return 400 <= response.status_code < 500


def chunked_upload(base: str, megabytes: int) -> bool:
    """A multipart upload sent chunked (no Content-Length) of `megabytes`; logs how much was sent before the answer."""
    host, port = base.removeprefix("http://").split(":")
    body_head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
    piece = b"\0" * (1 << 16)
    sent, started = 0, time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(
            f"POST /search HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        try:  # chunks until the server answers or hangs up
            for data in [body_head] + [piece] * (megabytes * 1_000_000 // len(piece)):
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                sent += len(data)
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    status = answer.split(b" ", 2)[1].decode() if answer else "none"
    detail = answer.split(b"\r\n\r\n", 1)[-1][:110].decode(errors="replace")
    log(
        f"chunked {megabytes} MB upload: {status} after {sent / 1e6:,.1f} MB sent, {time.perf_counter() - started:.2f} "
        f"s: {detail}"
    )
    return status == "413"


def slow_clients(base: str, count: int, requests: list[dict]) -> bool:
    """`count` connections that send headers and part of a body, then stall; a normal search meanwhile; the seconds
    until the server has closed every stalled connection (max 120 s)."""
    host, port = base.removeprefix("http://").split(":")
    socks = []
    started = time.perf_counter()
    for i in range(count):
        sock = socket.create_connection((host, int(port)))
        if i % 2:  # half stall inside the body, half inside the headers
            sock.sendall(
                f"POST /search HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                "Content-Length: 100000\r\n\r\n--b\r\n".encode()
            )
        else:
            sock.sendall(f"POST /search HTTP/1.1\r\nHost: {host}\r\n".encode())
        socks.append(sock)
    t0 = time.perf_counter()
    status, seconds = over_http(httpx.Client(timeout=120), base, requests[1])
    log(f"{count} stalled connections opened in {t0 - started:.1f} s; a search meanwhile: {status} in {seconds:.2f} s")
    for sock in socks:
        sock.settimeout(max(0.1, 120 - (time.perf_counter() - t0)))
    closed = 0
    for sock in socks:
        try:
            while sock.recv(65536):
                pass
            closed += 1
        except (TimeoutError, ConnectionResetError):
            closed += isinstance(sys.exc_info()[1], ConnectionResetError)
        sock.close()
    log(f"slow clients: {closed}/{count} closed by the server within {time.perf_counter() - t0:.1f} s of opening")
    return closed == count and status == 200


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
    serve = index.manifest.serve
    requests = requests_for(args, index.paths)
    log(
        f"bench_serve: {len(index)} gallery images, {index.manifest.model.name} "
        f"({'trained: ' + args.weights if args.weights else 'untrained'}), {args.requests} requests, "
        f"{args.concurrency} in flight, k={args.k}, re-rankers on every third: {args.rerankers or 'none'}"
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # room for the slow clients, here and in the server
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.slow_clients + 1024)), hard))
    process, base, startup = start_server(folder)
    log(f"server start (process launch to first /health): {startup:.1f} s, RSS {rss_mb(process.pid):,.0f} MB")
    try:
        started = time.perf_counter()
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        with (
            httpx.Client(timeout=300, limits=limits) as client,
            ThreadPoolExecutor(max_workers=args.concurrency) as pool,
        ):
            answers = list(pool.map(lambda r: over_http(client, base, r), requests))
        wall = time.perf_counter() - started
        refused = attacks(args, base, process.pid, requests)
        log(f"server peak RSS (VmHWM): {rss_mb(process.pid, 'VmHWM'):,.0f} MB")
    finally:
        process.terminate()
        process.wait(timeout=30)
    failed = sum(status != 200 for status, _ in answers)
    log(f"HTTP: {len(answers) - failed}/{len(answers)} succeeded")
    http_p50 = summary("HTTP", [s for _, s in answers], wall)
    started = time.perf_counter()
    local = [in_process(index, r, int(serve.max_upload_mb * 1_000_000), serve.max_pixels) for r in requests]
    local_p50 = summary("in-process", local, time.perf_counter() - started)
    log(
        f"ratio HTTP p50 / in-process p50: {http_p50 / local_p50:.1f} (HTTP requests wait in a queue of up to "
        f"{args.concurrency}; searches run one at a time)"
    )
    return 1 if failed or not refused else 0


def attacks(args: argparse.Namespace, base: str, pid: int, requests: list[dict]) -> bool:
    """Bursts, then the attacks of issue 14; True when every attack was refused and every burst search succeeded."""
    after = bursts(args, base, requests, pid) if args.bursts else []
    if after:
        log(f"RSS after bursts: {', '.join(f'{m:,.0f}' for m in after)} MB; last / first {after[-1] / after[0]:.3f}")
    if args.no_attacks:
        return True
    tall = png_bytes(1, 200_000)
    ok = [
        attack("tall image 1 x 200,000", base, pid, files={"file": ("tall.png", tall, "image/png")}),
        attack("duplicated stages (998)", base, pid, data={"gallery_id": 0, "rerankers": ["kreciprocal"] * 998}),
        chunked_upload(base, args.chunked_mb),
    ]
    if args.slow_clients:
        ok.append(slow_clients(base, args.slow_clients, requests))
    return all(ok)


if __name__ == "__main__":
    sys.exit(main())
