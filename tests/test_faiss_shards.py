"""FAISS built from embedding shards: the same index as built in one go, without ever holding all the vectors."""

from __future__ import annotations

import tracemalloc
import weakref

import faiss
import numpy as np
import pandas as pd
import pytest

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.core.table import validate_table
from lookalike.search import FaissIndex, build_faiss_from_shards, search_table, search_table_shards
from lookalike.search.faiss_index import sample_shards
from lookalike.shards import Manifest, prepare_folder, write_shard

N, D, SHARD = 6_000, 16, 500


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """One OpenMP thread while these tests train k-means: spinning threads crawl on a loaded machine (6x here)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Seeded vectors around 40 centres, so IVF-PQ search has neighbours to find."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d)).astype(np.float32)
    return centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)


def shard_folder_of(tmp_path, vectors: np.ndarray, size: int = SHARD):
    """A shard folder as `lookalike extract` writes it, holding `vectors` with ids r0, r1, ..."""
    ids = np.array([f"r{i}" for i in range(len(vectors))])
    manifest = Manifest(size, len(vectors), vectors.shape[1], "x", {})
    folder = prepare_folder(tmp_path / "emb.npz.shards", manifest)
    for s in range(manifest.n_shards):
        start, end = manifest.rows(s)
        write_shard(folder, manifest, s, ids[start:end], vectors[start:end])
    return folder, ids


@pytest.mark.parametrize("factory", ["IVF16,PQ4x4", "Flat"])
def test_same_index_as_built_in_one_go(tmp_path, factory):
    """With the whole collection as training sample, the shard build is FaissIndex.add on all rows: same results."""
    x = clustered(N, D)
    folder, ids = shard_folder_of(tmp_path, x)
    built = build_faiss_from_shards(folder, factory, train_size=N, nprobe=4)
    whole = FaissIndex(factory, nprobe=4).add(x)
    q = clustered(50, D, seed=1)
    got, want = built.search(q, 10), whole.search(q, 10)
    assert built.size == N and (built.ids == ids).all()
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)


def test_hnsw_from_shards_finds_what_one_go_finds(tmp_path):
    """HNSW's graph depends on how rows arrive (block by block): the neighbours found agree, not the exact graph."""
    x = clustered(N, D)
    folder, _ = shard_folder_of(tmp_path, x)
    q = clustered(50, D, seed=1)
    got = build_faiss_from_shards(folder, "HNSW16").search(q, 10)[0]
    want = FaissIndex("HNSW16").add(x).search(q, 10)[0]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert overlap > 0.95


def test_sampled_training_equals_one_go_on_the_same_sample(tmp_path):
    """Trained on a sample of 1,000 rows: the same index as training on that sample then adding everything at once."""
    x = clustered(N, D)
    folder, _ = shard_folder_of(tmp_path, x)
    built = build_faiss_from_shards(folder, "IVF16,PQ4x4", train_size=1_000, seed=3, nprobe=4)
    sample = sample_shards(((None, x[i : i + SHARD]) for i in range(0, N, SHARD)), 1_000, seed=3)
    whole = FaissIndex("IVF16,PQ4x4", nprobe=4).train(sample)
    whole.append(x)
    q = clustered(50, D, seed=1)
    np.testing.assert_array_equal(built.search(q, 10)[0], whole.search(q, 10)[0])
    assert len(sample) == 1_000 and len(np.unique(sample, axis=0)) == 1_000


def test_sample_is_seeded_uniform_and_all_rows_when_small():
    """Every row when train_size exceeds them; a seeded sample drawn from every shard otherwise."""
    x = np.arange(N, dtype=np.float32)[:, None].repeat(2, 1)
    blocks = lambda: ((None, x[i : i + SHARD]) for i in range(0, N, SHARD))  # noqa: E731
    np.testing.assert_array_equal(sample_shards(blocks(), N + 1), x)
    a, b = sample_shards(blocks(), 600, seed=1), sample_shards(blocks(), 600, seed=1)
    np.testing.assert_array_equal(a, b)
    per_shard = np.bincount(a[:, 0].astype(int) // SHARD, minlength=N // SHARD)
    assert per_shard.min() > 20 and per_shard.max() < 90  # ~50 a shard: not the first rows only
    assert not np.array_equal(a, sample_shards(blocks(), 600, seed=2))


def test_never_holds_all_vectors():
    """The build keeps at most two shards alive at once and its numpy peak stays below half of N x D x 4 bytes (the
    sample, one shard and the ids; holding the vectors would be all of it)."""
    n, d, shard = 20_000, 64, 1_000
    live, most = [0], [0]

    def released(rows: int) -> None:
        live[0] -= rows

    def blocks():
        for start in range(0, n, shard):
            vectors = clustered(shard, d, seed=start)
            live[0] += shard
            most[0] = max(most[0], live[0])
            weakref.finalize(vectors, released, shard)
            yield np.array([f"{i}" for i in range(start, start + shard)]), vectors
            del vectors

    tracemalloc.start()
    built = build_faiss_from_shards(blocks, "IVF16,PQ8x4", train_size=2_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert built.size == n and built.ids[-1] == str(n - 1)
    assert most[0] <= 2 * shard
    assert peak < n * d * 4 / 2, f"numpy peak {peak} bytes for {n * d * 4} bytes of vectors"


def test_written_atomically_and_read_back(tmp_path):
    """save writes through a temporary file; the index read back gives the same neighbours."""
    x = clustered(N, D)
    folder, _ = shard_folder_of(tmp_path, x)
    built = build_faiss_from_shards(folder, "IVF16,PQ4x4", train_size=2_000, nprobe=4)
    built.save(tmp_path / "faiss.index")
    loaded = FaissIndex.load(tmp_path / "faiss.index", "IVF16,PQ4x4", nprobe=4)
    q = clustered(20, D, seed=1)
    np.testing.assert_array_equal(loaded.search(q, 5)[0], built.search(q, 5)[0])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_too_few_training_vectors_is_one_line(tmp_path):
    """IVF with more lists than training vectors: a one-line error naming search.index, not a FAISS traceback."""
    folder, _ = shard_folder_of(tmp_path, clustered(200, D), size=100)
    with pytest.raises(LookalikeError, match="search.index: FAISS cannot build 'IVF256,PQ4x4'") as err:
        build_faiss_from_shards(folder, "IVF256,PQ4x4")
    assert "\n" not in str(err.value)


def test_searching_a_table_from_shards_equals_searching_its_embeddings(tmp_path):
    """search_table_shards (what `lookalike search` uses when the shards were kept) lists what search_table lists over
    the same vectors, exclusions (sequence) included; a gallery id no shard holds is one line."""
    vectors = clustered(1_200, D)
    folder, ids = shard_folder_of(tmp_path, vectors, size=250)
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "label": rng.integers(0, 30, len(ids)).astype(str),
            "path": ids,
            "split": np.where(np.arange(len(ids)) < 100, "train", "validation"),  # 100 train rows never searched
            "is_query": rng.random(len(ids)) < 0.2,
            "is_gallery": rng.random(len(ids)) < 0.9,
            "sequence": rng.integers(0, 50, len(ids)).astype(str),
        }
    )
    table = validate_table(frame, tmp_path, "<table>", check_files=False)
    want = search_table(Embeddings(vectors, ids), table, 20, index="Flat")
    got = search_table_shards(folder, table, 20, index="Flat")
    assert got.query_ids.tolist() == want.query_ids.tolist() and got.gallery_ids.tolist() == want.gallery_ids.tolist()
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.distances, want.distances, atol=1e-5)
    with pytest.raises(
        LookalikeError, match=r"emb\.npz\.shards: no embedding for gallery id 'elsewhere' \(1 missing\)"
    ):
        extra = {
            "path": ["elsewhere"],
            "label": ["0"],
            "split": ["validation"],
            "is_query": [False],
            "is_gallery": [True],
        }
        search_table_shards(folder, table.with_rows(extra, "<t>"), 20, index="Flat")
