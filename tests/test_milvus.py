"""The Milvus backend against a real Milvus Lite server (pymilvus starts it in this process for a .db file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lookalike.config import load_config
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.results import RetrievalResults
from lookalike.data.folder import import_folder
from lookalike.pipeline import extractor_from_config, table_from_config
from lookalike.rerank import RerankContext, create_reranker
from lookalike.search import exact_knn
from lookalike.search import milvus as milvus_module
from lookalike.search.milvus import MilvusGallery
from lookalike.serve import build_index, load_index
from lookalike.serve.milvus_export import export_index_to_milvus


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One Milvus Lite server for the module: every MilvusClient on this file shares it (startup ~0.6 s)."""
    return str(tmp_path_factory.mktemp("milvus") / "gallery.db")


def synthetic(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def ids_of(n: int) -> list[str]:
    return [f"img/{i:05d}.png" for i in range(n)]


def neighbour_ids(results: RetrievalResults) -> np.ndarray:
    return np.where(results.valid, results.gallery_ids[np.maximum(results.indices, 0)], "")


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_flat_search_returns_the_exact_neighbours_of_held_out_queries(uri, metric):
    gallery, queries = synthetic(3000, 32, 0), synthetic(40, 32, 1)  # queries held out: not in the gallery
    ids = ids_of(len(gallery))
    store = MilvusGallery.connect(uri, f"exact_{metric}", dim=32, metric=metric)
    store.add(ids, gallery)
    assert store.count() == len(gallery)
    found = store.search(queries, 25)
    index, dist = exact_knn(queries, gallery, 25, metric)
    np.testing.assert_array_equal(neighbour_ids(found), np.asarray(ids)[index])
    np.testing.assert_allclose(found.distances, dist, atol=1e-5)
    assert found.meta["metric"] == metric and found.query_ids.tolist() == [str(i) for i in range(40)]


def test_a_filter_on_metadata_searches_only_the_matching_items(uri):
    gallery, queries = synthetic(400, 16, 2), synthetic(10, 16, 3)
    ids = ids_of(len(gallery))
    category = np.where(np.arange(len(gallery)) % 3 == 0, "shoes", "bags")
    price = np.arange(len(gallery), dtype=np.int64)
    store = MilvusGallery.connect(uri, "filtered", dim=16)
    store.add(ids, gallery, labels=price % 7, metadata={"category": category, "price": price})
    found = store.search(queries, 10, filter='category == "shoes" and price < 300')
    keep = np.flatnonzero((category == "shoes") & (price < 300))
    index, dist = exact_knn(queries, gallery[keep], 10)
    np.testing.assert_array_equal(neighbour_ids(found), np.asarray(ids)[keep][index])
    np.testing.assert_allclose(found.distances, dist, atol=1e-5)
    by_label = store.search(queries, 100, filter='label == "3"')
    assert by_label.valid.sum(1).tolist() == [int((price % 7 == 3).sum())] * 10  # fewer than k: padded rows
    assert np.isinf(by_label.distances[~by_label.valid]).all()
    record = store.records([ids[3]])[0]
    assert (record["path"], record["label"], record["category"], record["price"]) == (ids[3], "3", "shoes", 3)


def test_adding_an_id_again_replaces_it_and_remove_deletes(uri):
    gallery = synthetic(50, 8, 4)
    ids = ids_of(len(gallery))
    store = MilvusGallery.connect(uri, "upsert", dim=8)
    store.add(ids, gallery, metadata={"category": ["old"] * 50})
    moved = -gallery[:1]
    store.add(ids[:1], moved, metadata={"category": ["new"]})
    assert store.count() == 50
    np.testing.assert_array_equal(store.vectors([ids[0], ids[1]]), np.concatenate([moved, gallery[1:2]]))
    assert store.search(moved, 1).gallery_ids.tolist() == [ids[0]]
    assert store.search(gallery[:1], 50, filter='category == "new"').gallery_ids.tolist() == [ids[0]]
    store.remove(ids[:10])
    assert store.count() == 40
    assert not set(store.search(gallery, 50).gallery_ids) & set(ids[:10])
    with pytest.raises(LookalikeError, match=r"vectors: no vector for id 'img/00000.png' \(1 missing\)"):
        store.vectors(ids[:1])


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("category === 'x'", r"^filter: Milvus cannot use \"category === 'x'\": "),
        ('id in ["a"', r"^filter: Milvus cannot use 'id in \[\"a\"': "),
        ("x" * 5000, r"^filter: 5000 characters, at most 4096$"),
        ("label == 'a'\n; drop", r"^filter: control characters"),
    ],
)
def test_a_bad_filter_is_one_line(uri, expression, message):
    store = MilvusGallery.connect(uri, "bad_filter", dim=4)
    store.add(["a", "b"], synthetic(2, 4, 5))
    with pytest.raises(LookalikeError, match=message) as info:
        store.search(synthetic(1, 4, 6), 2, filter=expression)
    assert "\n" not in str(info.value)
    assert store.count() == 2  # nothing happened to the gallery


def test_bad_input_is_one_line_naming_the_field(uri, tmp_path):
    store = MilvusGallery.connect(uri, "checked", dim=4)
    cases = [
        (lambda: store.add(["a", "a"], synthetic(2, 4, 7)), r"^ids: 'a' is given more than once$"),
        (lambda: store.add(["a"], synthetic(1, 5, 7)), r"^add: vectors \(1, 5\), expected \[1, 4\]"),
        (lambda: store.add(["a"], np.full((1, 4), np.nan)), r"^add: vector of id 'a' \(row 0\) holds NaN"),
        (lambda: store.add(["a"], synthetic(1, 4, 7), metadata={"id": [1]}), r"^metadata: column 'id' must be"),
        (lambda: store.add(["a"], synthetic(1, 4, 7), metadata={"c": [[1]]}), r"^metadata: column 'c' row 0"),
        (lambda: store.search(synthetic(1, 4, 7), 20000), r"^search.k: expected an integer in \[1, 16384\]"),
        (lambda: MilvusGallery.connect(uri, "checked", dim=8), r"^index: collection 'checked' holds 4-d vectors"),
        (lambda: MilvusGallery.connect(uri, "checked", metric="euclidean"), r"is indexed for COSINE, not euclidean"),
        (lambda: MilvusGallery.connect(uri, "fresh"), r"does not exist; creating it needs dim >= 1"),
        (lambda: MilvusGallery.connect("milvus.example", "g", 4), r"^index.uri: expected a local .db file"),
        (lambda: MilvusGallery.connect(str(tmp_path / "no" / "g.db"), "g", 4), r"^index.uri: .*does not exist"),
        (lambda: MilvusGallery.connect(uri, "g", 4, index="DISKANN"), r"^index.type: expected one of FLAT, HNSW"),
        (lambda: MilvusGallery.connect(uri, "g", 4, index="HNSW", params={"nprobe": 3}), r"HNSW has no parameter"),
    ]
    for call, message in cases:
        with pytest.raises(LookalikeError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert store.count() == 0  # nothing half-written


@pytest.mark.parametrize(("index", "params"), [("HNSW", {"M": 16, "ef": 64}), ("IVF_FLAT", {"nlist": 8, "nprobe": 8})])
def test_approximate_index_types_find_most_exact_neighbours(uri, index, params):
    gallery, queries = synthetic(1000, 16, 8), synthetic(20, 16, 9)
    store = MilvusGallery.connect(uri, f"approx_{index}", dim=16, index=index, params=params)
    store.add(ids_of(len(gallery)), gallery)
    found = store.search(queries, 10)
    exact, _ = exact_knn(queries, gallery, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(neighbour_ids(found), np.asarray(ids_of(1000))[exact])])
    assert recall >= 0.9 and found.meta["index"] == index


def test_long_inserts_go_in_batches_with_progress(uri, monkeypatch):
    monkeypatch.setattr(milvus_module, "BATCH_BYTES", 50 * (4 * 8 + 256))  # 50 rows per request
    seen = []

    def progress(batches, total):
        seen.append(total)
        return batches

    store = MilvusGallery.connect(uri, "batched", dim=8)
    store.add(ids_of(230), synthetic(230, 8, 10), progress=progress)
    assert seen == [5] and store.count() == 230


@pytest.mark.parametrize(
    "step", ["kreciprocal", {"name": "qe", "n": 3}, {"name": "dba", "n": 3}, {"name": "icfrr", "kg": 5, "kq": 5}]
)
def test_rerankers_over_milvus_candidates_match_the_in_memory_gallery(uri, step):
    gallery, queries = synthetic(60, 16, 11), synthetic(6, 16, 12)
    ids = np.asarray(ids_of(len(gallery)))  # in id order, as Milvus's candidates are: equal distances keep that order
    store = MilvusGallery.connect(uri, "rerank", dim=16)
    if store.count() == 0:
        store.add(ids, gallery)
    query_emb = Embeddings(queries, [f"q{i}" for i in range(len(queries))])
    params = {"name": step} if isinstance(step, str) else dict(step)
    reranker = create_reranker(params.pop("name"), **params)
    found = store.search(queries, len(gallery), query_ids=query_emb.ids)  # k covers the gallery
    over_milvus = reranker.rerank(found, RerankContext.over_candidates(found, query_emb, store))
    index, dist = exact_knn(queries, gallery, len(gallery))
    memory = RetrievalResults(index, dist, query_emb.ids, ids, {"metric": "cosine"})
    in_memory = reranker.rerank(memory, RerankContext(queries=query_emb, gallery=Embeddings(gallery, ids)))
    np.testing.assert_array_equal(neighbour_ids(over_milvus), neighbour_ids(in_memory))
    np.testing.assert_allclose(over_milvus.distances, in_memory.distances, atol=1e-5)


@pytest.fixture(scope="module")
def index_folder(omniglot_small, tmp_path_factory) -> Path:
    """A FAISS (Flat) index folder written by build_index, as `lookalike index search.index=Flat` writes it."""
    tmp = tmp_path_factory.mktemp("index")
    table = tmp / "table.csv"
    import_folder(omniglot_small, validation_fraction=0.1, seed=0).save(table)
    cfg = load_config(
        None,
        [
            f"data.table={table}",
            "model.name=test_resnet",
            "model.pretrained=false",
            "data.image_size=32",
            "data.batch_size=128",
            f"serve.index_dir={tmp / 'index'}",
            "serve.gallery=validation",
            "search.index=Flat",
            "rerank=[]",
        ],
    )
    return build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))


def test_an_exported_faiss_index_folder_searches_the_same(index_folder, uri):
    folder = index_folder
    index = load_index(folder)
    store = export_index_to_milvus(folder, uri, "exported")
    assert store.count() == len(index)
    queries = index.gallery.vectors[::17]
    found = store.search(queries, 20)
    positions, dist = index.faiss.search(queries, 20)
    np.testing.assert_array_equal(neighbour_ids(found), index.gallery.ids[positions])
    np.testing.assert_allclose(found.distances, dist, atol=1e-5)
    label = index.labels[0]
    same = store.search(queries[:3], 5, filter=f'label == "{label}"')
    label_of = dict(zip(index.gallery.ids, index.labels))
    assert {label_of[i] for i in same.gallery_ids} == {label}
    np.testing.assert_array_equal(store.vectors(index.gallery.ids[:5]), index.gallery.vectors[:5])


def test_lookalike_index_exports_a_folder_into_milvus_or_says_why_not_in_one_line(index_folder, tmp_path):
    lookalike = str(Path(sys.executable).parent / "lookalike")
    db = tmp_path / "cli.db"
    done = subprocess.run(
        [lookalike, "index", "--export", str(index_folder), f"index.uri={db}", "index.collection=shop"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    n = len(load_index(index_folder))
    assert f"collection shop: {n} vectors" in done.stdout
    assert MilvusGallery.connect(str(db), "shop").count() == n
    bad = subprocess.run(
        [lookalike, "index", "--export", str(index_folder), "index.uri=milvus.example:19530"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "error: index.uri: expected a local .db file (Milvus Lite) or http(s)://host:port, got 'milvus.example:19530'"
    ]


def test_lookalike_query_with_a_filter_on_a_faiss_folder_is_one_line(index_folder):
    lookalike = str(Path(sys.executable).parent / "lookalike")
    image = load_index(index_folder).paths[0]
    done = subprocess.run(
        [lookalike, "query", str(index_folder), image, "--filter", 'label == "x"'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: filter: this index searches with Flat in-process; filters need one built with index.backend=milvus"
    ]
