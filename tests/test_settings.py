"""Typed settings (issue 17 item 4): Literal metric, positive counts, typed re-rank steps at config load."""

from __future__ import annotations

import annotated_types
import pytest
import yaml
from typer.testing import CliRunner

from lookalike.cli import app
from lookalike.config import Config, RerankStep, load_config, valid_keys
from lookalike.errors import ConfigError
from lookalike.rerank.chain import build_chain, step_parts


def cli(*args: str):
    """The `lookalike` command in-process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _field(key: str):
    model, *path, name = [Config, *key.split(".")]
    for part in path:
        model = model.model_fields[part].annotation
    return model.model_fields[name]


def _bound(key: str) -> type | None:
    """The lower-bound constraint (Gt or Ge) of a scalar number field, looking inside `PositiveInt | None`."""
    field = _field(key)
    metadata = list(field.metadata)
    for member in getattr(field.annotation, "__args__", ()):  # the constraint sits on the union's member
        if getattr(member, "__origin__", None) in (int, float):
            metadata += [m for info in member.__metadata__ for m in getattr(info, "metadata", [info])]
    return next((type(m) for m in metadata if isinstance(m, (annotated_types.Gt, annotated_types.Ge))), None)


POSITIVE = [key for key in valid_keys() if _bound(key) is annotated_types.Gt]
COUNTS = [key for key in valid_keys() if _bound(key) is annotated_types.Ge]


def test_the_counts_the_issue_names_are_positive():
    assert {"search.k", "train.p", "train.k", "train.epochs", "data.batch_size", "serve.candidates"} <= set(POSITIVE)
    assert {"model.last_stride", "model.embedding_dim", "train.batches_per_epoch"} <= set(POSITIVE)
    assert {"data.num_workers", "train.warmup_epochs"} <= set(COUNTS)


@pytest.mark.parametrize("key", POSITIVE)
@pytest.mark.parametrize("value", ["-3", "0"])
def test_every_positive_setting_refuses_zero_and_negatives_in_one_line(key, value):
    listed = _field(key).annotation.__origin__ is list if hasattr(_field(key).annotation, "__origin__") else False
    with pytest.raises(ConfigError) as info:  # a list of counts (evaluate.cmc_k) names the bad item
        load_config(None, [f"{key}=[1,{value}]" if listed else f"{key}={value}"])
    assert str(info.value) == f"{key}{'.1' if listed else ''}: must be > 0, got {value}"


@pytest.mark.parametrize("key", COUNTS)
def test_every_count_takes_zero_and_refuses_negatives(key):
    load_config(None, [f"{key}=0"])
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}=-3"])
    assert str(info.value) == f"{key}: must be >= 0, got -3"


@pytest.mark.parametrize("key", ["max_aspect_ratio", "search_timeout", "read_timeout", "upload_timeout"])
def test_serve_limits_share_the_positive_float_wording(key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"serve.{key}=-3"])
    assert str(info.value) == f"serve.{key}: must be > 0, got -3"


def test_metric_is_a_literal_checked_at_load():
    assert load_config(None, ["search.metric=euclidean"]).search.metric == "euclidean"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["search.metric=cosin"])
    assert str(info.value) == "search.metric: Input should be 'cosine' or 'euclidean', got 'cosin'"
    code, _, stderr = cli("search", "search.metric=manhattan")
    assert code == 2 and stderr.strip().count("\n") == 0 and "search.metric" in stderr, stderr


def test_rerank_steps_are_typed_from_every_yaml_form(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rerank:\n  - centroids\n  - {name: icfrr, kg: 10}\n  - {qe: {n: 3}}\n  - {dba: null}\n")
    steps = load_config(path).rerank
    assert steps == [
        RerankStep(name="centroids"),
        RerankStep(name="icfrr", params={"kg": 10}),
        RerankStep(name="qe", params={"n": 3}),
        RerankStep(name="dba"),
    ]
    assert [step_parts(step) for step in steps] == [
        ("centroids", {}),
        ("icfrr", {"kg": 10}),
        ("qe", {"n": 3}),
        ("dba", {}),
    ]
    assert [r.name for r in build_chain(steps)] == ["centroids", "icfrr", "qe", "dba"]


def test_unknown_reranker_fails_at_config_load_naming_its_position():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["rerank=[kreciprocal, foo]"])
    assert str(info.value) == (
        "rerank[1]: unknown re-ranker 'foo'; expected one of centroids, dba, icfrr, kreciprocal, pairwise, qe"
    )
    with pytest.raises(ConfigError, match=r"^rerank\[0\]: expected a re-ranker name or \{name: \.\.\., "):
        load_config(None, ["rerank=[5]"])
    code, _, stderr = cli("rerank", "rerank=[{name: nope, k: 3}]")  # before any file is read
    assert code == 2 and stderr.strip().count("\n") == 0 and "rerank[0]: unknown re-ranker 'nope'" in stderr


def test_config_show_round_trips_the_dict_form(tmp_path):
    code, stdout, stderr = cli("config", "show", "rerank=[centroids, {name: icfrr, kg: 10}, {qe: {n: 3}}]")
    assert code == 0, stderr
    shown = yaml.safe_load(stdout)
    assert shown["rerank"] == ["centroids", {"name": "icfrr", "kg": 10}, {"name": "qe", "n": 3}]
    path = tmp_path / "shown.yaml"
    path.write_text(stdout)
    assert load_config(path) == load_config(None, ["rerank=[centroids, {name: icfrr, kg: 10}, {qe: {n: 3}}]"])
