"""SIGTERM (`kill PID`) stops the real `lookalike` commands in one line with exit code 143; training saves last.ckpt
first."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import LOOKALIKE, TINY_TRAINING
from lookalike.config import load_config
from lookalike.signals import EXIT_CODE

FAST = [
    "model.name=test_resnet",
    *TINY_TRAINING,
    "search.k=50",
    "train.validate_before=false",
    "evaluate.grid_queries=3",
]
STOP_SECONDS = 120  # a generous bound on a loaded 2-core machine; a run that ignores SIGTERM never ends (epochs=1000)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([LOOKALIKE, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(process: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    """Poll until `ready()` (the command is past its start, mid-work), failing if the process ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the command ended (rc {process.returncode}) before {what}: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.05)


def terminate(process: subprocess.Popen) -> tuple[int, str, float]:
    """Send SIGTERM; the exit code, stderr and seconds until the process ended (killed after STOP_SECONDS)."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running {STOP_SECONDS} s after SIGTERM")
    return process.returncode, stderr, time.monotonic() - sent


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def test_train_stops_on_sigterm_with_a_checkpoint_that_resumes(table_csv, tmp_path):
    """Was: Lightning printed "Received SIGTERM" and went on training (and would have ended with exit code 0)."""
    from lookalike.train import run_train

    args = [*FAST, f"data.table={table_csv}", f"train.output={tmp_path}", "train.batches_per_epoch=2"]
    process = start("train", *args, "train.epochs=1000")
    wait_for(process, (tmp_path / "validation" / "metrics_epoch000.json").is_file, "the first validation")
    rc, stderr, seconds = terminate(process)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert rc == EXIT_CODE, stderr[-2000:]
    assert last_line(stderr) == f"stopped by SIGTERM; saved {last}; continue with --resume last"
    assert "Received SIGTERM" not in stderr and "Traceback" not in stderr
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] >= 2 and not list(last.parent.glob(".last.ckpt.*"))  # no temporary left behind
    resumed = run_train(load_config(None, [*args, f"train.epochs={saved['epoch'] + 2}"]), resume="last")
    after = torch.load(resumed.last_checkpoint, map_location="cpu", weights_only=False)
    assert after["global_step"] > saved["global_step"] and after["epoch"] == saved["epoch"] + 1


def test_extract_stops_on_sigterm_and_writes_nothing(table_csv, tmp_path):
    """A command without a checkpoint stops at once: exit code 143, one line, no embeddings file (not half of one)."""
    output = tmp_path / "emb.npz"
    process = start(
        "extract",
        f"data.table={table_csv}",
        "model.name=resnet18",
        "model.pretrained=false",
        "data.image_size=128",
        "data.batch_size=8",
        f"extract.output={output}",
    )  # 160 images: seconds of work after the handler is set
    wait_for(process, lambda: catches_sigterm(process.pid), "a SIGTERM handler")
    rc, stderr, _ = terminate(process)
    assert rc == EXIT_CODE, stderr[-2000:]
    assert last_line(stderr) == "stopped by SIGTERM" and "Traceback" not in stderr
    assert not output.exists() and not list(tmp_path.glob(".emb.npz.*"))


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler installed (Linux: SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False
