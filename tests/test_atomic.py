"""Atomic writes with real processes: permissions follow the umask, concurrent folder swaps take turns, and the
temporaries of a run killed with SIGKILL are removed by the next run of the same write."""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import LOOKALIKE
from lookalike.core.atomic import atomic_folder, atomic_path, write_text_atomic
from lookalike.data.folder import import_folder

WRITER = """
import sys
from pathlib import Path
from lookalike.core.atomic import atomic_folder, atomic_path
kind, target = sys.argv[1:]
if kind == "file":
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"partial" * 1000)
        print("writing", flush=True)
        sys.stdin.readline()
        tmp.write_bytes(b"complete")
else:
    with atomic_folder(Path(target)) as folder:
        (folder / "model.pt").write_bytes(b"partial" * 1000)
        print("writing", flush=True)
        sys.stdin.readline()
        (folder / "model.pt").write_bytes(b"complete")
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def start_writer(kind: str, target: Path) -> subprocess.Popen:
    """A real process that writes `target` and stops halfway until it reads a line."""
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, kind, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "writing\n"
    return process


def finish(process: subprocess.Popen) -> None:
    process.communicate("\n", timeout=30)
    assert process.returncode == 0


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_files_and_folders_follow_the_umask(tmp_path, umask):
    script = """
import sys
from pathlib import Path
from lookalike.core.atomic import atomic_folder, atomic_path, write_text_atomic
out = Path(sys.argv[1])
write_text_atomic(out / "metrics.json", "{}")
with atomic_path(out / "res.npz") as tmp:
    tmp.write_bytes(b"npz")
with atomic_folder(out / "idx") as folder:
    write_text_atomic(folder / "gallery.csv", "path,label")
    (folder / "index.json").write_text("{}")
"""
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, umask=umask)
    for name in ("metrics.json", "res.npz", "idx/gallery.csv", "idx/index.json"):
        assert oct(mode(tmp_path / name)) == oct(0o666 & ~umask), name
    assert oct(mode(tmp_path / "idx")) == oct(0o777 & ~umask)


def test_the_index_command_follows_the_umask(omniglot_small, tmp_path):
    """A service account in the group can serve an index another user built with umask 027 (was: 0600 files)."""
    umask = 0o027
    table = tmp_path / "table.csv"
    import_folder(omniglot_small, validation_fraction=0.5, seed=0).save(table)
    index = tmp_path / "index"
    subprocess.run(
        [
            LOOKALIKE,
            "index",
            f"data.table={table}",
            "model.name=test_resnet",
            "model.pretrained=false",
            "data.image_size=32",
            f"serve.index_dir={index}",
            "serve.gallery=validation",
            "trainer.progress=false",
        ],
        check=True,
        umask=umask,
        capture_output=True,
    )
    assert oct(mode(index)) == oct(0o750)
    files = sorted(index.iterdir())
    assert {p.name for p in files} >= {"manifest.json", "model.pt", "gallery.csv", "embeddings.npz"}
    assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(0o640) for p in files}


# ---------------------------------------------------------------- concurrent index builds into one folder


def swap_many(target: str, worker: int, times: int, barrier) -> str:
    """Replace the folder `target` `times` times with a complete two-file folder; the error, if any."""
    barrier.wait()
    try:
        for i in range(times):
            with atomic_folder(Path(target)) as folder:
                token = f"{worker}-{i}"
                (folder / "model.pt").write_text(token)
                write_text_atomic(folder / "index.json", token)
    except OSError as exc:  # FileNotFoundError, "Directory not empty": reported to the test, which fails on it
        return f"{type(exc).__name__}: {exc}"
    return ""


def test_concurrent_index_builds_into_one_folder_take_turns(tmp_path):
    target, workers, times = tmp_path / "idx", 4, 150
    context = multiprocessing.get_context("fork")
    barrier = context.Manager().Barrier(workers)
    with context.Pool(workers) as pool:
        errors = pool.starmap(swap_many, [(str(target), w, times, barrier) for w in range(workers)])
    assert errors == [""] * workers
    assert hidden(tmp_path) == []  # no .idx.* temporaries, no .idx.old, no lock file
    model, settings = (target / "model.pt").read_text(), (target / "index.json").read_text()
    assert model == settings and model.endswith(f"-{times - 1}")  # one build's files, complete


# ---------------------------------------------------------------- stale temporaries of killed runs


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_the_next_run_removes_what_a_killed_run_left(tmp_path, kind):
    target = tmp_path / ("res.npz" if kind == "file" else "idx")
    killed = start_writer(kind, target)
    killed.kill()  # SIGKILL: no clean-up runs
    killed.wait()
    leftovers = hidden(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{target.name}.")  # the partial write
    finish(start_writer(kind, target))  # the next run of the same write
    assert hidden(tmp_path) == []
    assert (target.read_bytes() if kind == "file" else (target / "model.pt").read_bytes()) == b"complete"


def test_a_live_writers_temporary_is_kept(tmp_path):
    target = tmp_path / "res.npz"
    live = start_writer("file", target)
    write_text_atomic(target, "other run")  # another run of the same write while the first one is still writing
    assert len(hidden(tmp_path)) == 1
    finish(live)  # its temporary was not removed under it: the rename still works
    assert target.read_bytes() == b"complete" and hidden(tmp_path) == []


def test_temporaries_of_older_versions_are_removed_when_older_than_the_run(tmp_path):
    from lookalike.core.atomic import remove_stale

    target = tmp_path / "res.npz"
    legacy = tmp_path / ".res.npz.k2x_9qaz.npz"  # what tempfile.mkstemp named them before the pid was in the name
    legacy.write_bytes(b"58 MB of results, cut short")
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    unrelated = tmp_path / ".res.npz.notes"
    unrelated.write_text("not ours")
    assert remove_stale(target, ".npz") == [legacy]
    assert hidden(tmp_path) == [".res.npz.notes"]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "table.csv") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "idx") as folder:
        (folder / "model.pt").write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
