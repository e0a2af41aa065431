"""A served gallery whose vectors live in Milvus (index.backend=milvus) against a real Milvus Lite server: the folder,
GalleryIndex searches and re-rankers over fetched candidate vectors, filters, and the one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import index_config
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.pipeline import extractor_from_config, table_from_config
from lookalike.serve import build_index, load_index
from lookalike.serve.app import run_search
from lookalike.serve.index import read_gallery_csv
from lookalike.serve.live import LiveIndex
from lookalike.serve.milvus_backend import store_gallery

RERANK = "rerank=[kreciprocal, {qe: {n: 3}}, {icfrr: {kg: 5, kq: 5}}]"


@pytest.fixture(scope="module")
def grouped_table(table_csv) -> Path:
    """table_csv plus metadata columns `parity` (odd or even character number: Balinese/characterNN) and `number`
    (that number; the table's cells are text: Milvus gets it as a number)."""
    frame = pd.read_csv(table_csv)
    frame["parity"] = np.where(frame["label"].str[-1].astype(int) % 2 == 1, "odd", "even")
    frame["number"] = frame["label"].str[-2:].astype(int)
    path = table_csv.with_name("grouped.csv")
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def milvus_dir(grouped_table, tmp_path_factory) -> Path:
    """A Milvus-backed index folder of the 80 validation drawings; its vectors in a Milvus Lite file of this module."""
    db = tmp_path_factory.mktemp("milvus") / "gallery.db"
    folder = grouped_table.parent / "milvus_index"
    cfg = index_config(grouped_table, folder, RERANK, "index.backend=milvus", f"index.uri={db}", "index.collection=g")
    return build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))


@pytest.fixture(scope="module")
def index(milvus_dir):
    loaded = load_index(milvus_dir)
    yield loaded
    loaded.close()


def in_memory(index):
    """The same index searched in-process over the vectors Milvus holds: the reference its searches must equal."""
    vectors = index.milvus.vectors(index.gallery.ids)
    return dataclasses.replace(index, gallery=Embeddings(vectors, index.gallery.ids), milvus=None, cache={})


def test_the_folder_names_the_collection_and_holds_no_vectors(milvus_dir, index):
    manifest = json.loads((milvus_dir / "manifest.json").read_text())
    assert (manifest["backend"], manifest["collection"], manifest["milvus_index"]) == ("milvus", "g", "FLAT")
    assert Path(manifest["uri"]).is_absolute() and manifest["uri"].endswith("gallery.db")
    assert not (milvus_dir / "embeddings.npz").exists() and not (milvus_dir / "faiss.index").exists()
    assert len(index) == 80 and index.milvus.count() == 80
    record = index.milvus.records([index.gallery.ids[0]])[0]
    assert record["parity"] in ("odd", "even") and record["label"] == index.labels[0]


@pytest.mark.parametrize("position", [0, 41])
def test_gallery_queries_and_rerankers_over_milvus_match_the_in_memory_search(index, position):
    names = list(index.rerankers)
    over_milvus = index.search(index.vector(position), 10, names, gallery_position=position)
    reference = in_memory(index).search(index.vector(position), 10, names, gallery_position=position)
    assert [c.name for c in over_milvus] == ["original", *names]
    for got, want in zip(over_milvus, reference):
        np.testing.assert_array_equal(got.positions, want.positions, err_msg=got.name)
        np.testing.assert_allclose(got.distances, want.distances, atol=1e-5, err_msg=got.name)
        assert got.rank_change == want.rank_change
        assert position not in got.positions  # a gallery item never finds itself


def test_a_filter_keeps_only_matching_items_for_uploads_and_gallery_queries(index, omniglot_small):
    image = next(omniglot_small.rglob("*.png"))
    hits = index.query(image, k=30, filter='parity == "odd"')
    parity = dict(zip(index.ids, pd.read_csv(index.table.source)["parity"]))
    assert len(hits) == 30 and {parity[i] for i in hits["id"]} == {"odd"} and (hits["parity"] == "odd").all()
    assert hits["distance"].is_monotonic_increasing
    unfiltered = index.query(image, k=80)
    assert hits["id"].tolist() == [i for i in unfiltered["id"] if parity[i] == "odd"][:30]
    _, columns = run_search(LiveIndex(index), None, 3, 30, ["kreciprocal"], f'label == "{index.labels[3]}"')
    assert all(index.labels[p] == index.labels[3] for c in columns for p in c.positions)
    assert len(columns[0].positions) == 19  # the other 19 drawings of that character


def test_a_numeric_metadata_column_is_filtered_as_numbers(index, omniglot_small):
    number = int(index.metadata["number"].iloc[0])
    hits = index.query(
        next(omniglot_small.rglob("*.png")), k=80, filter=f"number < {number + 1} and number >= {number}"
    )
    assert len(hits) == 20 and set(hits["number"]) == {str(number)}  # shown as the table's text; compared as numbers
    assert index.milvus.records([hits["id"].iloc[0]])[0]["number"] == number


@pytest.mark.parametrize("gallery_id", [None, 5])
def test_a_filter_no_item_passes_finds_nothing(index, omniglot_small, gallery_id):
    upload = None if gallery_id is not None else next(omniglot_small.rglob("*.png")).read_bytes()
    _, columns = run_search(LiveIndex(index), upload, gallery_id, 10, ["kreciprocal"], 'parity == "none"')
    assert [len(c.positions) for c in columns] == [0, 0]


@pytest.mark.parametrize(
    ("expression", "message"),
    [("parity === 'odd'", r"^filter: Milvus cannot use"), ("x" * 5000, r"^filter: 5000 characters, at most 4096$")],
)
def test_a_bad_filter_is_one_line(index, expression, message):
    with pytest.raises(LookalikeError, match=message) as info:
        index.search(index.vector(0), 5, filter=expression)
    assert "\n" not in str(info.value)


def test_a_filter_on_an_in_process_index_says_it_needs_milvus(index):
    with pytest.raises(LookalikeError, match=r"^filter: this index searches with exact in-process; filters need one "):
        in_memory(index).search(index.vector(0), 5, filter='parity == "odd"')


def test_a_collection_an_update_left_loads_and_another_galleries_is_one_line(index, milvus_dir):
    first, gallery_ids = index.gallery.ids[:1], index.gallery.ids.copy()
    vectors, records = index.milvus.vectors(gallery_ids), index.milvus.records(gallery_ids)
    vector = vectors[:1]
    index.milvus.remove(first)  # as an update in flight or rolled back may leave it: searches skip what is missing
    index.milvus.add(["not-in-gallery"], vector + 1e-3)  # an id gallery.csv does not hold (yet): dropped
    try:
        loaded = load_index(milvus_dir)
        hits = loaded.query(loaded.paths[0], k=5)
        assert len(hits) == 5 and "not-in-gallery" not in hits["id"].tolist() and first[0] not in hits["id"].tolist()
        index.milvus.remove(gallery_ids)
        with pytest.raises(LookalikeError, match=r"manifest.json: collection 'g' at .* holds 1 vectors, none of them"):
            load_index(milvus_dir)
        index.milvus.remove(["not-in-gallery"])
        with pytest.raises(LookalikeError, match=r"manifest.json: collection 'g' at .* holds no vectors, the folder"):
            load_index(milvus_dir)
    finally:
        index.milvus.remove(["not-in-gallery"])
        store_gallery(index.milvus, vectors, read_gallery_csv(milvus_dir, index.manifest))
    assert index.milvus.records(gallery_ids) == records and index.milvus.count() == 80


def test_a_manifest_for_milvus_without_its_collection_is_one_line(milvus_dir, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    manifest = json.loads((milvus_dir / "manifest.json").read_text())
    manifest["collection"] = None
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LookalikeError, match=r"manifest.json: .*backend milvus needs uri and collection") as info:
        load_index(folder)
    assert "\n" not in str(info.value)
