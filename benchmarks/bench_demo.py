"""`make demo` as shipped, timed: the gain line of every stage and the wall time, on this machine.

    .venv/bin/python benchmarks/bench_demo.py [--runs N]

Runs the real `lookalike demo` (bundled Omniglot, ResNet-18 trained from scratch, k-reciprocal, a briefly trained STIR
re-ranker) in .bench-cache/bench_demo, prints each stage's line and the time, and exits 1 when a stage lowers its
metric or a run takes longer than --budget seconds (the issue's target: 5 minutes on 2 cores). Run it on an idle
machine: the demo is CPU-bound, and a loaded machine can make it several times slower.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOOKALIKE = str(Path(sys.executable).parent / "lookalike")
STAGE_LINE = re.compile(r"^stage (.+): (CMC@1|mAP@all) ([\d.]+) -> ([\d.]+) \(([+-][\d.]+) points\)$", re.MULTILINE)


def run_once(out: Path) -> tuple[float, list[tuple[str, ...]]]:
    """One demo run into a fresh folder: its wall time and its stage lines."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    done = subprocess.run(
        [LOOKALIKE, "demo", "--out", str(out), "trainer.progress=false"], capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"lookalike demo failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return seconds, STAGE_LINE.findall(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds one run may take")
    args = parser.parse_args()
    failed = False
    for r in range(args.runs):
        seconds, stages = run_once(ROOT / ".bench-cache" / "bench_demo")
        for name, metric, before, after, points in stages:
            print(f"run {r}: stage {name}: {metric} {before} -> {after} ({points} points)")
            failed |= float(points) <= 0
        print(f"run {r}: {seconds:.0f} s (budget {args.budget:.0f} s)")
        failed |= seconds > args.budget
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
