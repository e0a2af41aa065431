"""The re-ranking chain: config steps, per-stage metrics, centroids as the first stage, the `lookalike rerank`
pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import unfiled_validation
from lookalike.config import load_config
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import ConfigError, LookalikeError
from lookalike.pipeline import rerank_context, run_rerank
from lookalike.rerank import ICFRR, QueryExpansion, build_chain, run_chain
from lookalike.search import search_table


def clustered_table(tmp_path, n_labels=6, per_label=8, dim=16, seed=0):
    """A validation table (every row query + gallery, no files) and clustered unit embeddings for it."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_labels), per_label)
    centres = rng.standard_normal((n_labels, dim))
    vectors = centres[labels] + 0.9 * rng.standard_normal((len(labels), dim))
    return unfiled_validation(tmp_path, labels, vectors)


def test_steps_parse_from_names_and_mappings():
    chain = build_chain(["qe", {"name": "icfrr", "kg": 10, "kq": 5}, {"qe": {"n": 3}}])
    assert [type(r) for r in chain] == [QueryExpansion, ICFRR, QueryExpansion]
    assert chain[1].kg == 10 and chain[2].n == 3
    with pytest.raises(LookalikeError, match=r"unknown re-ranker 'icfr'; expected one of .*icfrr"):
        build_chain(["icfr"])
    with pytest.raises(ConfigError, match=r"rerank\[1\]: expected a re-ranker name"):
        build_chain(["qe", {"a": 1, "b": 2}])


def test_chain_scores_every_stage_and_keeps_lists_ascending(tmp_path):
    table, emb = clustered_table(tmp_path)
    cfg = load_config(None, ["search.k=47"])
    results = search_table(emb, table, k=47)
    context = rerank_context(cfg, table, results, emb)
    stages = run_chain(results, context, build_chain([{"name": "qe", "n": 3}, {"name": "icfrr", "kg": 8, "kq": 5}]))
    assert [s.name for s in stages] == ["original", "qe", "icfrr"]
    for stage in stages:
        assert stage.report.n_evaluated == 48
        d = stage.results.distances
        assert (np.diff(d, axis=1) >= -1e-6).all()
        assert not (stage.results.indices == np.arange(48)[:, None]).any()  # a query never retrieves itself
    assert stages[1].report.means["map@all"] != stages[0].report.means["map@all"]


def test_centroids_first_then_icfrr_on_the_centroids(tmp_path):
    table, emb = clustered_table(tmp_path)
    results = search_table(emb, table, k=47)
    context = rerank_context(load_config(), table, results, emb)
    stages = run_chain(
        results, context, build_chain(["centroids", {"name": "icfrr", "kg": 3, "kq": 2, "candidates": 6}])
    )
    centroid = stages[1].results
    assert len(centroid.gallery_ids) == 6 and centroid.gallery_ids[0].startswith("label=")
    assert (centroid.valid.sum(1) == 6).all()  # every label's centroid, the own one left-one-out
    assert stages[1].report.n_evaluated == 48 and stages[2].report.n_evaluated == 48
    assert stages[1].report.means["cmc@1"] >= stages[0].report.means["cmc@1"] - 0.1


def test_rerank_pipeline_writes_final_list_and_stage_metrics(tmp_path):
    table, emb = clustered_table(tmp_path)
    table.save(tmp_path / "table.csv")
    emb.save(tmp_path / "emb.npz")
    overrides = [
        f"data.table={tmp_path / 'table.csv'}",
        f"extract.output={tmp_path / 'emb.npz'}",
        f"search.output={tmp_path / 'res.npz'}",
        "search.k=47",
        f"search.reranked_output={tmp_path / 'reranked.npz'}",
        f"evaluate.output={tmp_path / 'm.json'}",
        f"evaluate.cmc_plot={tmp_path / 'cmc.png'}",
        "rerank=[qe,kreciprocal]",
    ]
    cfg = load_config(None, overrides)
    search_table(emb, table, k=47).save(cfg.search.output)
    stages = run_rerank(cfg, table)
    assert [s.name for s in stages] == ["original", "qe", "kreciprocal"]
    record = json.loads((tmp_path / "metrics_rerank.json").read_text())
    assert list(record) == ["original", "1:qe", "2:kreciprocal", "provenance"]
    assert record["provenance"]["table"]["path"] == str(tmp_path / "table.csv")
    assert (tmp_path / "reranked.npz").is_file() and (tmp_path / "cmc_rerank.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="rerank: expected a chain"):
        run_rerank(load_config(None, overrides[:-1]), table)


def test_a_reranker_used_twice_keeps_both_stages(tmp_path):
    from lookalike.rerank.chain import stage_reports

    table, emb = clustered_table(tmp_path)
    results = search_table(emb, table, k=47)
    stages = run_chain(results, rerank_context(load_config(), table, results, emb), build_chain(["qe", "qe"]))
    reports = stage_reports(stages)
    assert list(reports) == ["original", "1:qe", "2:qe"] and reports["2:qe"] is stages[2].report


@pytest.mark.parametrize(
    "steps", [["kreciprocal", "centroids"], ["centroids", "qe", {"centroids": {"per_sequence": True}}]]
)
def test_a_first_only_stage_elsewhere_is_refused(tmp_path, steps):
    """Was: rerank=[kreciprocal, centroids] ran and equalled centroids alone (the k-reciprocal stage silently
    discarded)."""
    position = len(steps) - 1
    with pytest.raises(ConfigError, match=rf"^rerank\[{position}\]: centroids must be the first stage of the chain"):
        build_chain(steps)
    table, emb = clustered_table(tmp_path)
    table.save(tmp_path / "table.csv")
    cfg = load_config(
        None,
        [
            f"data.table={tmp_path / 'table.csv'}",
            f"search.output={tmp_path / 'missing.npz'}",
            f"rerank={json.dumps(steps)}",
        ],
    )
    with pytest.raises(ConfigError, match=r"must be the first stage"):  # before the results file is even read
        run_rerank(cfg, table)


def test_a_pairwise_only_chain_needs_no_embeddings_file(omniglot_small, tmp_path):
    """Was: "runs/embeddings.npz: no such embeddings file" although the pairwise stage reads only images."""
    from helpers import save_pairwise
    from lookalike.data.folder import import_folder
    from lookalike.models.pairwise import PairwiseModel
    from lookalike.train.pairwise import pairwise_spec

    table = import_folder(omniglot_small, validation_fraction=0.25, seed=0).split("validation")
    paths = table.frame["path"].to_numpy(str)
    vectors = np.random.default_rng(0).standard_normal((len(paths), 8)).astype(np.float32)
    spec_cfg = load_config(None, ["pairwise.name=test_vit", "pairwise.pretrained=false", "data.image_size=32"])
    weights = save_pairwise(PairwiseModel(pairwise_spec(spec_cfg)), tmp_path / "pairwise.pt")
    chain = f"rerank=[{{pairwise: {{weights: {weights}, top_n: 3, progress: false}}}}]"
    cfg = load_config(
        None,
        [
            f"extract.output={tmp_path / 'no_embeddings.npz'}",
            f"search.output={tmp_path / 'res.npz'}",
            f"search.reranked_output={tmp_path / 'reranked.npz'}",
            f"evaluate.output={tmp_path / 'm.json'}",
            "evaluate.cmc_plot=null",
            "evaluate.grid=null",
            chain,
        ],
    )
    search_table(Embeddings(vectors, paths), table, k=10).save(cfg.search.output)
    stages = run_rerank(cfg, table)
    assert [s.name for s in stages] == ["original", "pairwise"] and (tmp_path / "reranked.npz").is_file()
    assert not (tmp_path / "no_embeddings.npz").exists()
