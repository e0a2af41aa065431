"""Sharded, resumable embedding (lookalike.shards, lookalike.extract_shards) through the real CLI: 2-process gloo DDP
equals one process, a kill -9 resumes from its complete shards, a foreign shard folder is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lookalike.config import load_config
from lookalike.core.embeddings import Embeddings
from lookalike.data.folder import import_folder
from lookalike.models.extractor import Extractor
from lookalike.pipeline import run_extract, table_from_config
from lookalike.shards import Manifest, iter_shards, read_manifest, shard_complete, shard_path, write_shard

LOOKALIKE = str(Path(sys.executable).parent / "lookalike")
TINY = ["model.name=test_resnet", "model.pretrained=false", "data.image_size=32", "data.crop_fraction=1.0"]


@pytest.fixture(scope="module")
def table_csv(omniglot_small, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shards") / "table.csv"
    import_folder(omniglot_small, validation_fraction=0.5, seed=0).save(path)
    return path


def weights(tmp_path: Path, name: str, **kwargs) -> Path:
    """A random init saved to a file: every process and every rerun computes with the same numbers."""
    torch.manual_seed(0)
    path = tmp_path / f"{name}.pt"
    torch.save(Extractor(name, pretrained=False, **kwargs).state_dict(), path)
    return path


def lookalike(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([LOOKALIKE, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_two_process_ddp_equals_one_process(table_csv, tmp_path):
    """trainer.devices=2 trainer.strategy=ddp (gloo on CPU): each rank writes its own shards, the merged file equals a
    single-process run (extract.device=auto, which picks the CPU here) within 1e-6, ids in table order."""
    args = [*TINY, f"data.table={table_csv}", f"model.weights={weights(tmp_path, 'test_resnet')}", "data.batch_size=8"]
    # also the CLI's test of extract.device=auto (was tests/test_cli.py::test_extract_device_auto_runs)
    one = lookalike("extract", *args, f"extract.output={tmp_path / 'one.npz'}", "extract.device=auto")
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = lookalike(
        "extract",
        *args,
        f"extract.output={tmp_path / 'ddp.npz'}",
        "extract.shard_size=12",  # 7 shards: rank 0 owns 0, 2, 4, 6; rank 1 owns 1, 3, 5 (batches cross no shard)
        "extract.keep_shards=true",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.accelerator=cpu",
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("wrote ") == 1  # only rank 0 reports
    single, distributed = Embeddings.load(tmp_path / "one.npz"), Embeddings.load(tmp_path / "ddp.npz")
    assert len(single) == 80 and single.ids.tolist() == distributed.ids.tolist()
    np.testing.assert_allclose(distributed.vectors, single.vectors, atol=1e-6, rtol=0)
    shards = list(iter_shards(tmp_path / "ddp.npz.shards"))
    assert [len(ids) for ids, _ in shards] == [12] * 6 + [8]
    assert np.concatenate([ids for ids, _ in shards]).tolist() == single.ids.tolist()
    assert not (tmp_path / "one.npz.shards").exists()  # removed after the merge unless extract.keep_shards


def extract_here(*args: str) -> Embeddings:
    """What `lookalike extract *args` writes, run in this process: where a test needs the output, not the command."""
    cfg = load_config(None, list(args))
    return run_extract(cfg, table_from_config(cfg))


def test_killed_run_resumes_from_its_complete_shards(table_csv, tmp_path):
    """kill -9 after the first shard is written; the rerun keeps the complete shards (same inode and mtime) and gives
    what an uninterrupted run gives."""
    args = [
        f"data.table={table_csv}",
        "model.name=resnet18",
        "model.pretrained=false",
        f"model.weights={weights(tmp_path, 'resnet18')}",
        "data.image_size=64",  # 80 rows in 40 shards of 2: killed half-way even on an idle machine
        "data.batch_size=2",
        "extract.shard_size=2",
    ]
    out = tmp_path / "resumed.npz"
    folder = tmp_path / "resumed.npz.shards"
    run = [LOOKALIKE, "extract", *args, f"extract.output={out}", "extract.keep_shards=true"]
    proc = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not shard_path(folder, 0).exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it was killed"
    manifest = read_manifest(folder)
    done = {s: shard_path(folder, s).stat() for s in range(manifest.n_shards) if shard_complete(folder, manifest, s)}
    assert 0 in done and len(done) < manifest.n_shards
    resumed = lookalike("extract", *args, f"extract.output={out}", "extract.keep_shards=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for s, before in done.items():  # not recomputed
        after = shard_path(folder, s).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    whole = extract_here(*args, f"extract.output={tmp_path / 'whole.npz'}")  # the reference: an uninterrupted run
    a, b = Embeddings.load(out), whole
    assert a.ids.tolist() == b.ids.tolist() and len(a) == 80
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6, rtol=0)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # the killed run's temporary was cleaned up


def test_shards_of_another_table_are_refused_in_one_line(table_csv, omniglot_small, tmp_path):
    other = tmp_path / "other.csv"
    import_folder(omniglot_small, validation_fraction=0.5, seed=1).save(other)
    args = [*TINY, f"model.weights={weights(tmp_path, 'test_resnet')}", f"extract.output={tmp_path / 'e.npz'}"]
    extract_here(f"data.table={table_csv}", *args, "extract.keep_shards=true")  # shards of this table
    written = (tmp_path / "e.npz").stat().st_mtime_ns
    refused = lookalike("extract", f"data.table={other}", *args)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "e.npz.shards holds shards of another run" in refused.stderr and "extract.restart=true" in refused.stderr
    assert (tmp_path / "e.npz").stat().st_mtime_ns == written  # nothing written
    again = lookalike("extract", f"data.table={other}", *args, "extract.restart=true")
    assert again.returncode == 0, again.stderr[-3000:]


def test_a_shard_of_another_manifest_is_not_complete(tmp_path):
    """A shard file copied from another run (same rows, other provenance) is recomputed, and iter_shards refuses it."""
    ids = np.array([f"img{i}.png" for i in range(5)])
    mine = Manifest(3, 5, 4, "ids", {"table_sha256": "a"})
    theirs = Manifest(3, 5, 4, "ids", {"table_sha256": "b"})
    (tmp_path / "manifest.json").write_text(__import__("json").dumps(mine.to_dict()))
    write_shard(tmp_path, theirs, 0, ids[:3], np.zeros((3, 4), np.float32))
    write_shard(tmp_path, mine, 1, ids[3:], np.ones((2, 4), np.float32))
    assert not shard_complete(tmp_path, mine, 0) and shard_complete(tmp_path, mine, 1)
    with pytest.raises(ValueError, match="shard-00000.npz: missing or not a shard of"):
        list(iter_shards(tmp_path))


def test_search_reads_kept_shards_instead_of_every_vector(table_csv, tmp_path, monkeypatch):
    """With a FAISS search.index and extract.keep_shards, `search` builds its index from the shards (search_table is
    never called) and lists what a search over the merged embeddings lists."""
    from lookalike import pipeline
    from lookalike.config import load_config
    from lookalike.search import search_table

    out = tmp_path / "e.npz"
    cfg = load_config(
        None,
        [*TINY, f"data.table={table_csv}", f"extract.output={out}", "extract.keep_shards=true", "extract.shard_size=16"]
        + ["search.index=Flat", f"search.output={tmp_path / 'r.npz'}", "search.k=10"],
    )
    table = pipeline.table_from_config(cfg)
    pipeline.run_extract(cfg, table)
    want = search_table(Embeddings.load(out), table, 10, index="Flat")
    monkeypatch.setattr(pipeline, "search_table", lambda *a, **k: pytest.fail("loaded every vector"))
    got = pipeline.run_search(cfg, table)
    np.testing.assert_array_equal(got.indices, want.indices)
    assert got.gallery_ids.tolist() == want.gallery_ids.tolist() and got.meta["provenance"]
