"""Real collections: a flat folder, a tree or a CSV of paths without labels becomes a gallery (ids, metadata), `index`,
`serve` and `search` work on it, commands that need labels say so, and an index folder moves with its images."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from helpers import LOOKALIKE, index_config
from lookalike.core.errors import LookalikeError, TableError
from lookalike.core.table import load_table
from lookalike.data.folder import import_folder
from lookalike.pipeline import extractor_from_config, table_from_config
from lookalike.serve import build_index, load_index
from lookalike.serve.app import create_app
from lookalike.serve.manifest import read_manifest
from test_serve import start_serve


@pytest.fixture(scope="module")
def collection(omniglot_small, tmp_path_factory) -> Path:
    """24 drawings in one flat folder, no class folders: a user's collection of product photos."""
    root = tmp_path_factory.mktemp("collection") / "images"
    root.mkdir()
    for i, image in enumerate(sorted(omniglot_small.rglob("*.png"))[::6][:24]):
        shutil.copyfile(image, root / f"item{i:02d}.png")
    return root


def catalogue(collection: Path, folder: Path) -> Path:
    """A CSV of paths with a SKU as external id and two metadata columns, in a folder of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": f"sku-{i}", "path": str(p), "title": f"drawing {i}", "price": f"{i}.50"}
        for i, p in enumerate(sorted(collection.glob("*.png")))
    ]
    path = folder / "catalogue.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def build(table: Path, folder: Path):
    cfg = index_config(table, folder)
    return build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LOOKALIKE, *args], capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- gallery tables


def test_a_flat_folder_becomes_a_gallery_table_without_labels(collection, tmp_path):
    table = import_folder(collection)
    assert not table.has_labels and len(table) == 24 and table.counts()["labels"] == 0
    assert table.ids.tolist() == [f"item{i:02d}.png" for i in range(24)]  # the path under the folder
    table.save(tmp_path / "gallery.csv")  # paths re-rooted at the CSV's folder; the ids stay
    again = load_table(tmp_path / "gallery.csv")
    assert again.ids.tolist() == table.ids.tolist() and again.image_paths()[0].resolve() == collection / "item00.png"


def test_a_tree_imports_without_labels_on_request(omniglot_small, tmp_path):
    table = import_folder(omniglot_small, labels=False)
    assert not table.has_labels and len(table) == 160
    assert table.ids[0].startswith("Balinese/character01/") and table.split_counts()["validation"] == 160
    tree = shutil.copytree(omniglot_small / "Balinese" / "character01", tmp_path / "tree" / "character01")
    shutil.copyfile(next(tree.glob("*.png")), tmp_path / "tree" / "loose.png")  # one image beside the class folders
    with pytest.raises(TableError, match=r"loose\.png: image directly in the root folder; .*--no-labels"):
        import_folder(tmp_path / "tree")
    assert len(import_folder(tmp_path / "tree", labels=False)) == 21


def test_a_csv_of_paths_keeps_ids_and_metadata_and_refuses_duplicate_ids(collection, tmp_path):
    table = load_table(catalogue(collection, tmp_path))
    assert not table.has_labels and table.ids[:2].tolist() == ["sku-0", "sku-1"]
    assert table.metadata_columns == ["title", "price"] and table.metadata().iloc[3].tolist() == ["drawing 3", "3.50"]
    with pytest.raises(TableError, match=r"catalogue\.csv: has no label column; evaluate needs labels$"):
        table.require_labels("evaluate")
    frame = pd.read_csv(tmp_path / "catalogue.csv", dtype=str)
    frame.loc[5, "id"] = "sku-2"
    frame.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(TableError) as info:
        load_table(tmp_path / "dup.csv")
    assert (
        str(info.value)
        == f"{tmp_path / 'dup.csv'}, row 6 (line 7), column 'id': duplicate id 'sku-2' (first seen in row 3)"
    )


def test_commands_that_need_labels_say_so_in_one_line(collection, tmp_path):
    table = catalogue(collection, tmp_path)
    for command in ("evaluate", "train"):
        result = run(command, f"data.table={table}", "model.name=test_resnet", "model.pretrained=false")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().count("\n") == 0
        assert f"catalogue.csv: has no label column; {command} needs labels" in result.stderr


# ---------------------------------------------------------------- an index of a gallery without labels


@pytest.fixture(scope="module")
def gallery_index(collection, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("catalogue")
    return build(catalogue(collection, folder), folder / "index")


def test_the_index_stores_paths_relative_to_its_images_root(gallery_index, collection):
    assert read_manifest(gallery_index).images_root == str(collection.resolve())
    stored = pd.read_csv(gallery_index / "gallery.csv", dtype=str)
    assert stored.columns.tolist() == ["id", "path", "title", "price"]
    assert stored["path"].tolist() == [f"item{i:02d}.png" for i in range(24)]


def test_python_search_returns_ids_paths_and_metadata(gallery_index, collection):
    index = load_index(gallery_index)
    hits = index.query(collection / "item07.png", k=3)
    assert hits.columns.tolist() == ["id", "path", "distance", "title", "price"] and hits.index.tolist() == [1, 2, 3]
    first = hits.loc[1]
    assert (first["id"], first["title"], first["price"]) == ("sku-7", "drawing 7", "7.50")
    assert Path(first["path"]) == (collection / "item07.png").resolve() and first["distance"] == pytest.approx(
        0, abs=1e-5
    )


def test_cli_search_of_an_index_prints_ids_and_metadata(gallery_index, collection):
    result = run(
        "search", "--index", str(gallery_index), "--image", str(collection / "item04.png"), "--k", "2", "--json"
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    top = answer["results"][0]
    assert answer["query"] == str(collection / "item04.png") and len(answer["results"]) == 2
    assert (top["rank"], top["id"], top["title"], top["price"]) == (1, "sku-4", "drawing 4", "4.50")
    table = run("search", "--index", str(gallery_index), "--image", str(collection / "item04.png"), "--k", "2")
    assert table.returncode == 0 and "sku-4" in table.stdout and "drawing 4" in table.stdout, table.stderr


def test_the_api_answers_with_external_ids_paths_and_metadata(gallery_index):
    client = TestClient(create_app(load_index(gallery_index)), base_url="http://localhost")
    body = client.post("/search", data={"query_id": "sku-9", "k": 4}).json()
    assert body["query_gallery_id"] == 9 and body["query_external_id"] == "sku-9" and body["query_label"] is None
    item = body["columns"][0]["items"][0]
    assert set(item) == {"id", "external_id", "path", "label", "metadata", "distance", "rank_change"}
    assert item["label"] is None and item["metadata"]["title"] == f"drawing {item['id']}"
    assert item["external_id"] == f"sku-{item['id']}" and item["path"] == f"item{item['id']:02d}.png"
    by_id, by_position = client.get(f"/image/{item['external_id']}"), client.get(f"/image/{item['id']}")
    assert by_id.status_code == 200 and by_id.content == by_position.content  # the integer route still works
    assert client.get("/image/sku-999").status_code == 404
    assert client.post("/search", data={"query_id": "nope"}).status_code == 404


# ---------------------------------------------------------------- a movable index folder


def test_an_index_folder_and_its_images_move_and_serve_the_same(collection, tmp_path):
    images = shutil.copytree(collection, tmp_path / "photos")
    import_folder(images).save(tmp_path / "gallery.csv")  # flat folder: ids are the file names
    folder = build(tmp_path / "gallery.csv", tmp_path / "index")
    before = TestClient(create_app(load_index(folder)), base_url="http://localhost")
    expected = before.post("/search", data={"query_id": "item03.png", "k": 5}).json()["columns"]
    thumbnail = before.get("/image/item05.png").content

    elsewhere = tmp_path / "server"
    elsewhere.mkdir()
    moved, moved_images = shutil.move(folder, elsewhere / "index"), shutil.move(images, elsewhere / "images")
    with pytest.raises(LookalikeError, match=r"images root .*photos: not a folder; pass --images-root DIR"):
        load_index(moved)
    refused = run("serve", str(moved))
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0 and "--images-root" in refused.stderr

    process, base = start_serve(Path(moved), "--images-root", str(moved_images))
    try:
        got = httpx.post(f"{base}/search", data={"query_id": "item03.png", "k": 5}, timeout=60).json()["columns"]
        image = httpx.get(f"{base}/image/item05.png", timeout=60)
    finally:
        process.terminate()
        process.wait(timeout=30)
    for mine, theirs in zip(got, expected):
        assert [i["external_id"] for i in mine["items"]] == [i["external_id"] for i in theirs["items"]]
        np.testing.assert_allclose([i["distance"] for i in mine["items"]], [i["distance"] for i in theirs["items"]])
    assert image.status_code == 200 and image.content == thumbnail
