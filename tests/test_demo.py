"""The demo's stage lines: each re-ranker judged on its headline metric against the stage before it."""

from __future__ import annotations

import numpy as np

from lookalike.core.results import RetrievalResults
from lookalike.demo import StageGain, stage_gains
from lookalike.metrics import MetricsReport
from lookalike.rerank import Stage


def _stage(name: str, cmc1: float, map_all: float) -> Stage:
    results = RetrievalResults(
        np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32), np.array(["q"]), np.array(["g"])
    )
    report = MetricsReport(per_query={}, means={"cmc@1": cmc1, "map@all": map_all}, n_queries=1, no_relevant_ids=[])
    return Stage(name, results, report)


def test_each_stage_states_its_headline_gain_over_the_one_before():
    stages = [_stage("original", 0.70, 0.50), _stage("kreciprocal", 0.68, 0.60), _stage("pairwise", 0.75, 0.61)]
    gains = stage_gains(stages)
    assert [g.line() for g in gains] == [
        "stage k-reciprocal re-ranking: mAP@all 0.500 -> 0.600 (+10.0 points)",
        "stage STIR pairwise re-ranker (top 5): CMC@1 0.680 -> 0.750 (+7.0 points)",
    ]


def test_a_stage_that_hurts_prints_a_negative_gain():
    assert (
        StageGain("trained extractor", "cmc@1", 0.412, 0.3).line()
        == "stage trained extractor: CMC@1 0.412 -> 0.300 (-11.2 points)"
    )
