"""One-shot 20-way classification on the validation characters of the bundled Omniglot subset.

Run from the repository root with the project's python:

    .venv/bin/python benchmarks/bench_oneshot.py [--checkpoint CKPT] [--episodes 1000] [--ways 20] [--seed 0]
        [--config configs/omniglot.yaml] [key=value ...]

The characters split into train and validation as `lookalike data omniglot` splits them (30% of the characters
validate, split seed 0), so an extractor trained by `lookalike train configs/omniglot.yaml` never saw the
validation characters. Without --checkpoint the script trains that recipe itself first (key=value overrides go to
the config, e.g. train.epochs=4). Each seeded episode draws `ways` validation characters; for each a drawing by a
random drawer is the one labelled example; one of the characters is the query's, and its drawing comes from
another drawer (the drawer is the DD of the file name CHARACTER_DD.png). The query takes the label of its nearest
labelled drawing (euclidean on the extractor's embeddings). Printed: the training's wall-clock seconds and the
machine's load average when it ended (when the script trains), accuracy over the episodes with a Wilson 95% interval,
and chance (1 / ways). configs/omniglot_oneshot.yaml is the recipe this benchmark chose (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-cache" / "bench_oneshot"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="trained extractor (Lightning checkpoint); default: train one")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "omniglot.yaml", help="the recipe")
    parser.add_argument("--episodes", type=int, default=1000, help="episodes (default 1000)")
    parser.add_argument("--ways", type=int, default=20, help="characters per episode (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the episodes (default 0)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (model.*, train.*)")
    return parser.parse_args()


def log(message: str) -> None:
    """One line on stdout, flushed (the benchmark's output)."""
    print(message, flush=True)


def drawers_of(paths: list[str]) -> np.ndarray:
    """The drawer number of each drawing, from its file name CHARACTER_DRAWER.png."""
    from lookalike.data.bundled import DRAWING

    matches = [DRAWING.fullmatch(Path(p).name) for p in paths]
    bad = [p for p, m in zip(paths, matches) if m is None]
    if bad:
        raise SystemExit(f"bench_oneshot: {bad[0]}: expected a file name CHARACTER_DRAWER.png")
    return np.array([int(m.group(2)) for m in matches])


def episode(rng: np.random.Generator, labels: np.ndarray, drawers: np.ndarray, ways: int) -> tuple[np.ndarray, int]:
    """Row indices of the `ways` labelled drawings (one per character) and of the query (another drawer)."""
    classes = rng.choice(np.unique(labels), size=ways, replace=False)
    support = np.array([rng.choice(np.flatnonzero(labels == c)) for c in classes])
    target = rng.integers(ways)
    others = np.flatnonzero((labels == classes[target]) & (drawers != drawers[support[target]]))
    return support, int(rng.choice(others))


def run_episodes(vectors: np.ndarray, labels: np.ndarray, drawers: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """1 where the query's nearest labelled drawing has its character, else 0, per episode."""
    rng = np.random.default_rng(args.seed)
    correct = np.zeros(args.episodes, dtype=np.int64)
    for e in range(args.episodes):
        support, query = episode(rng, labels, drawers, args.ways)
        distances = np.linalg.norm(vectors[support] - vectors[query], axis=1)
        correct[e] = labels[support[int(distances.argmin())]] == labels[query]
    return correct


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def train_checkpoint(cfg) -> Path:
    """Train the recipe on the train characters; its last checkpoint."""
    from lookalike.train import run_train

    start = time.perf_counter()
    result = run_train(cfg)
    seconds = time.perf_counter() - start
    log(
        f"[train] {seconds:.0f} s (load average {os.getloadavg()[0]:.1f}); validation CMC@1 "
        f"{result.metrics['cmc@1']:.4f}, mAP@all {result.metrics['map@all']:.4f}"
    )
    return result.last_checkpoint


def main() -> int:
    """Prepare the split, get an extractor, embed the validation characters, run the episodes, print accuracy."""
    import torch

    from lookalike.config import load_config
    from lookalike.core.table import load_table
    from lookalike.data.bundled import prepare_omniglot
    from lookalike.extract import embed
    from lookalike.models.extractor import Extractor, load_weights

    args = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    table_path = prepare_omniglot(CACHE / "data").table_path
    base = [f"data.table={table_path}", f"train.output={CACHE / 'train'}", "trainer.progress=false", "train.grid=false"]
    cfg = load_config(args.config, [*base, *args.overrides])
    checkpoint = args.checkpoint or train_checkpoint(cfg)
    extractor = Extractor.from_config(cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": None})}))
    load_weights(extractor, checkpoint)
    validation = load_table(table_path).split("validation")
    vectors = embed(extractor, validation).vectors
    labels = np.unique(np.asarray(validation.labels).astype(str), return_inverse=True)[1]
    correct = run_episodes(vectors, labels, drawers_of(list(validation.paths)), args)
    low, high = wilson(int(correct.sum()), len(correct))
    log(
        f"[data] {len(np.unique(labels))} validation characters, {len(labels)} drawings; checkpoint {checkpoint}; "
        f"model {cfg.model.name} image_size {cfg.data.image_size}"
    )
    log(
        f"one-shot {args.ways}-way accuracy over {args.episodes} episodes (seed {args.seed}): "
        f"{correct.mean():.4f} (95% interval {low:.4f} .. {high:.4f}); chance {1 / args.ways:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
