"""Re-rank the same lists with the same pairwise model in lookalike and in Open Metric Learning 4.0.0: rankings and
pairs/s.

Run from the repository root with the project's python:

    .venv/bin/python benchmarks/bench_pairwise.py [--weights PAIRWISE.ckpt] [--extractor EXTRACTOR.ckpt] [--top-n 5]

The extractor of --config (configs/omniglot_pairwise.yaml: the Omniglot extractor, default weights
runs/omniglot/checkpoints/last.ckpt when present) embeds and searches the validation split once. Its lists
are then re-ranked by lookalike's PairwiseReranker and, in .bench-venvs/oml (built as in bench_metrics.py,
plus timm), by OML's PairwiseReranker around OML's own ConcatSiamese loaded with the same weights
(_oml_pairwise_worker.py). --weights is a pairwise checkpoint from `lookalike train-reranker`; without it a
pairwise model of the config's pairwise section with seeded random weights is used (rankings must agree all
the same). Both sides run on CPU with every core, num_workers=0 and the same pair batch size; the time of
each side covers image reading, decoding, transforms and the model (the whole re-ranking call).
Exits non-zero when a side fails or when any query's new list differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench_metrics import ROOT, ensure_oml_venv, log
from bench_train import ensure_timm

WORKER = Path(__file__).resolve().with_name("_oml_pairwise_worker.py")
DEFAULT_EXTRACTOR = ROOT / "runs" / "omniglot" / "checkpoints" / "last.ckpt"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        type=Path,
        default=ROOT / "configs" / "omniglot_pairwise.yaml",
        help="data, extractor and pairwise model",
    )
    parser.add_argument(
        "--weights", type=Path, help="pairwise checkpoint; default: the config's pairwise model, seeded random weights"
    )
    parser.add_argument(
        "--extractor",
        type=Path,
        help=f"extractor checkpoint (default {DEFAULT_EXTRACTOR.relative_to(ROOT)} when present)",
    )
    parser.add_argument("--top-n", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128, help="pairs per batch on both sides")
    parser.add_argument("--queries", type=int, help="re-rank only the first N queries")
    parser.add_argument("--tta", action="store_true", help="average both stacking orders on both sides")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def extractor_lists(args: argparse.Namespace):
    """The config, the validation table and the extractor's lists of its queries (first --queries)."""
    import torch

    from lookalike.config import load_config
    from lookalike.data.images import eval_transform
    from lookalike.extract import extract_embeddings
    from lookalike.pipeline import extractor_from_config, search_and_score, table_from_config

    weights = args.extractor or (DEFAULT_EXTRACTOR if DEFAULT_EXTRACTOR.is_file() else None)
    overrides = [f"model.weights={weights}"] if weights else ["model.pretrained=false"]
    cfg = load_config(args.config, overrides)
    table = table_from_config(cfg).split("validation")
    torch.manual_seed(args.seed)
    extractor = extractor_from_config(cfg)
    dc, d = extractor.data_config(), cfg.data
    embeddings = extract_embeddings(
        extractor, table, eval_transform(d.image_size, d.crop_fraction, dc["mean"], dc["std"]), d.batch_size
    )
    _, results = search_and_score(cfg, embeddings, table)
    log(
        f"[lists] extractor {weights or 'untrained (seeded)'}: {results.n_queries} queries x top-{results.k} of "
        f"{len(results.gallery_ids)}"
    )
    return cfg, table, results if args.queries is None else _first(results, args.queries)


def _first(results, n: int):
    """The results of the first n queries."""
    from lookalike.core.results import RetrievalResults

    return RetrievalResults(
        results.indices[:n], results.distances[:n], results.query_ids[:n], results.gallery_ids, dict(results.meta)
    )


def pairwise_model(args: argparse.Namespace, cfg):
    """The pairwise model both sides run."""
    import torch

    from lookalike.models.pairwise import load_pairwise
    from lookalike.train.pairwise import new_pairwise_model

    if args.weights:
        model = load_pairwise(args.weights, tta=args.tta)
    else:
        torch.manual_seed(args.seed)
        model = new_pairwise_model(
            cfg.model_copy(
                update={
                    "pairwise": cfg.pairwise.model_copy(
                        update={"pretrained": False, "tta": args.tta, "init_from_extractor": False}
                    )
                }
            )
        )
    log(
        f"[model] {model.spec.name} {model.spec.size[0]}x{model.spec.size[1]} per image "
        f"({'trained: ' + str(args.weights) if args.weights else 'seeded random weights'}), tta={model.spec.tta}"
    )
    return model.eval()


def run_lookalike(model, table, results, args: argparse.Namespace):
    """lookalike's PairwiseReranker on the lists; (new results, seconds)."""
    import torch

    from lookalike.rerank import RerankContext
    from lookalike.rerank.pairwise import PairwiseReranker

    torch.set_num_threads(os.cpu_count() or 1)
    reranker = PairwiseReranker(model, top_n=args.top_n, batch_size=args.batch_size, num_workers=0, progress=False)
    started = time.perf_counter()
    out = reranker.rerank(results, RerankContext(table=table))
    return out, time.perf_counter() - started


def write_oml_inputs(folder: Path, model, table, results, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """frame.csv, lists.npz, weights.pt and spec.json for the worker; return OML's query rows and gallery rows (frame
    rows)."""
    import torch

    frame = pd.DataFrame(
        {
            "label": pd.factorize(table.labels)[0],
            "path": [str(p) for p in table.image_paths()],
            "split": table.column("split"),
        }
    )
    query_rows, gallery_rows = table.rows_of(results.query_ids), table.rows_of(results.gallery_ids)
    frame["is_query"] = np.isin(np.arange(len(frame)), query_rows)
    frame["is_gallery"] = np.isin(np.arange(len(frame)), gallery_rows)
    frame[["label", "path", "split", "is_query", "is_gallery"]].to_csv(folder / "frame.csv", index=False)
    oml_queries, oml_gallery = np.flatnonzero(frame["is_query"]), np.flatnonzero(frame["is_gallery"])
    if not np.array_equal(oml_queries, np.sort(query_rows)) or not np.array_equal(query_rows, np.sort(query_rows)):
        sys.exit("bench_pairwise: the queries must be in table order")
    position = pd.Index(oml_gallery).get_indexer(gallery_rows)  # our gallery position -> OML's gallery position
    if (results.indices < 0).any():
        sys.exit("bench_pairwise: the lists have empty slots; OML's lists would differ in length")
    np.savez(folder / "lists.npz", indices=position[results.indices].astype(np.int64), distances=results.distances)
    state = {
        ("extractor.model." + k[len("backbone.") :] if k.startswith("backbone.") else k): v
        for k, v in model.state_dict().items()
    }
    torch.save(state, folder / "weights.pt")
    dc, s = model.data_config(), model.spec
    spec = {
        "name": s.name,
        "image_size": s.image_size,
        "height": s.size[0],
        "width": s.size[1],
        "crop_fraction": s.crop_fraction,
        "mean": list(dc["mean"]),
        "std": list(dc["std"]),
        "hidden": s.hidden,
        "tta": s.tta,
        "model_kwargs": s.model_kwargs,
        "takes_img_size": _takes_img_size(model),
        "top_n": args.top_n,
        "batch_size": args.batch_size,
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    return oml_gallery, gallery_rows


def _takes_img_size(model) -> bool:
    """Whether the backbone was created with the pair's img_size (transformers), as lookalike.models.pairwise does."""
    patch_embed = getattr(model.backbone, "patch_embed", None)
    return patch_embed is not None and hasattr(patch_embed, "img_size")


def run_oml(
    python: Path, model, table, results, args: argparse.Namespace
) -> tuple[np.ndarray, np.ndarray, float, str] | None:
    """OML's PairwiseReranker in its venv; (new indices in our gallery positions, distances, seconds, detail) or
    None."""
    with tempfile.TemporaryDirectory(prefix="bench-pairwise-") as tmp:
        folder = Path(tmp)
        oml_gallery, gallery_rows = write_oml_inputs(folder, model, table, results, args)
        log("[OML] re-ranking in .bench-venvs/oml ...")
        done = subprocess.run([str(python), str(WORKER), str(folder), "--threads", str(os.cpu_count())], check=False)
        if done.returncode != 0:
            log(f"[OML] FAILED: worker exit code {done.returncode}")
            return None
        with np.load(folder / "out.npz") as out:
            back = pd.Index(gallery_rows).get_indexer(oml_gallery)  # OML's gallery position -> ours
            detail = f"OML {out['oml_version']}, {int(out['threads'])} threads"
            return back[out["indices"]], out["distances"], float(out["seconds"]), detail


def main() -> int:
    """Lists, model, both sides, comparison."""
    args = parse_args()
    python = ensure_oml_venv()
    ensure_timm(python)
    cfg, table, results = extractor_lists(args)
    model = pairwise_model(args, cfg)
    pairs = int((results.indices[:, : args.top_n] >= 0).sum())
    log(
        f"[settings] top_n={args.top_n}: {pairs} pairs, batch {args.batch_size}, num_workers=0, {os.cpu_count()} "
        "cores, CPU"
    )
    ours, ours_seconds = run_lookalike(model, table, results, args)
    oml = run_oml(python, model, table, results, args)
    if oml is None:
        return 1
    indices, distances, oml_seconds, detail = oml
    same_rows = (ours.indices == indices).all(axis=1)
    head_changed = (ours.indices[:, : args.top_n] != results.indices[:, : args.top_n]).any(axis=1)
    log(
        f"identical new rankings: {same_rows.sum()} of {len(same_rows)} queries ({same_rows.mean():.2%}); "
        f"{head_changed.sum()} lists re-ordered by the model; max |distance difference| "
        f"{np.abs(ours.distances - distances).max():.2e}"
    )
    log(f"lookalike: {ours_seconds:6.2f} s = {pairs / ours_seconds:8.1f} pairs/s")
    log(f"OML      : {oml_seconds:6.2f} s = {pairs / oml_seconds:8.1f} pairs/s  ({detail})")
    log(f"ratio lookalike/OML pairs/s: {oml_seconds / ours_seconds:.2f}")
    return 0 if same_rows.all() else 1


if __name__ == "__main__":
    sys.exit(main())
