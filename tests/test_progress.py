"""Progress nobody watches on a terminal: lines every few seconds into a pipe or log, -q silences them, -v adds detail,
--version; the reporter itself with a fake clock."""

from __future__ import annotations

import io
import os
import re
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import LOOKALIKE
from lookalike import __version__
from lookalike.progress import INTERVAL_ENV, ProgressReporter, interval_from_env, progress_line
from lookalike.search.exact import exact_knn

SLOW_SMALL = [
    "model.name=test_resnet",
    "model.pretrained=false",
    "data.image_size=32",
    "data.batch_size=2",
]  # 40 batches of 2 images
LINE = re.compile(r"^embedding: (\d+)/80 images \(\d+%\), [\d.]+ images/s, (\d+ s left|time left unknown)$")


def lookalike(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LOOKALIKE, *map(str, args)], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def extract_args(table_csv: Path, out: Path) -> list[str]:
    return ["extract", f"data.table={table_csv}", f"extract.output={out}", *SLOW_SMALL]


def test_extract_into_a_pipe_prints_progress_lines_while_it_runs(table_csv, tmp_path):
    """stderr is a pipe (as under nohup, a scheduler or CI): lines arrive during the run, before the output exists."""
    out = tmp_path / "emb.npz"
    proc = subprocess.Popen(
        [LOOKALIKE, *extract_args(table_csv, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, INTERVAL_ENV: "0.01"},
    )  # 40 batches take ~0.15 s on an idle machine
    seen: list[tuple[str, bool]] = []  # (line, whether the embeddings file existed when the line was read)
    reader = threading.Thread(target=lambda: seen.extend((line.rstrip("\n"), out.exists()) for line in proc.stderr))
    reader.start()
    stdout = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, seen
    reader.join()
    periodic = [(int(m.group(1)), existed) for line, existed in seen if (m := LINE.match(line))]
    assert len(periodic) >= 4, seen  # the start line and at least three while embedding
    counts = [n for n, _ in periodic]
    assert counts == sorted(counts) and counts[0] == 0 and any(0 < n < 80 for n in counts)
    assert not any(existed for n, existed in periodic if n < 80)  # read while the run was still going
    assert seen[-1][0].startswith("embedding: 80/80 images done in ")
    assert "\r" not in "".join(line for line, _ in seen)  # plain lines, no bar redrawn in place
    assert f"wrote {out}: 80 embeddings" in stdout


def test_quiet_prints_no_progress_and_no_info_lines_but_errors_stay(table_csv, tmp_path):
    done = lookalike("-q", *extract_args(table_csv, tmp_path / "emb.npz"), env={INTERVAL_ENV: "0.05"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "embedding" not in done.stderr
    assert (tmp_path / "emb.npz").is_file()
    bad = lookalike("-q", "search", "search.kk=3")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "unknown key 'search.kk'" in bad.stderr


def test_verbose_shows_the_resolved_settings_and_timings(table_csv, tmp_path):
    done = lookalike("-v", "--progress-seconds", "60", *extract_args(table_csv, tmp_path / "emb.npz"))
    assert done.returncode == 0, done.stderr
    debug = [line for line in done.stderr.splitlines() if line.startswith("debug [")]
    assert any("model.name=test_resnet" in line and "data.batch_size=2" in line for line in debug), done.stderr
    assert any("embedding: 80 images to go" in line for line in debug)
    assert re.search(r"debug \[ *\d+\.\d s\] extract finished", done.stderr)
    assert "embedding: 80/80 images done in" in done.stderr  # a long interval still gives the start and end lines


def test_version():
    done = lookalike("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"lookalike {__version__}"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_reporter_writes_a_line_per_interval_with_rate_and_time_left():
    stream, clock = io.StringIO(), FakeClock()
    reporter = ProgressReporter(stream, interval=5.0, tty=False, clock=clock)
    for _ in reporter.track("embedding")(range(10), 10):
        clock.now += 2.0  # each batch takes 2 s: a line after batches 3, 6 and 9 (6 s, 12 s, 18 s)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "embedding: 0/10 batches (0%), 0.0 batches/s, time left unknown"
    assert lines[1:4] == [progress_line("embedding", n, 10, 2.0 * n) for n in (3, 6, 9)]
    assert lines[1] == "embedding: 3/10 batches (30%), 0.5 batches/s, 14 s left"
    assert lines[4] == "embedding: 10/10 batches done in 20 s" and len(lines) == 5


def test_quiet_reporter_passes_items_through_and_writes_nothing():
    stream = io.StringIO()
    assert list(ProgressReporter(stream, 0.0, enabled=False, tty=False).wrap(iter("abc"), 3, "x")) == ["a", "b", "c"]
    assert stream.getvalue() == ""


def test_without_a_total_and_long_runs_the_line_still_reads():
    assert progress_line("runs", 4, None, 8.0, "run") == "runs: 4 runs, 0.5 runs/s, 8 s elapsed"
    assert progress_line("embedding", 1, 1000, 10.0).endswith("2 h 46 min left")


def test_exact_search_reports_its_query_blocks():
    rng = np.random.default_rng(0)
    queries, gallery = rng.normal(size=(25, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    calls: list[int] = []
    with_progress = exact_knn(queries, gallery, 5, query_block=10, progress=lambda it, n: calls.append(n) or it)
    assert calls == [3]
    np.testing.assert_array_equal(with_progress[0], exact_knn(queries, gallery, 5, query_block=10)[0])


@pytest.mark.parametrize(("value", "expected"), [("2.5", 2.5), ("0", 5.0), ("soon", 5.0)])
def test_interval_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv(INTERVAL_ENV, value)
    assert interval_from_env() == expected


def test_quiet_also_turns_off_lightnings_progress_bar(monkeypatch):
    from lookalike import cli

    monkeypatch.setattr(cli, "_output", cli._Output(quiet=True))
    assert cli._config(["model.name=resnet18"]).trainer.progress is False
    assert cli._config(["trainer.progress=true"]).trainer.progress is True  # what the user asked for wins
    monkeypatch.setattr(cli, "_output", cli._Output())
    assert cli._config([]).trainer.progress is True
