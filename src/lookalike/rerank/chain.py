"""A chain of re-rankers built from config steps, with the metrics of the list after every stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lookalike.core.errors import ConfigError
from lookalike.core.results import RetrievalResults
from lookalike.core.steps import RerankStep
from lookalike.metrics import MetricsReport, compute_metrics
from lookalike.rerank.base import RerankContext, Reranker, check_ascending, create_reranker


@dataclass
class Stage:
    """The list after one stage of the chain ("original" first) and its metrics when ground truth is known."""

    name: str
    results: RetrievalResults
    report: MetricsReport | None = None


def build_chain(steps: Sequence[RerankStep | str | dict[str, Any]]) -> list[Reranker]:
    """Re-rankers from config steps (RerankStep, or its YAML forms: "icfrr", {"name": "icfrr", "kg": 10, ...},
    {"icfrr": {"kg": 10}}); a stage that must come first (centroids) anywhere else is an error, not a stage that
    silently undoes the others."""
    chain = [_build_step(step, i) for i, step in enumerate(steps)]
    for i, reranker in enumerate(chain[1:], 1):
        if reranker.first_only:
            raise ConfigError(
                f"rerank[{i}]: {reranker.name} must be the first stage of the chain (it ranks a gallery of its own, "
                f"discarding what {chain[i - 1].name} did before it); move it to the front"
            )
    return chain


def uses_embeddings(chain: list[Reranker]) -> bool:
    """Whether any stage reads the query / gallery embeddings (a pairwise-only chain needs none)."""
    return any(reranker.needs_vectors for reranker in chain)


def step_parts(step: RerankStep | str | dict[str, Any], position: int = 0) -> tuple[str, dict[str, Any]]:
    """A step's re-ranker name and (a copy of its) parameters; a YAML form is typed first (RerankStep.parse)."""
    typed = RerankStep.parse(step, position)
    return typed.name, dict(typed.params)


def _build_step(step: RerankStep | str | dict[str, Any], position: int) -> Reranker:
    name, params = step_parts(step, position)
    return create_reranker(name, **params)


def stage_report(results: RetrievalResults, context: RerankContext, **metric_kwargs) -> MetricsReport | None:
    """Metrics of a stage's list against the context's ground truth (None when the context has no labels)."""
    if context.query_labels is None or context.gallery_labels is None:
        return None
    exclude = context.exclude if context.n_relevant is None else None
    return compute_metrics(
        results,
        context.query_labels,
        context.gallery_labels,
        n_relevant=context.n_relevant,
        exclude=exclude,
        **metric_kwargs,
    )


def stage_reports(stages: list[Stage]) -> dict[str, MetricsReport]:
    """Each scored stage's report by its key: "original", then "1:icfrr", "2:qe", ... (a re-ranker may appear twice)."""
    return {
        stage.name if i == 0 else f"{i}:{stage.name}": stage.report for i, stage in enumerate(stages) if stage.report
    }


def run_chain(
    results: RetrievalResults, context: RerankContext, rerankers: list[Reranker], **metric_kwargs
) -> list[Stage]:
    """Apply the re-rankers in turn; every stage's list is checked (ascending distances) and scored."""
    stages = [Stage("original", results, stage_report(results, context, **metric_kwargs))]
    for reranker in rerankers:
        results = reranker.rerank(results, context)
        check_ascending(results)
        stages.append(Stage(reranker.name, results, stage_report(results, context, **metric_kwargs)))
    return stages
