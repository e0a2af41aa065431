"""Every training-free re-ranker at its published parameters and at its gallery-adaptive defaults ("auto"), on real
embeddings: CMC@1 and mAP@all before and after, on each split given (every image a query against the others).

Run from the repository root with the project's python, after embedding the splits with a trained extractor:

    .venv/bin/lookalike extract configs/omniglot.yaml model.weights=CKPT extract.split=validation extract.output=val.npz
    .venv/bin/lookalike extract configs/omniglot.yaml model.weights=CKPT extract.split=train extract.output=train.npz
    .venv/bin/python benchmarks/bench_rerank_defaults.py TABLE.csv validation=val.npz train=train.npz

Prints one markdown table per split and exits non-zero when a default lowers CMC@1 by more than one point.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from lookalike.core.embeddings import Embeddings
from lookalike.core.protocol import exclusion_groups, split_as_protocol
from lookalike.core.table import load_table
from lookalike.metrics import evaluate_table
from lookalike.rerank import create_reranker
from lookalike.rerank.base import RerankContext
from lookalike.search import search_table

PUBLISHED = {
    "kreciprocal": {"k1": 20, "k2": 6, "lambda_value": 0.3},
    "qe": {"n": 5},
    "dba": {"n": 5},
    "icfrr": {"kg": 256, "kq": 250, "beta": 0.5},
}
MAX_DROP = 0.01


def split_lists(table_path: str, split: str, embeddings: str):
    """The split arranged as queries and gallery, its whole-list search and a context with its labels."""
    table = split_as_protocol(load_table(table_path, check_files=False), split)
    emb = Embeddings.load(embeddings)
    results = search_table(emb, table, k=len(table) - 1, metric="cosine")
    q, g = results.query_ids.astype(str), results.gallery_ids.astype(str)
    context = {
        "queries": emb.select(q),
        "gallery": emb.select(g),
        "exclude": exclusion_groups(table, q, g),
        "query_labels": table.labels_of(q),
        "gallery_labels": table.labels_of(g),
    }
    return table, results, context


def measure(table, results, context: dict, name: str, params: dict) -> tuple[float, float, float, str]:
    """CMC@1, mAP@all, seconds and the resolved parameters of one re-ranker (a fresh context each time)."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = create_reranker(name, **params).rerank(results, RerankContext(**context))
    seconds = time.perf_counter() - start
    means = evaluate_table(out, table).means
    resolved = out.meta["rerank"][-1].get("resolved", {})
    shown = ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in resolved.items() if k != "gallery"
    )
    return means["cmc@1"], means["map@all"], seconds, shown


def main() -> int:
    """Print the tables; 1 when a default lowers CMC@1 by more than MAX_DROP on any split."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table")
    parser.add_argument("splits", nargs="+", help="SPLIT=EMBEDDINGS.npz")
    args = parser.parse_args()
    failed = False
    for item in args.splits:
        split, _, path = item.partition("=")
        table, results, context = split_lists(args.table, split, path)
        base = evaluate_table(results, table).means
        print(f"\n{split} split: {len(table)} images, every image a query against the others\n")
        print("| re-ranker | published: CMC@1 / mAP@all | default (auto): CMC@1 / mAP@all | auto resolved to | time |")
        print("|---|---|---|---|---|")
        print(f"| (original list) | {base['cmc@1']:.4f} / {base['map@all']:.4f} | | | |")
        for name, params in PUBLISHED.items():
            pc, pm, _, _ = measure(table, results, context, name, params)
            ac, am, seconds, shown = measure(table, results, context, name, {})
            failed |= ac < base["cmc@1"] - MAX_DROP
            print(f"| {name} | {pc:.4f} / {pm:.4f} | {ac:.4f} / {am:.4f} | {shown} | {seconds:.1f} s |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
