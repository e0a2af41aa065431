"""Updating a served gallery in place: `lookalike index add/remove` embed only the new images, replace re-added ids,
switch generations atomically (kill -9 at any point leaves the old state), and a running server swaps between
searches."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

import lookalike.serve.update as update
from helpers import LOOKALIKE
from lookalike.core.errors import LookalikeError
from lookalike.data.images import read_image
from lookalike.serve import load_index
from lookalike.serve.app import create_app
from lookalike.serve.manifest import read_manifest
from lookalike.serve.update import NewItems, add_items, embed_new, read_source, remove_items
from test_serve import start_serve


@pytest.fixture
def folder(index_dir, tmp_path) -> Path:
    """A copy of the served test index (80 validation images) that a test may change."""
    return Path(shutil.copytree(index_dir, tmp_path / "index"))


@pytest.fixture
def new_images(omniglot_small, table_csv, index_dir, tmp_path) -> Path:
    """Three images not in the gallery (train split), in a class folder of their own."""
    gallery = set(load_index(index_dir).paths.tolist())
    files = [p for p in sorted(omniglot_small.rglob("*.png")) if str(p.resolve()) not in gallery][:3]
    target = tmp_path / "new" / "newcomer"
    target.mkdir(parents=True)
    for path in files:
        shutil.copyfile(path, target / path.name)
    return target.parent


def state(folder: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """What a load of the folder serves: gallery paths, vectors and labels."""
    index = load_index(folder)
    return index.paths.tolist(), index.gallery.vectors.copy(), index.labels.tolist()


def test_add_embeds_only_the_new_images_and_readding_replaces(folder, new_images, monkeypatch):
    paths, vectors, _ = state(folder)
    embedded = []
    real = update.extract_embeddings
    monkeypatch.setattr(
        update, "extract_embeddings", lambda e, t, *a, **k: embedded.append(len(t)) or real(e, t, *a, **k)
    )
    report = add_items(folder, embed_new(folder, read_source([new_images])))
    assert embedded == [3] and (report.added, report.replaced, report.size, report.generation) == (3, 0, 83, 1)
    index = load_index(folder)
    assert index.paths.tolist()[:80] == paths and np.array_equal(index.gallery.vectors[:80], vectors)
    assert index.labels.tolist()[80:] == ["newcomer"] * 3
    first = index.paths[80]
    expected = index.embed(read_image(first))
    assert np.allclose(index.gallery.vectors[80], expected, atol=1e-4)  # the new rows are the images' embeddings
    again = add_items(folder, embed_new(folder, read_source([first])))  # one file, the same id: replaced
    assert (again.added, again.replaced, again.size) == (0, 1, 83)
    after = load_index(folder)
    assert after.paths.tolist().count(first) == 1 and after.paths[-1] == first
    assert sorted(p.name for p in folder.iterdir() if "gallery" in p.name) == ["gallery.g1.csv", "gallery.g2.csv"]


def test_remove_by_id_and_unknown_ids_change_nothing(folder):
    paths, vectors, _ = state(folder)
    with pytest.raises(LookalikeError, match=r"^index remove: unknown id 'nope.png' \(not one of the 80 items of"):
        remove_items(folder, [paths[0], "nope.png"])
    assert read_manifest(folder).generation == 0 and state(folder)[0] == paths
    report = remove_items(folder, [paths[3], paths[5]])
    assert (report.removed, report.size, report.generation) == (2, 78, 1)
    index = load_index(folder)
    keep = [i for i in range(80) if i not in (3, 5)]
    assert index.paths.tolist() == [paths[i] for i in keep] and np.array_equal(index.gallery.vectors, vectors[keep])
    with pytest.raises(LookalikeError, match="would leave .* with no gallery"):
        remove_items(folder, index.paths.tolist())


def test_a_faiss_index_is_updated_with_the_gallery(table_csv, tmp_path):
    from helpers import index_config
    from lookalike.pipeline import extractor_from_config, table_from_config
    from lookalike.serve import build_index

    cfg = index_config(table_csv, tmp_path / "flat", "search.index=Flat", "rerank=[]")
    folder = build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))
    index = load_index(folder)
    vectors = np.random.default_rng(0).normal(size=(4, index.gallery.dim)).astype(np.float32)
    names = [f"/nowhere/{i}.png" for i in range(4)]
    add_items(folder, NewItems(np.array(names), np.array(names), vectors, np.array(["x"] * 4)))
    remove_items(folder, [index.paths[0]])
    after = load_index(folder)
    assert after.faiss.size == len(after) == 83
    hits = after.search(vectors[2], 1)[0]
    assert after.paths[hits.positions[0]] == names[2]  # the appended then rebuilt index finds an added vector


def run(*args: str) -> subprocess.CompletedProcess:
    """The real `lookalike` command."""
    return subprocess.run([LOOKALIKE, *args], capture_output=True, text=True, timeout=300)


KILLED_UPDATE = """
import sys, time
import numpy as np
import lookalike.serve.update as update
from lookalike.serve.update import NewItems, add_items

folder, mode, dim = sys.argv[1], sys.argv[2], int(sys.argv[3])
n = 40_000
names = np.array([f"/nowhere/{i}.png" for i in range(n)])
vectors = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
if mode != "random":  # stop at a chosen point of the update, then wait there to be killed
    owner = update.Embeddings if mode == "embeddings" else update.IndexManifest
    method = "save" if mode == "embeddings" else "write"
    real = getattr(owner, method)

    def paused(self, path, *args):
        print("at", mode, flush=True)
        if mode == "embeddings":  # half a file on disk, then killed
            with open(path.with_name("." + path.name + f".{__import__('os').getpid()}-abcdefgh.npz"), "wb") as fh:
                fh.write(b"PK" * 1000)
        time.sleep(60)
        return real(self, path, *args)

    setattr(owner, method, paused)
print("ready", flush=True)
add_items(folder, NewItems(names, names, vectors, np.array(["x"] * n)))
"""


@pytest.mark.parametrize("mode, delay", [("embeddings", 0.0), ("manifest", 0.0), ("random", 0.2)])
def test_kill_9_during_a_large_add_leaves_the_index_as_it_was(folder, mode, delay):
    before = state(folder)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_UPDATE, str(folder), mode, str(load_index(folder).gallery.dim)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    if mode != "random":
        assert child.stdout.readline().strip() == f"at {mode}"  # inside the update, its lock held
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    generation = read_manifest(folder).generation
    after = state(folder)
    if generation == 0:  # killed before the switch: exactly the old state
        assert after[0] == before[0] and np.array_equal(after[1], before[1]) and after[2] == before[2]
    else:  # the switch had happened: exactly the new one
        assert mode == "random" and generation == 1 and len(after[0]) == 80 + 40_000
    if mode != "random":
        assert {p.name for p in folder.iterdir()} - {"manifest.json", "model.pt", "gallery.csv", "embeddings.npz"}
    remove_items(folder, [before[0][1]])  # the next update cleans up what the killed one left
    names = {p.name for p in folder.iterdir()}
    assert not [n for n in names if n.startswith(".")]
    g = read_manifest(folder).generation
    previous = {"gallery.csv", "embeddings.npz"} if g == 1 else {f"gallery.g{g - 1}.csv", f"embeddings.g{g - 1}.npz"}
    assert names == {"manifest.json", "model.pt", f"gallery.g{g}.csv", f"embeddings.g{g}.npz"} | previous
    assert not list(folder.parent.glob(".index.*"))  # nor a lock or temporary beside the folder


def test_the_admin_api_adds_and_removes_items_only_with_the_token(folder, index_dir):
    index = load_index(folder)
    upload = Path(index.paths[7]).read_bytes()
    files = {"file": ("x.png", upload, "image/png")}
    closed = TestClient(create_app(load_index(index_dir)), base_url="http://localhost")
    assert closed.post("/items", files=files, data={"id": "a"}).status_code == 404  # no token configured: no route
    assert closed.delete("/items/a").status_code in (404, 405)
    client = TestClient(create_app(index, admin_token="s3cret"), base_url="http://localhost")
    good = {"Authorization": "Bearer s3cret"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        assert client.post("/items", files=files, data={"id": "a"}, headers=headers).status_code == 401
        assert client.delete("/items/a", headers=headers).status_code == 401
    assert client.get("/health").json()["gallery_size"] == 80  # the read routes stay open
    assert client.post("/search", data={"gallery_id": 0}).status_code == 200
    big = {"file": ("x.png", b"\x89PNG" + b"\0" * 300_000, "image/png")}
    assert client.post("/items", files=big, data={"id": "b"}, headers=good).status_code == 413  # as /search uploads
    added = client.post("/items", files=files, data={"id": "sku-1", "label": "shoe"}, headers=good)
    assert added.status_code == 200, added.text
    assert added.json() == {
        "id": "sku-1",
        "added": 1,
        "replaced": 0,
        "removed": 0,
        "gallery_size": 81,
        "generation": 1,
    }
    hits = client.post("/search", files=files, data={"k": 2}).json()
    assert hits["gallery_size"] == 81 and hits["generation"] == 1
    top = {(item["id"], item["label"]) for item in hits["columns"][0]["items"]}
    assert top == {(7, index.labels[7]), (80, "shoe")}  # the gallery's copy and the stored upload, both at distance ~0
    again = client.post("/items", files=files, data={"id": "sku-1", "label": "boot"}, headers=good).json()
    assert (again["replaced"], again["gallery_size"]) == (1, 81)
    assert client.delete("/items/nope", headers=good).status_code == 404
    gone = client.delete("/items/sku-1", headers=good)
    assert gone.status_code == 200 and gone.json()["gallery_size"] == 80
    assert client.get("/health").json()["generation"] == 3


def test_a_running_server_swaps_generations_between_searches(folder, tmp_path):
    """`lookalike index add` and `remove` (another process) while two threads search a running `lookalike serve`:
    every answer is entirely one generation's."""
    index = load_index(folder)
    copies = tmp_path / "copies" / "copy"
    copies.mkdir(parents=True)
    for i in range(3):  # copies of gallery item 0: the nearest neighbours of a search by item 0 once added
        shutil.copyfile(index.paths[0], copies / f"{i}.png")
    process, base = start_serve(folder)
    answers, stop = [], threading.Event()

    def searches() -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while not stop.is_set():
                answers.append(http.post("/search", data={"gallery_id": 0, "k": 10}))
                time.sleep(0.05)  # leave the loaded CPUs to the updating process

    threads = [threading.Thread(target=searches) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        expected = {0: expected_answer(folder)}
        added = run("index", "add", str(folder), str(copies.parent))
        assert added.returncode == 0 and "3 added, 0 replaced; 83 gallery images (generation 1)" in added.stdout
        expected[1] = expected_answer(folder)
        new = load_index(folder).paths[-3:].tolist()
        unknown = run("index", "remove", str(folder), new[0], "missing.png")  # one line, nothing removed
        assert unknown.returncode == 2 and unknown.stderr.startswith("error: index remove: unknown id 'missing.png'")
        assert len(unknown.stderr.strip().splitlines()) == 1 and read_manifest(folder).generation == 1
        removed = run("index", "remove", str(folder), *new)
        assert removed.returncode == 0 and "3 removed; 80 gallery images (generation 2)" in removed.stdout
        expected[2] = expected_answer(folder)
        deadline = time.monotonic() + 30  # until the searchers have seen the last generation (was a fixed 1 s sleep)
        while not any(a.json().get("generation") == 2 for a in answers[-4:] if a.status_code == 200):
            assert time.monotonic() < deadline, "no search answered from generation 2 within 30 s"
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        process.terminate()
        process.wait(timeout=30)
    assert expected[1][0] == 83 and expected[1][1][:3] == [80, 81, 82]  # the copies came first
    assert expected[2][1] == expected[0][1]
    seen = set()
    for answer in answers:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        seen.add(body["generation"])
        size, positions = expected[body["generation"]]
        got = [item["id"] for item in body["columns"][0]["items"]]
        assert (body["gallery_size"], got) == (size, positions)  # entirely one generation's answer
    assert {0, 2} <= seen and len(answers) > 10


def expected_answer(folder: Path) -> tuple[int, list[int]]:
    """The gallery size and the top-10 positions a search by gallery item 0 gives in the folder's current state."""
    index = load_index(folder)
    return len(index), index.search(index.gallery.vectors[0], 10, gallery_position=0)[0].positions.tolist()
