"""The web app: index round trip, the JSON API and its safety rules, and a real server under concurrent load (the
page in
a browser: test_page.py)."""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from helpers import LOOKALIKE, index_config, save_pairwise
from lookalike.config import load_config
from lookalike.core.errors import ConfigError, LookalikeError
from lookalike.data.folder import import_folder
from lookalike.data.images import read_image
from lookalike.pipeline import extractor_from_config, table_from_config
from lookalike.search import build_faiss_from_shards, exact_knn
from lookalike.serve import build_index, load_index
from lookalike.serve.app import create_app
from lookalike.shards import iter_shards


@pytest.fixture(scope="module")
def client(index_dir) -> TestClient:
    return TestClient(create_app(load_index(index_dir)), base_url="http://localhost")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_of_size(width: int, height: int, rows: int | None = None) -> bytes:
    """A black grey PNG whose header says width x height, with `rows` rows of pixel data (default all): tiny
    either way."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = zlib.compress(b"\0" * ((width + 1) * (height if rows is None else rows)), 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def copy_index(index_dir: Path, folder: Path, **serve) -> Path:
    """A copy of the index folder with some serve settings changed (as `lookalike index serve.x=...` would write
    them)."""
    folder = shutil.copytree(index_dir, folder)
    settings = json.loads((folder / "manifest.json").read_text())
    settings["serve"].update(serve)
    (folder / "manifest.json").write_text(json.dumps(settings))
    return folder


# ---------------------------------------------------------------- the index folder


def test_index_restores_the_model_without_re_extracting(index_dir):
    index = load_index(index_dir)
    assert len(index) == 80 and sorted(index.rerankers) == ["kreciprocal", "qe(n=3)"]
    np.testing.assert_allclose(index.embed(read_image(index.paths[7])), index.gallery.vectors[7], atol=1e-5)


def test_rebuilding_replaces_the_folder_and_a_bad_reranker_writes_nothing(table_csv, tmp_path):
    folder = tmp_path / "index"
    cfg = index_config(table_csv, folder)
    build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))
    bad = index_config(table_csv, folder, "rerank=[centroids]")
    with pytest.raises(ConfigError, match=r"rerank\[0\]: 'centroids' cannot run in the web app"):
        build_index(bad, table_from_config(bad), extractor_from_config(bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary folder left behind
    assert len(load_index(folder)) == 80
    with pytest.raises(LookalikeError, match="manifest.json: missing"):
        load_index(tmp_path)


def test_a_broken_index_folder_is_a_one_line_error(index_dir, tmp_path):
    folder = shutil.copytree(index_dir, tmp_path / "index")
    (folder / "model.pt").unlink()
    with pytest.raises(LookalikeError, match=r"model\.pt: missing \(the index folder holds"):
        load_index(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(LookalikeError, match=r"manifest\.json: not valid JSON"):
        load_index(folder)
    result = subprocess.run([LOOKALIKE, "serve", str(folder)], capture_output=True, text=True, timeout=120)
    assert (
        result.returncode != 0 and "Traceback" not in result.stderr and "manifest.json: not valid JSON" in result.stderr
    )


def test_non_utf8_gallery_names_survive_the_index(omniglot_small, tmp_path):
    source = sorted(Path(omniglot_small).rglob("*.png"))[:40]
    for i, image in enumerate(source):  # two classes, each file named in Latin-1 (not valid UTF-8)
        folder = os.fsencode(tmp_path / "images" / f"class{i % 2}")
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(image, os.path.join(folder, b"caf\xe9%d.png" % i))
    table = tmp_path / "table.csv"
    import_folder(tmp_path / "images", validation_fraction=0.5, seed=0).save(table)
    cfg = index_config(table, tmp_path / "index", "serve.gallery=all")
    index = load_index(build_index(cfg, table_from_config(cfg), extractor_from_config(cfg)))
    assert len(index) == 40 and all(
        os.fsencode(p).endswith(b".png") and b"caf\xe9" in os.fsencode(p) for p in index.paths
    )
    np.testing.assert_allclose(index.embed(read_image(index.paths[3])), index.gallery.vectors[3], atol=1e-5)


def test_a_faiss_index_is_saved_and_searches_like_exact(table_csv, tmp_path):
    cfg = index_config(table_csv, tmp_path / "index", "search.index=Flat")
    folder = build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))
    flat = load_index(folder)
    assert (folder / "faiss.index").is_file() and flat.faiss is not None and flat.faiss.size == 80
    got = flat.search(flat.gallery.vectors[5], 8, gallery_position=5)[0]
    others = np.delete(np.arange(80), 5)
    idx, dist = exact_knn(flat.gallery.vectors[5:6], flat.gallery.vectors[others], 8)
    np.testing.assert_array_equal(got.positions, others[idx[0]])
    np.testing.assert_allclose(got.distances, dist[0], atol=1e-5)


def test_a_faiss_index_is_built_from_the_gallery_shards(table_csv, tmp_path, monkeypatch):
    """search.index=IVF...: the index is trained and filled from the embedding shards, which are removed after."""
    import lookalike.serve.index as served

    calls = []

    def spy(shards, *args, **kwargs):
        calls.append([ids.tolist() for ids, _ in iter_shards(shards)])
        return build_faiss_from_shards(shards, *args, **kwargs)

    monkeypatch.setattr(served, "build_faiss_from_shards", spy)
    cfg = index_config(table_csv, tmp_path / "index", "search.index=IVF2,Flat", "extract.shard_size=30")
    folder = build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))
    index = load_index(folder)
    assert [len(ids) for ids in calls[0]] == [30, 30, 20]
    assert [i for ids in calls[0] for i in ids] == index.paths.tolist()  # the gallery's images, in order
    assert index.faiss.size == 80 and [p for p in tmp_path.iterdir() if p.name.endswith(".shards")] == []
    got = index.search(index.gallery.vectors[5], 1, gallery_position=5)[0]
    others = np.delete(np.arange(80), 5)
    idx, _ = exact_knn(index.gallery.vectors[5:6], index.gallery.vectors[others], 1)
    assert got.positions[0] == others[idx[0, 0]]


# ---------------------------------------------------------------- the API


def test_search_by_gallery_item_never_finds_itself_and_reports_rank_changes(client, index_dir):
    response = client.post("/search", data={"gallery_id": 3, "k": 5, "rerankers": ["kreciprocal", "qe(n=3)"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["name"] for c in body["columns"]] == ["original", "kreciprocal", "qe(n=3)"]
    index = load_index(index_dir)
    original = index.search(index.gallery.vectors[3], 100, gallery_position=3)[0].positions.tolist()
    assert 3 not in original and [i["id"] for i in body["columns"][0]["items"]] == original[:5]
    for column in body["columns"]:
        items = column["items"]
        assert len(items) == 5 and all(i["id"] != 3 for i in items)
        assert np.all(np.diff([i["distance"] for i in items]) >= -1e-6)
        for rank, item in enumerate(items):
            expected = original.index(item["id"]) - rank if item["id"] in original else None
            assert item["rank_change"] == expected
    assert body["query_label"] == str(index.labels[3])


def test_an_upload_is_decoded_like_the_same_file_in_the_gallery(tmp_path):
    from lookalike.serve.uploads import decode_upload

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (200, 10, 10, 255)  # opaque red top, transparent bottom
    grey16 = Image.fromarray(np.full((8, 8), 61423, np.uint16))
    for name, image in (("rgba.png", Image.fromarray(rgba)), ("grey16.png", grey16)):
        data = png_bytes(image)
        (tmp_path / name).write_bytes(data)
        np.testing.assert_array_equal(
            np.asarray(decode_upload(data, 10**6, 10**6)), np.asarray(read_image(tmp_path / name))
        )
    assert np.asarray(decode_upload(png_bytes(Image.fromarray(rgba)), 10**6, 10**6))[7, 0].tolist() == [255, 255, 255]


def test_upload_searches_like_the_gallery_embedding(client, index_dir):
    index = load_index(index_dir)
    data = Path(index.paths[10]).read_bytes()
    response = client.post("/search", files={"file": ("q.png", data, "image/png")}, data={"k": 4})
    assert response.status_code == 200, response.text
    items = response.json()["columns"][0]["items"]
    assert items[0]["id"] == 10 and items[0]["distance"] == pytest.approx(0.0, abs=1e-5)  # the same image, not excluded


@pytest.mark.parametrize(
    "content, status, message",
    [
        (b"just some text, not a picture\n", 415, "not an image"),
        (b"", 400, "empty"),
        (png_bytes(Image.new("L", (7072, 7072))), 413, "50,013,184 pixels is more than the limit of 40,000,000"),
        (
            png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))),
            413,
            "bytes is more than",
        ),
        (png_bytes(Image.new("RGB", (64, 64), "red"))[:60], 400, "cannot be decoded"),
    ],
    ids=["text", "empty", "50-megapixel", "too-many-bytes", "truncated"],
)
def test_bad_uploads_get_4xx_and_a_message(client, content, status, message):
    response = client.post("/search", files={"file": ("upload.png", content, "image/png")})
    assert response.status_code == status and message in response.json()["detail"]


@pytest.mark.parametrize(
    "upload, message",
    [
        (
            png_of_size(1, 5_000),
            "1x5000 has an aspect ratio of 5,000.0, more than the limit of 20",
        ),  # resized: 37 x 185,000
        (
            png_of_size(1, 39_000_000, rows=1),
            "1x39000000 has an aspect ratio of 39,000,000.0",
        ),  # the 479 GB one
        (png_of_size(200_000, 1, rows=1), "200000x1 has an aspect ratio"),
    ],
    ids=["1x5000", "1x39M", "200000x1"],
)
def test_elongated_images_get_413_before_decoding(client, upload, message):
    response = client.post("/search", files={"file": ("tall.png", upload, "image/png")})
    assert response.status_code == 413 and message in response.json()["detail"], response.text


def test_the_resized_size_is_bounded_by_the_index_transform(index_dir):
    from lookalike.serve.uploads import UploadRejected, decode_upload

    assert load_index(index_dir).short_side == 37  # data.image_size 32 / crop_fraction 0.875
    upload = png_of_size(100, 2_000)  # 200,000 pixels, aspect 20: within both limits
    assert decode_upload(upload, 10**6, 10**6, 20.0).size == (100, 2_000)
    with pytest.raises(
        UploadRejected,
        match=r"100x2000 would be resized to 256x5120 = 1,310,720 pixels, more than the limit of 1,000,000",
    ):
        decode_upload(upload, 10**6, 10**6, 20.0, short_side=256)


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["100MP-pillow-warns", "400MP-pillow-refuses"])
def test_image_bombs_get_413_like_any_image_over_the_limit(client, side):
    response = client.post("/search", files={"file": ("bomb.png", png_of_size(side, side, rows=1), "image/png")})
    assert response.status_code == 413 and "more than the limit of 40,000,000" in response.json()["detail"], (
        response.text
    )


def test_new_serve_limits_must_be_positive():
    for field in ("max_aspect_ratio", "search_timeout", "read_timeout", "upload_timeout"):
        assert getattr(load_config(None, [f"serve.{field}=2.5"]).serve, field) == 2.5
        for bad in ("0", "-1", "nan"):
            with pytest.raises(ConfigError, match=f"^serve.{field}: must be > 0, got "):
                load_config(None, [f"serve.{field}={bad}"])
    assert load_config(None, ["serve.allowed_hosts=[gallery.lan, '*.example.com']"]).serve.allowed_hosts == [
        "gallery.lan",
        "*.example.com",
    ]
    with pytest.raises(ConfigError, match=r"serve.allowed_hosts.*patterns like '\*.example.com', got 'gal\*lery'"):
        load_config(None, ["serve.allowed_hosts=['gal*lery']"])


def test_a_reranker_named_twice_is_refused_at_once(client):
    started = time.monotonic()
    response = client.post("/search", data={"gallery_id": 1, "rerankers": ["kreciprocal"] * 998})
    assert response.status_code == 400 and "'kreciprocal' is given 998 times" in response.json()["detail"]
    assert time.monotonic() - started < 5


def test_a_search_waits_for_the_model_at_most_search_timeout(index_dir, tmp_path):
    index = load_index(copy_index(index_dir, tmp_path / "index", search_timeout=0.5))
    client = TestClient(create_app(index), base_url="http://localhost")
    index.lock.acquire()  # another search holding the model for 4 s
    release = threading.Timer(4, index.lock.release)
    release.start()
    started = time.monotonic()
    response = client.post("/search", data={"gallery_id": 1})
    waited = time.monotonic() - started
    release.join()
    assert response.status_code == 503 and "busy" in response.json()["detail"] and response.headers["retry-after"]
    assert waited < 3
    assert client.post("/search", data={"gallery_id": 1}).status_code == 200


def test_every_search_runs_on_one_thread(index_dir):
    index, threads = load_index(index_dir), set()
    search = index.search

    def recording(*args, **kwargs):
        threads.add(threading.get_ident())
        return search(*args, **kwargs)

    index.search = recording
    client = TestClient(create_app(index), base_url="http://localhost")
    upload = Path(index.paths[0]).read_bytes()

    def one(i: int) -> int:
        files = {"file": ("q.png", upload, "image/png")} if i % 2 else None
        return client.post("/search", files=files, data={} if i % 2 else {"gallery_id": i}).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(one, range(48)))
    assert codes == [200] * 48 and len(threads) == 1  # per-thread allocator arenas made memory grow with each burst


def test_security_headers_host_check_and_no_cdn_docs(client, index_dir):
    for path in ["/", "/health", "/static/app.js", "/image/0", "/image/999"]:
        headers = client.get(path).headers
        assert (
            "frame-ancestors 'none'" in headers["content-security-policy"]
            and "default-src 'self'" in headers["content-security-policy"]
        )
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY", path
    assert client.get("/health", headers={"host": "rebound.attacker.example"}).status_code == 400  # DNS rebinding
    for host in ["127.0.0.1:8000", "localhost", "[::1]:8000"]:
        assert client.get("/health", headers={"host": host}).status_code == 200, host
    with pytest.raises(LookalikeError, match=r"--allow-host: serve.allowed_hosts: .*got '\*example'"):
        create_app(load_index(index_dir), "0.0.0.0", ["*example"])
    public = TestClient(create_app(load_index(index_dir), "0.0.0.0", ["gallery.lan"]), base_url="http://gallery.lan")
    assert (
        public.get("/health").status_code == 200
        and public.get("/health", headers={"host": "192.168.1.5"}).status_code == 400
    )
    docs = client.get("/docs")  # no Swagger page loading its assets from a CDN: the schema itself
    assert docs.status_code == 200 and "cdn" not in docs.text.lower() and "/search" in docs.json()["paths"]


def test_images_are_served_by_gallery_id_only(client, index_dir):
    index = load_index(index_dir)
    real_file, external_id = index.paths[0], index.ids[0]
    assert client.get("/image/0").headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(client.get("/image/0").content)).size[0] <= 256
    for path, status in [
        ("/image/..%2F..%2Fetc%2Fpasswd", 404),
        ("/image/etc%2Fpasswd", 404),
        ("/image/abc", 404),  # neither an external id nor a position
        ("/image/-1", 404),
        ("/image/80", 404),
        ("/image/%2Fetc%2Fpasswd", 404),
        (f"/image/{real_file}", 404),  # a real image file of the gallery, by its path: not an id
        (f"/image/{external_id}", 200),  # its external id (its path under the images root)
    ]:
        assert client.get(path).status_code == status, path


def test_query_must_be_one_thing_and_rerankers_known(client):
    assert client.post("/search", data={"k": 3}).status_code == 400
    response = client.post("/search", data={"gallery_id": 1, "rerankers": ["icfrr"]})
    assert response.status_code == 400 and "unknown 'icfrr'" in response.json()["detail"]
    assert client.post("/search", data={"gallery_id": 1, "k": 0}).status_code == 422
    health = client.get("/health").json()
    assert health["gallery_size"] == 80 and health["rerankers"] == ["kreciprocal", "qe(n=3)"]
    assert "/search" in client.get("/openapi.json").json()["paths"]


def test_pairwise_reranker_scores_the_uploaded_query_against_its_top_n(table_csv, tmp_path):
    from lookalike.models.pairwise import PairwiseModel, PairwiseSpec

    torch.manual_seed(0)
    model = PairwiseModel(PairwiseSpec(name="test_resnet", image_size=32)).eval()
    weights = save_pairwise(model, tmp_path / "pairwise.ckpt")
    cfg = index_config(table_csv, tmp_path / "index", f"rerank=[{{pairwise: {{weights: {weights}, top_n: 4}}}}]")
    folder = build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))
    weights.unlink()  # the index keeps its own copy
    index = load_index(folder)
    client = TestClient(create_app(index), base_url="http://127.0.0.1")
    upload = Path(index.paths[20]).read_bytes()
    body = client.post(
        "/search",
        files={"file": ("q.png", upload, "image/png")},
        data={"k": 6, "rerankers": ["pairwise(weights=pairwise.ckpt, top_n=4)"]},
    )
    assert body.status_code == 200, body.text
    original, pairwise = ([i["id"] for i in c["items"]] for c in body.json()["columns"])
    assert sorted(pairwise[:4]) == sorted(original[:4]) and pairwise[4:] == original[4:]  # only the top_n re-ordered
    transform = model.transform()
    query = transform(Image.open(io.BytesIO(upload)).convert("RGB"))[None]
    with torch.inference_mode():
        scores = [float(model.distance(query, transform(read_image(index.paths[g]))[None])) for g in original[:4]]
    assert pairwise[:4] == [original[i] for i in np.argsort(scores, kind="stable")]


# ---------------------------------------------------------------- a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(folder: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`lookalike serve` of `folder` (with extra `options`) in a subprocess on a free loopback port, answering /health;
    the process and its URL."""
    port = free_port()
    process = subprocess.Popen(
        [LOOKALIKE, "serve", str(folder), "--port", str(port), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            if process.poll() is not None:
                pytest.fail(f"lookalike serve exited: {process.stdout.read()}")
            time.sleep(0.1)  # a short poll: the server answers soon after it binds
    process.kill()
    pytest.fail("lookalike serve did not answer /health within 120 s")


@pytest.fixture(scope="module")
def server(index_dir):
    """`lookalike serve` of the test index; its base URL."""
    process, base = start_serve(index_dir)
    yield base
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def strict_server(index_dir, tmp_path_factory):
    """`lookalike serve` of the test index with short read timeouts (1 s idle, 3 s per body); its base URL."""
    process, base = start_serve(
        copy_index(index_dir, tmp_path_factory.mktemp("strict") / "index", read_timeout=1.0, upload_timeout=3.0)
    )
    yield base
    process.terminate()
    process.wait(timeout=30)


def connect(base: str) -> socket.socket:
    """A raw TCP connection to the server at `base`."""
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


REQUEST_HEAD = (
    "POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n{length}\r\n\r\n"
)
FILE_PART = b'--b\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\nContent-Type: image/png\r\n\r\n'


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout when it does not within the
    timeout)."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:  # closed with our unread bytes in its buffer: the answer has come before the reset
        pass
    return answer


def test_a_chunked_upload_is_counted_and_stopped_at_the_limit(strict_server):
    sent, piece = 0, b"\0" * (1 << 16)
    with connect(strict_server) as sock:
        head = REQUEST_HEAD.format(length="Transfer-Encoding: chunked").encode()
        sock.sendall(head + f"{len(FILE_PART):x}\r\n".encode() + FILE_PART + b"\r\n")
        try:  # chunks until the server answers (or hangs up); it must do so long before 50 MB
            while sent < 50_000_000 and not select.select([sock], [], [], 0)[0]:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413"), (sent, answer[:200])
    assert b"sent without a length" in answer and b"more than the limit of 265,536 bytes" in answer
    assert sent < 10_000_000


def test_stalled_and_trickling_bodies_get_408_and_are_closed(strict_server):
    stalled, trickle = connect(strict_server), connect(strict_server)
    for sock in (stalled, trickle):
        sock.sendall(REQUEST_HEAD.format(length="Content-Length: 100000").encode() + FILE_PART + b"\x89PNG")
    started = time.monotonic()
    for _ in range(8):  # one byte every 0.5 s: never idle for the 1 s read timeout, but not done within 3 s
        time.sleep(0.5)
        try:
            trickle.sendall(b"\0")
        except OSError:
            break
    answers = [read_until_closed(sock) for sock in (stalled, trickle)]
    assert time.monotonic() - started < 8
    assert answers[0].startswith(b"HTTP/1.1 408") and b"no data for 1 s" in answers[0], answers[0][:300]
    assert answers[1].startswith(b"HTTP/1.1 408") and b"not complete after 3 s" in answers[1], answers[1][:300]
    assert httpx.get(f"{strict_server}/health").status_code == 200


def test_connections_stalled_in_their_headers_are_closed(strict_server):
    socks = [connect(strict_server) for _ in range(50)]
    for sock in socks:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest of the headers
    started = time.monotonic()
    assert all(read_until_closed(sock) == b"" for sock in socks)  # closed without an answer; socket.timeout otherwise
    assert time.monotonic() - started < 5
    for sock in socks:
        sock.close()


def test_200_concurrent_searches_all_succeed(server, index_dir):
    uploads = [Path(p).read_bytes() for p in load_index(index_dir).paths[:20]]

    def one(i: int) -> int:
        files = {"file": ("q.png", uploads[i % 20], "image/png")} if i % 2 else None
        data = {"k": 10, "rerankers": ["qe(n=3)"] if i % 3 == 0 else []} | ({} if i % 2 else {"gallery_id": i % 80})
        return httpx.post(f"{server}/search", files=files, data=data, timeout=120).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:  # bounded: at most 16 requests in flight
        codes = list(pool.map(one, range(200)))
    assert codes == [200] * 200
