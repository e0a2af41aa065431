"""Choose a re-ranking chain on the training split: `lookalike tune-rerank CONFIG`.

Candidates (single re-rankers over a small parameter grid, and chains of two at their auto defaults) are scored on
the training split arranged as queries and gallery by the evaluation protocol (every image a query against all the
others); the validation split is never read while choosing. The best candidate is the one with the highest mAP@all
among those that keep CMC@1 within MAX_CMC1_DROP of the original list (the original list itself is a candidate).
Only then is the chosen chain measured, once, on the validation split.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import yaml

from lookalike.config import Config
from lookalike.core.atomic import write_text_atomic
from lookalike.core.protocol import split_as_protocol
from lookalike.core.table import DatasetTable
from lookalike.metrics import MetricsReport
from lookalike.pipeline import embed_table, extractor_from_config, rerank_context, table_from_config, validation_k
from lookalike.progress import Progress
from lookalike.rerank import build_chain, list_rerankers, run_chain
from lookalike.search import search_table

MAX_CMC1_DROP = 0.01  # a candidate may lower CMC@1 by at most one point
# parameter variants per re-ranker besides its auto defaults (published values and a smaller neighbourhood)
GRID: dict[str, list[dict[str, Any]]] = {
    "kreciprocal": [{}, {"k1": 20, "k2": 6, "lambda_value": 0.3}, {"k1": 10, "k2": 3}, {"lambda_value": 0.3}],
    "qe": [{}, {"n": 1}, {"n": 5}, {"n": 3, "alpha": 3.0}],
    "dba": [{}, {"n": 1}, {"n": 5}],
    "icfrr": [{}, {"n_times": 1}],
}


@dataclass
class Candidate:
    """One chain scored on the training split: its config steps, metrics and the seconds its re-ranking took."""

    steps: list[str | dict[str, Any]]
    cmc1: float
    map_all: float
    seconds: float

    @property
    def label(self) -> str:
        """The chain as a config value, e.g. [kreciprocal, {qe: {n: 1}}] ("none" for the original list)."""
        return yaml.safe_dump(self.steps, default_flow_style=True, width=1000).strip() if self.steps else "none"


@dataclass
class Tuning:
    """The candidates in the order they ran (the original list first) and the chosen one."""

    candidates: list[Candidate]
    best: Candidate


def candidate_steps(names: list[str] | None = None, chains: bool = True) -> list[list[str | dict[str, Any]]]:
    """The chains to try: each re-ranker over GRID (auto first), then every ordered pair at auto defaults.

    Args:
        names: the re-rankers to search (default: every registered one that needs no trained model and may run
            anywhere in a chain).
        chains: also try chains of two.

    Returns:
        Config steps of each candidate chain.
    """
    names = names or list_rerankers(needs_model=False, first_only=False, needs_images=False)
    singles = [[name if not params else {name: params}] for name in names for params in GRID.get(name, [{}])]
    pairs = [list(pair) for pair in itertools.permutations(names, 2)] if chains else []
    return singles + pairs


def _means(report: MetricsReport) -> tuple[float, float]:
    """CMC@1 and mAP@all of a report."""
    return float(report.means["cmc@1"]), float(report.means["map@all"])


def split_lists(cfg: Config, table: DatasetTable, progress: Progress | None = None):
    """Embeddings, whole-list search results and a rerank context of one arranged split (split_as_protocol)."""
    embeddings = embed_table(cfg, extractor_from_config(cfg), table, progress)
    s = cfg.search
    results = search_table(embeddings, table, validation_k(s.k, table), metric=s.metric, index=s.index, device=s.device)
    return results, embeddings


def score_chain(cfg: Config, table: DatasetTable, results, embeddings, steps: list) -> Candidate:
    """Run one chain over the lists (a fresh context: no stage's cache leaks into another candidate) and score it."""
    context = rerank_context(cfg, table, results, embeddings)
    chain = build_chain(steps)
    start = time.perf_counter()
    stages = run_chain(results, context, chain, **cfg.evaluate.metric_kwargs())
    seconds = time.perf_counter() - start
    cmc1, map_all = _means(stages[-1].report)
    return Candidate(list(steps), cmc1, map_all, seconds)


def choose(candidates: list[Candidate]) -> Candidate:
    """The highest mAP@all among the candidates whose CMC@1 is within MAX_CMC1_DROP of the original (first) one."""
    floor = candidates[0].cmc1 - MAX_CMC1_DROP
    eligible = [c for c in candidates if c.cmc1 >= floor - 1e-12]
    return max(eligible, key=lambda c: (c.map_all, c.cmc1))


def tune_rerank(
    cfg: Config,
    table: DatasetTable | None = None,
    steps: list[list] | None = None,
    progress: Progress | None = None,
    embed_progress: Progress | None = None,
) -> Tuning:
    """Score every candidate chain on the training split (never the validation split) and choose one.

    Args:
        cfg: the config (model, data, search, evaluate).
        table: the dataset table (default: data.table); only its training rows are read.
        steps: the candidate chains (default: candidate_steps()).
        progress: wraps the loop over candidates (CLI progress).
        embed_progress: wraps the embedding loop.

    Returns:
        Tuning: every candidate's CMC@1, mAP@all and time on the training split, and the chosen one.
    """
    train = split_as_protocol(table if table is not None else table_from_config(cfg), "train")
    results, embeddings = split_lists(cfg, train, embed_progress)
    steps = candidate_steps() if steps is None else steps
    original = score_chain(cfg, train, results, embeddings, [])
    loop = progress(steps, len(steps)) if progress else steps
    candidates = [original, *(score_chain(cfg, train, results, embeddings, s) for s in loop)]
    return Tuning(candidates, choose(candidates))


def validate_choice(
    cfg: Config, steps: list, table: DatasetTable | None = None, progress: Progress | None = None
) -> tuple[Candidate, Candidate]:
    """The original list and the chosen chain on the validation split (read only now, once the choice is made)."""
    val = (table if table is not None else table_from_config(cfg)).split("validation")
    results, embeddings = split_lists(cfg, val, progress)
    return score_chain(cfg, val, results, embeddings, []), score_chain(cfg, val, results, embeddings, steps)


def write_snippet(best: Candidate, path: str) -> str:
    """Write the chosen chain as a config snippet (`rerank: [...]`) atomically; the text written."""
    text = yaml.safe_dump({"rerank": best.steps}, default_flow_style=None, sort_keys=False)
    write_text_atomic(path, text)
    return text
