"""Updating a Milvus-backed served gallery in place (index.backend=milvus, against real Milvus Lite): add, replace and
remove upsert and delete in the collection beside the new generation's gallery.csv; a journal makes a failed or killed
(kill -9) update roll the collection back; POST /items takes metadata; a CSV's extra columns become metadata."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

import lookalike.serve.update as update
from lookalike.core.errors import LookalikeError
from lookalike.search.milvus import MilvusGallery
from lookalike.serve import load_index
from lookalike.serve.app import create_app
from lookalike.serve.index import read_gallery_csv
from lookalike.serve.manifest import IndexManifest, read_manifest
from lookalike.serve.milvus_backend import JOURNAL_FILE
from lookalike.serve.milvus_export import export_index_to_milvus
from lookalike.serve.update import NewItems, UnknownId, add_items, embed_new, read_source, remove_items, update_index

TESTS = Path(__file__).parent


def milvus_copy(index_dir: Path, target: Path, db: str, collection: str, labels: bool = True) -> Path:
    """A copy of an exact index folder whose vectors are moved into a Milvus collection (as `lookalike index
    index.backend=milvus` writes it); `labels=False`: a gallery without labels."""
    folder = Path(shutil.copytree(index_dir, target))
    manifest = read_manifest(folder)
    if not labels:
        gallery = folder / manifest.file("gallery.csv")
        pd.read_csv(gallery, dtype=str, keep_default_na=False).drop(columns="label").to_csv(gallery, index=False)
    export_index_to_milvus(folder, db, collection)
    fields = {"backend": "milvus", "uri": db, "collection": collection, "milvus_index": "FLAT"}
    IndexManifest.model_validate({**manifest.model_dump(), **fields}).write(folder)
    (folder / manifest.file("embeddings.npz")).unlink()
    return folder


def milvus_state(folder: Path) -> dict:
    """What the folder serves and its collection holds: generation, gallery.csv rows, and every id's vector and
    fields in the collection."""
    manifest = read_manifest(folder)
    store = MilvusGallery.connect(manifest.uri, manifest.collection)
    rows = store.client.query(store.collection, filter='id != ""', output_fields=["id"])
    ids = sorted(row["id"] for row in rows)
    return {
        "generation": manifest.generation,
        "rows": read_gallery_csv(folder, manifest).to_dict("records"),
        "ids": ids,
        "vectors": store.vectors(ids),
        "records": store.records(ids),
    }


def assert_same(got: dict, want: dict) -> None:
    """Two milvus_states are equal (vectors exactly)."""
    assert {k: v for k, v in got.items() if k != "vectors"} == {k: v for k, v in want.items() if k != "vectors"}
    np.testing.assert_array_equal(got["vectors"], want["vectors"])


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    """This module's Milvus Lite file (held by this process once opened)."""
    return str(tmp_path_factory.mktemp("milvus") / "updates.db")


@pytest.fixture
def folder(index_dir, db, tmp_path, request) -> Path:
    """A Milvus-backed copy of the served test index (80 drawings) in a collection of the test's own."""
    return milvus_copy(index_dir, tmp_path / "index", db, f"c{abs(hash(request.node.name)) % 10**9}")


@pytest.fixture(scope="module")
def new_csv(omniglot_small, index_dir, tmp_path_factory) -> Path:
    """A dataset CSV of three drawings not in the gallery, with an id column and a metadata column `colour`."""
    gallery = set(load_index(index_dir).paths.tolist())
    files = [p for p in sorted(omniglot_small.rglob("*.png")) if str(p.resolve()) not in gallery][:3]
    frame = pd.DataFrame(
        {
            "id": [f"new-{i}" for i in range(3)],
            "path": [str(p.resolve()) for p in files],
            "label": "newcomer",
            "colour": ["red", "green", "blue"],
            "split": "train",
            "is_query": "False",
            "is_gallery": "False",
        }
    )
    path = tmp_path_factory.mktemp("new") / "new.csv"
    frame.to_csv(path, index=False)
    return path


def test_add_from_a_csv_replace_and_remove_upsert_and_delete_in_the_collection(folder, new_csv):
    index = load_index(folder)
    old_ids = index.ids.tolist()
    report = add_items(folder, embed_new(folder, read_source([new_csv])))
    assert (report.added, report.replaced, report.size, report.generation) == (3, 0, 83, 1)
    index.close()
    index = load_index(folder)
    assert index.milvus.count() == 83 and index.ids.tolist() == [*old_ids, "new-0", "new-1", "new-2"]
    hits = index.query(pd.read_csv(new_csv)["path"][1], k=3)
    assert hits.iloc[0]["id"] == "new-1" and hits.iloc[0]["colour"] == "green" and hits.iloc[0]["label"] == "newcomer"
    assert index.milvus.records(["new-1"])[0]["colour"] == "green"  # the metadata is filterable in Milvus too
    assert index.query(pd.read_csv(new_csv)["path"][1], k=3, filter='colour == "green"')["id"].tolist() == ["new-1"]
    vector = np.random.default_rng(0).normal(size=(1, index.milvus.dim)).astype(np.float32)
    again = add_items(folder, NewItems(np.array(["new-0"]), np.array(["/nowhere/0.png"]), vector, np.array(["x"])))
    assert (again.added, again.replaced, again.size) == (0, 1, 83)
    np.testing.assert_array_equal(index.milvus.vectors(["new-0"]), vector)  # the re-added id's vector replaced
    gone = remove_items(folder, ["new-1", old_ids[4]])
    assert (gone.removed, gone.size, gone.generation) == (2, 81, 3)
    assert index.milvus.count() == 81 and not index.milvus.present(["new-1", old_ids[4]])
    before = milvus_state(folder)
    with pytest.raises(UnknownId, match=r"^index remove: unknown id 'nope' \(not one of the 81 items of") as info:
        remove_items(folder, ["new-2", "nope"])
    assert "\n" not in str(info.value)
    assert_same(milvus_state(folder), before)  # nothing changed
    after = load_index(folder)
    assert len(after) == 81 and after.ids.tolist()[-2:] == ["new-2", "new-0"] and after.generation == 3
    index.close()


def test_a_failing_or_killed_update_leaves_the_collection_as_it_was(folder, monkeypatch):
    before = milvus_state(folder)
    dim = before["vectors"].shape[1]
    names = np.array(["added-0", "added-1", before["ids"][0]])  # two new ids and a replacement
    items = NewItems(names, np.array([f"/nowhere/{n}.png" for n in names]), np.ones((3, dim), np.float32))

    def fail(self, target):
        raise LookalikeError("disk full")

    monkeypatch.setattr(IndexManifest, "write", fail)  # after the upsert and delete, before the switch
    with pytest.raises(LookalikeError, match="disk full"):
        update_index(folder, add=items, remove=[before["ids"][1]])
    assert not (folder / JOURNAL_FILE).exists()
    assert_same(milvus_state(folder), before)  # rolled back at once
    monkeypatch.setattr(update, "roll_back", lambda *a: None)  # as if killed there: the journal stays
    with pytest.raises(LookalikeError, match="disk full"):
        update_index(folder, add=items, remove=[before["ids"][1]])
    assert (folder / JOURNAL_FILE).exists() and milvus_state(folder)["ids"] != before["ids"]
    monkeypatch.undo()
    gone = before["ids"][2]
    report = remove_items(folder, [gone])  # the next update rolls back first, then removes
    assert (report.removed, report.size, report.generation) == (1, 79, 1)
    keep = np.array(before["ids"]) != gone
    got = milvus_state(folder)
    assert got["ids"] == np.array(before["ids"])[keep].tolist()
    assert got["records"] == [r for r, k in zip(before["records"], keep) if k]
    np.testing.assert_array_equal(got["vectors"], before["vectors"][keep])
    served = [r.get("id") or r["path"] for r in got["rows"]]
    assert served == [r.get("id") or r["path"] for r in before["rows"] if (r.get("id") or r["path"]) != gone]
    assert not (folder / JOURNAL_FILE).exists()


CHILD = """
import pickle, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[5])
from test_update_milvus import milvus_copy, milvus_state
from lookalike.serve.manifest import IndexManifest
from lookalike.serve.update import NewItems, update_index

mode, folder, db, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
if mode == "update":  # build, then stop after the upsert and delete, before the switch, to be killed there
    milvus_copy(Path(sys.argv[6]), folder, db, "killed")
    state = milvus_state(folder)
    out.write_bytes(pickle.dumps(state))

    def paused(self, target):
        print("at switch", flush=True)
        time.sleep(120)

    IndexManifest.write = paused
    names = np.array(["added-0", "added-1", state["ids"][0]])
    vectors = np.ones((3, state["vectors"].shape[1]), np.float32)
    print("ready", flush=True)
    update_index(folder, add=NewItems(names, np.array([f"/nowhere/{n}.png" for n in names]), vectors),
                 remove=[state["ids"][1]])
else:  # the collection as the kill left it, then as the next load leaves it
    raw = milvus_state(folder)
    from lookalike.serve import load_index
    index = load_index(folder)
    out.write_bytes(pickle.dumps((raw, milvus_state(folder), len(index))))
"""


def child(*args: str) -> subprocess.Popen:
    """A Python process running CHILD (the Milvus Lite file opens in one process at a time: never in this one)."""
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, text=True)


def test_kill_9_after_the_upsert_then_the_next_load_restores_the_collection(index_dir, tmp_path):
    folder, db, out = tmp_path / "index", str(tmp_path / "killed.db"), tmp_path / "state.pkl"
    args = (str(folder), db, str(out), str(TESTS))
    updating = child("update", *args, str(index_dir))
    assert updating.stdout.readline().strip() == "ready"
    before = pickle.loads(out.read_bytes())
    assert updating.stdout.readline().strip() == "at switch"  # journal written, collection changed, lock held
    os.kill(updating.pid, signal.SIGKILL)
    updating.wait(timeout=30)
    assert (folder / JOURNAL_FILE).exists()
    assert child("load", *args).wait(timeout=300) == 0
    raw, after, size = pickle.loads(out.read_bytes())
    assert "added-0" in raw["ids"] and before["ids"][1] not in raw["ids"]  # the kill left the collection changed
    assert_same(after, before)  # ids, vectors, fields and the served gallery.csv exactly as before
    assert size == 80 and not (folder / JOURNAL_FILE).exists()


def test_the_admin_api_adds_items_with_metadata_and_refuses_bad_fields(folder, index_dir):
    index = load_index(folder)
    image = index.paths[7]
    files = {"file": ("x.png", Path(image).read_bytes(), "image/png")}
    client = TestClient(create_app(index, admin_token="s3cret"), base_url="http://localhost")
    good = {"Authorization": "Bearer s3cret"}
    fields = {"id": "sku-1", "label": "shoe", "metadata": json.dumps({"colour": "red", "price": 12, "sale": True})}
    added = client.post("/items", files=files, data=fields, headers=good)
    assert added.status_code == 200, added.text
    assert (added.json()["added"], added.json()["gallery_size"]) == (1, 81)
    hits = client.post("/search", files=files, data={"k": 2}).json()
    assert hits["generation"] == 1 and hits["gallery_size"] == 81  # the served index took the new generation
    item = next(i for i in hits["columns"][0]["items"] if i["external_id"] == "sku-1")
    assert item["label"] == "shoe" and item["metadata"] == {"colour": "red", "price": "12", "sale": "true"}
    assert index.milvus.records(["sku-1"])[0] | {"path": ""} == {
        "id": "sku-1",
        "path": "",
        "label": "shoe",
        "colour": "red",
        "price": 12,
        "sale": True,
    }
    filtered = client.post("/search", files=files, data={"k": 5, "filter": "price == 12"}).json()
    assert [i["external_id"] for i in filtered["columns"][0]["items"]] == ["sku-1"]
    bad = {
        "not json": r"^metadata: expected a JSON object of scalar values",
        '["a"]': r"^metadata: expected a JSON object of scalar values",
        '{"colour": ["red"]}': r"^metadata: column 'colour' row 0: expected a string, number or bool",
        '{"a-b": 1}': r"^metadata: column 'a-b' must be a name of letters, digits and underscores",
        '{"path": "x"}': r"^metadata: 'path' is a gallery table column, not a metadata name$",
        '{"split": "x"}': r"^metadata: 'split' is a gallery table column, not a metadata name$",
        json.dumps({"x": "y" * 5000}): r"^metadata: 5\d{3} characters, at most 4096$",
    }
    for text, message in bad.items():
        refused = client.post("/items", files=files, data={"id": "sku-2", "metadata": text}, headers=good)
        assert refused.status_code == 400 and "\n" not in refused.json()["detail"], text
        assert re.match(message, refused.json()["detail"]), refused.json()["detail"]
    gone = client.delete("/items/sku-1", headers=good)
    assert gone.status_code == 200 and gone.json()["gallery_size"] == 80
    assert not index.milvus.present(["sku-1", "sku-2"]) and index.milvus.count() == 80
    assert client.get("/health").json()["generation"] == 2
    index.close()


def test_a_label_for_an_unlabelled_gallery_is_one_line(index_dir, db, tmp_path):
    folder = milvus_copy(index_dir, tmp_path / "index", db, "unlabelled", labels=False)
    index = load_index(folder)
    files = {"file": ("x.png", Path(index.paths[3]).read_bytes(), "image/png")}
    client = TestClient(create_app(index, admin_token="t"), base_url="http://localhost")
    refused = client.post(
        "/items", files=files, data={"id": "a", "label": "shoe"}, headers={"Authorization": "Bearer t"}
    )
    assert refused.status_code == 400
    assert (
        refused.json()["detail"] == "label: this gallery has no labels; add the item without one (or in its metadata)"
    )
    assert read_manifest(folder).generation == 0
    added = client.post("/items", files=files, data={"id": "a"}, headers={"Authorization": "Bearer t"})
    assert added.status_code == 200 and "label" not in read_gallery_csv(folder, read_manifest(folder)).columns
    index.close()


def test_index_add_of_a_csv_keeps_its_extra_columns_as_metadata_in_an_exact_folder(index_dir, new_csv, tmp_path):
    folder = Path(shutil.copytree(index_dir, tmp_path / "index"))  # what `lookalike index add INDEX CSV` runs
    add_items(folder, embed_new(folder, read_source([new_csv])))
    hits = load_index(folder).query(pd.read_csv(new_csv)["path"][2], k=1)
    assert hits.iloc[0]["id"] == "new-2" and hits.iloc[0]["colour"] == "blue"
