"""Visual-similarity adaptation on Omniglot pairs: raw vs adapted top-k over repeated random splits.

Run from the repository root with the project's python (it unpacks the bundled Omniglot subset into data/omniglot
first, as `lookalike data omniglot data/omniglot` does):

    .venv/bin/python benchmarks/bench_adapt.py                 # both backbones below, 5 runs each (a few minutes)
    .venv/bin/python benchmarks/bench_adapt.py --pairs-only    # just write data/omniglot/pairs.csv

Pairs: one per character of images_background_small1 (136 characters), the drawing of drawer 01 on the left and
of drawer 02 on the right (file names are CHARACTER_DRAWER.png), so each image's only partner is the other
drawing of its character. Each run draws 50% train, 20% validation, 30% test pairs with its own seed.

Backbones, both frozen resnet18 at 64x64 read at layers 3 and 4 (`configs/omniglot_adapt.yaml`):
- random: random-initialised (seeded), no weights;
- trained: the lookalike extractor trained by `lookalike train configs/omniglot.yaml`
  (runs/omniglot/checkpoints/best-epoch013.ckpt; it saw the labels of 70% of the characters).
Prints a markdown table of top-k mean ± std (ddof=1) over the runs for raw and adapted features.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lookalike.adapt import run_adapt, topk_accuracy
from lookalike.adapt.backbones import extract_image_features
from lookalike.adapt.run import draw_split
from lookalike.config import Config, load_config
from lookalike.data.bundled import prepare_omniglot
from lookalike.data.images import eval_transform
from lookalike.data.pairs import load_pairs
from lookalike.models.extractor import Extractor, load_weights

ROOT = Path("data/omniglot")
CONFIG = "configs/omniglot_adapt.yaml"
CHECKPOINT = "runs/omniglot/checkpoints/best-epoch013.ckpt"


def embedding_reference(cfg: Config, seeds: range) -> list[float]:
    """top1/mean of the trained extractor's own 128-d embedding (backbone + trained projection, not a frozen-layer
    reading) on the test pairs of the same splits: a reference the adaptation does not have access to."""
    extractor = load_weights(Extractor("resnet18", embedding_dim=128), CHECKPOINT).eval()
    pairs = load_pairs(cfg.adapt.pairs)
    paths = pairs.image_paths("left") + pairs.image_paths("right")
    emb, _ = extract_image_features(paths, [extractor], [eval_transform(64, 1.0)])
    n = len(pairs)
    tests = [np.flatnonzero(draw_split(np.full(n, "train"), cfg, seed) == "test") for seed in seeds]
    return [topk_accuracy(emb[:n][t], emb[n:][t], (1,))["top1/mean"] for t in tests]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs-only", action="store_true", help="only write data/omniglot/pairs.csv")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"wrote {prepare_omniglot(ROOT).pairs_path}")
    if args.pairs_only:
        return
    backbones = {
        "random-init resnet18": "{name: resnet18, layers: [3, 4], pretrained: false}",
        "trained lookalike resnet18": f"{{name: resnet18, layers: [3, 4], pretrained: false, weights: {CHECKPOINT}}}",
    }
    rows, per_run = [], []
    for tag, backbone in backbones.items():
        slug = tag.split()[0]
        overrides = [
            f"adapt.backbones=[{backbone}]",
            f"adapt.runs={args.runs}",
            f"adapt.features=runs/omniglot_adapt/{slug}/features.npz",
            f"adapt.output=runs/omniglot_adapt/{slug}",
        ]
        result = run_adapt(load_config(CONFIG, overrides))
        # the same splits (same seeds) without PCA and without a module: the plain frozen features
        plain = run_adapt(
            load_config(
                CONFIG,
                [
                    *overrides,
                    "adapt.module=identity",
                    "adapt.pca_dim=null",
                    f"adapt.output=runs/omniglot_adapt/{slug}_plain",
                ],
            )
        )
        summary, no_pca = result.summary(), plain.summary()["raw"]
        for metric in ("top1/mean", "top1/either", "top3/mean", "top5/mean"):
            cells = [no_pca[metric], summary["raw"][metric], summary["adapted"][metric]]
            rows.append(
                f"| {tag} | {metric} | " + " | ".join(f"{c['mean']:.3f} ± {c['std']:.3f}" for c in cells) + " |"
            )
        per_run.append(
            f"{tag}: top1/mean raw {[round(r.raw['top1/mean'], 3) for r in result.runs]}, "
            f"adapted {[round(r.adapted['top1/mean'], 3) for r in result.runs]}, epochs kept "
            f"{[r.best_epoch for r in result.runs]}"
        )
    print(f"{len(result.runs)} runs; mean ± std (ddof=1) on the test pairs of each run\n")
    print("| backbone | metric | raw, no PCA | raw (PCA) | adapted (PCA + linear) |\n|---|---|---|---|---|")
    print("\n".join(rows) + "\n\n" + "\n".join(per_run))
    cfg = load_config(CONFIG, [f"adapt.runs={args.runs}"])
    reference = embedding_reference(cfg, range(cfg.adapt.seed, cfg.adapt.seed + args.runs))
    print(
        f"reference, the trained extractor's 128-d embedding: top1/mean {np.mean(reference):.3f} ± "
        f"{np.std(reference, ddof=1):.3f} "
        f"{[round(v, 3) for v in reference]}"
    )


if __name__ == "__main__":
    main()
