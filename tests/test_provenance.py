"""Provenance: every output records the model, weights, config and table behind it; search / evaluate / rerank refuse
inputs made from another table or model (old files without a record: a warning)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from helpers import LOOKALIKE
from lookalike.config import load_config
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeWarning, ProvenanceError
from lookalike.core.results import RetrievalResults
from lookalike.data.folder import import_folder
from lookalike.models.extractor import Extractor
from lookalike.pipeline import (
    extractor_from_config,
    run_evaluate,
    run_extract,
    run_rerank,
    run_search,
    table_from_config,
)
from lookalike.provenance import config_sha256, flat_config
from lookalike.serve import build_index

FAST = ["model.name=test_resnet", "model.pretrained=false", "data.image_size=32", "data.batch_size=40", "search.k=10"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(omniglot_small, tmp_path_factory):
    """Two tables of the same images split differently; extract + search + evaluate made from table a.csv."""
    folder = tmp_path_factory.mktemp("provenance")
    import_folder(omniglot_small, validation_fraction=0.5, seed=0).save(folder / "a.csv")
    import_folder(omniglot_small, validation_fraction=0.5, seed=1).save(folder / "b.csv")
    cfg = config(folder, "a.csv")
    table = table_from_config(cfg)
    torch.manual_seed(0)
    run_extract(cfg, table)
    run_search(cfg, table)
    run_evaluate(cfg, table)
    return folder


def config(folder: Path, table: str, *extra: str):
    outputs = [
        f"extract.output={folder / 'emb.npz'}",
        f"search.output={folder / 'res.npz'}",
        f"evaluate.output={folder / 'metrics.json'}",
        "evaluate.grid=null",
        "evaluate.cmc_plot=null",
        f"search.reranked_output={folder / 'reranked.npz'}",
    ]
    return load_config(None, [*FAST, f"data.table={folder / table}", *outputs, *extra])


def test_every_output_records_model_table_and_config(run):
    cfg = config(run, "a.csv")
    records = [
        Embeddings.load(run / "emb.npz").meta["provenance"],
        RetrievalResults.load(run / "res.npz").meta["provenance"],
        json.loads((run / "metrics.json").read_text())["provenance"],
    ]
    for record in records:
        assert record["model"] == {"name": "test_resnet", "pretrained": False, "weights": None, "weights_sha256": None}
        assert record["table"] == {"path": str(run / "a.csv"), "sha256": sha256(run / "a.csv")}
        assert record["config_sha256"] == config_sha256(cfg) and record["config"]["data"]["image_size"] == 32
        assert record["lookalike"] and record["time"].startswith("20")


def test_weights_are_recorded_with_their_digest_and_the_index_too(run, tmp_path):
    torch.save(Extractor("test_resnet").state_dict(), tmp_path / "w.pt")
    cfg = config(
        run,
        "a.csv",
        f"model.weights={tmp_path / 'w.pt'}",
        f"serve.index_dir={tmp_path / 'index'}",
        "serve.gallery=validation",
    )
    folder = build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))
    record = json.loads((folder / "manifest.json").read_text())["provenance"]
    assert record["model"]["weights"] == str(tmp_path / "w.pt") and record["model"]["weights_sha256"] == sha256(
        tmp_path / "w.pt"
    )
    assert record["table"]["sha256"] == sha256(run / "a.csv")


def test_evaluate_refuses_results_made_from_another_table(run):
    cfg = config(run, "b.csv", f"evaluate.output={run / 'stale.json'}")
    a, b = sha256(run / "a.csv")[:12], sha256(run / "b.csv")[:12]
    expected = (
        f"res.npz was made from table {run / 'a.csv'} (sha256 {a}) but evaluate reads {run / 'b.csv'} (sha256 {b}); "
        "rerun search"
    )
    with pytest.raises(ProvenanceError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        run_evaluate(cfg, table_from_config(cfg))
    assert not (run / "stale.json").exists()


def test_a_table_edited_in_place_is_another_table(run, tmp_path):
    edited = tmp_path / "a.csv"
    edited.write_text((run / "a.csv").read_text().replace("True", "False", 1))  # one query fewer, same path name
    cfg = config(run, "a.csv", f"data.table={edited}")
    with pytest.raises(ProvenanceError, match="was made from table .* but search reads .*; rerun extract"):
        run_search(cfg, table_from_config(cfg))


def test_evaluate_search_and_rerank_refuse_another_model(run, tmp_path):
    torch.save(Extractor("test_resnet").state_dict(), tmp_path / "w.pt")
    cases = [
        (
            run_evaluate,
            "evaluate",
            "search",
            ["model.name=resnet18"],
            r"test_resnet \(random init\)",
            r"resnet18 \(random init\)",
        ),
        (
            run_search,
            "search",
            "extract",
            [f"model.weights={tmp_path / 'w.pt'}"],
            r"test_resnet \(random init\)",
            r"test_resnet with weights .*w\.pt \(sha256 \w{12}\)",
        ),
        (
            run_rerank,
            "rerank",
            "search",
            ["model.pretrained=true", "rerank=[qe]"],
            r"test_resnet \(random init\)",
            r"test_resnet \(timm pretrained\)",
        ),
    ]
    for step, command, rerun, extra, made, now in cases:
        cfg = config(
            run,
            "a.csv",
            *extra,
            f"evaluate.output={tmp_path / 'm.json'}",
            f"search.reranked_output={tmp_path / 'r.npz'}",
        )
        with pytest.raises(
            ProvenanceError,
            match=rf"was made by model {made} but {command} is configured with {now}; rerun {rerun}, or set model",
        ):
            step(cfg, table_from_config(cfg))
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "r.npz").exists()


def test_old_files_without_provenance_are_read_with_a_warning(run, tmp_path):
    old = RetrievalResults.load(run / "res.npz")
    RetrievalResults(old.indices, old.distances, old.query_ids, old.gallery_ids, {"k": 10}).save(tmp_path / "old.npz")
    cfg = config(run, "b.csv", f"evaluate.results={tmp_path / 'old.npz'}", f"evaluate.output={tmp_path / 'm.json'}")
    with pytest.warns(LookalikeWarning, match="old.npz records no provenance .* rerun search to record it"):
        run_evaluate(cfg, table_from_config(cfg))
    assert "provenance" in json.loads((tmp_path / "m.json").read_text())


def test_matching_inputs_pass_without_warnings(run, tmp_path):
    cfg = config(run, "a.csv", f"evaluate.output={tmp_path / 'm.json'}", "rerank=[qe]")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LookalikeWarning)
        run_evaluate(cfg, table_from_config(cfg))
        stages = run_rerank(cfg, table_from_config(cfg))
    assert RetrievalResults.load(cfg.search.reranked_output).meta["provenance"]["table"]["sha256"] == sha256(
        run / "a.csv"
    )
    assert json.loads((tmp_path / "metrics_rerank.json").read_text())["provenance"]["model"]["name"] == "test_resnet"
    assert len(stages) == 2


def test_the_flattened_config_is_what_tensorboard_accepts():
    flat = flat_config(load_config(None, ["model.name=resnet18", "rerank=[qe]", "train.loss.margin=null"]))
    assert flat["model.name"] == "resnet18" and flat["train.loss.margin"] == "null" and flat["rerank"] == '["qe"]'
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values()) and "train.loss.triplet" in flat


def test_the_cli_refuses_a_stale_result_in_one_line(run):
    done = subprocess.run(
        [
            LOOKALIKE,
            "evaluate",
            *(f"{k}={v}" for k, v in (a.split("=", 1) for a in FAST)),
            f"data.table={run / 'b.csv'}",
            f"search.output={run / 'res.npz'}",
            f"evaluate.output={run / 'cli.json'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert (
        "res.npz was made from table" in done.stderr
        and "but evaluate reads" in done.stderr
        and "rerun search" in done.stderr
    )
    assert not (run / "cli.json").exists()
