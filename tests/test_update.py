"""Updating a served gallery in place: `lookalike index add/remove` embed only the new images, replace re-added ids,
switch generations atomically (kill -9 at any point leaves the old state), and a running server swaps between
searches."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import lookalike.serve.update as update
from lookalike.core.errors import LookalikeError
from lookalike.data.images import read_image
from lookalike.serve import load_index
from lookalike.serve.manifest import read_manifest
from lookalike.serve.update import NewItems, add_items, embed_new, read_source, remove_items


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
    add_items(folder, NewItems(np.array(names), np.array(names), np.array(["x"] * 4), vectors))
    remove_items(folder, [index.paths[0]])
    after = load_index(folder)
    assert after.faiss.size == len(after) == 83
    hits = after.search(vectors[2], 1)[0]
    assert after.paths[hits.positions[0]] == names[2]  # the appended then rebuilt index finds an added vector
