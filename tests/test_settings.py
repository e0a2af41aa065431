"""Typed settings (issue 17 item 4): Literal metric, positive counts, typed re-rank steps at config load, the index
folder's versioned manifest, and one evaluation transform for every entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import annotated_types
import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from lookalike import __version__, pipeline
from lookalike import extract as extract_module
from lookalike.adapt.backbones import LayerFeatures
from lookalike.cli import app
from lookalike.config import Config, RerankStep, load_config, valid_keys
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import ConfigError, LookalikeError
from lookalike.data.folder import import_folder
from lookalike.data.images import transforms_for
from lookalike.models.pairwise import PairwiseModel, PairwiseSpec
from lookalike.pipeline import embed_table, extractor_from_config, table_from_config
from lookalike.rerank.chain import build_chain, step_parts
from lookalike.serve import build_index, load_index
from lookalike.serve.manifest import read_manifest


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


# ---------------------------------------------------------------- the index folder's manifest


@pytest.fixture(scope="module")
def settings_table(omniglot_small, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("settings") / "table.csv"
    import_folder(omniglot_small, validation_fraction=0.5, seed=0).save(path)
    return path


def small_config(table: Path, *extra: str) -> Config:
    return load_config(
        None,
        [
            f"data.table={table}",
            "model.name=test_resnet",
            "model.pretrained=false",
            "data.image_size=32",
            f"serve.index_dir={table.parent / 'index'}",
            "serve.gallery=validation",
            "serve.max_upload_mb=0.2",
            "rerank=[kreciprocal, {qe: {n: 3}}]",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def index_dir(settings_table) -> Path:
    cfg = small_config(settings_table)
    return build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))


def test_index_folder_holds_a_versioned_typed_manifest(index_dir):
    manifest = read_manifest(index_dir)
    assert manifest.format_version == 2 and manifest.lookalike == __version__
    assert manifest.model.name == "test_resnet" and manifest.transform.image_size == 32
    assert manifest.serve.max_upload_mb == 0.2 and manifest.search.metric == "cosine"
    assert manifest.rerank == [RerankStep(name="kreciprocal"), RerankStep(name="qe", params={"n": 3})]
    assert manifest.created_at.tzinfo is not None and manifest.provenance["model"]["name"] == "test_resnet"
    assert Path(manifest.images_root).is_dir() and manifest.backend is None  # gallery.csv's paths start there
    index = load_index(index_dir)
    assert index.manifest == manifest and index.limits.max_upload_mb == 0.2
    assert sorted(index.rerankers) == ["kreciprocal", "qe(n=3)"]


def absolute_gallery(folder: Path, images_root: str) -> None:
    """gallery.csv and the embeddings' ids as format 1 wrote them: absolute image paths, no id column."""
    gallery = pd.read_csv(folder / "gallery.csv", dtype=str, keep_default_na=False).drop(columns="id")
    gallery["path"] = [str(Path(images_root) / p) for p in gallery["path"]]
    gallery.to_csv(folder / "gallery.csv", index=False)
    emb = Embeddings.load(folder / "embeddings.npz")
    Embeddings(emb.vectors, gallery["path"].tolist(), emb.meta).save(folder / "embeddings.npz")


def legacy_folder(index_dir: Path, folder: Path) -> Path:
    """The folder as the code before the manifest wrote it: index.json, {"format": 1, "data": ...}, string keys."""
    folder = shutil.copytree(index_dir, folder)
    new = json.loads((folder / "manifest.json").read_text())
    absolute_gallery(folder, new["images_root"])
    old = {"format": 1, "model": new["model"], "data": new["transform"], "search": new["search"], "serve": new["serve"]}
    old.update(provenance=new["provenance"], rerank=["kreciprocal", {"qe": {"n": 3}}], columns=new["columns"])
    del old["model"]["last_stride"]  # written only since last_stride existed
    (folder / "index.json").write_text(json.dumps(old, indent=2))
    (folder / "manifest.json").unlink()
    return folder


def test_a_folder_written_before_the_manifest_still_loads(index_dir, tmp_path):
    folder = legacy_folder(index_dir, tmp_path / "old")
    old, new = load_index(folder), load_index(index_dir)
    assert old.manifest.serve.max_upload_mb == 0.2 and old.manifest.format_version == 2 and not old.manifest.images_root
    assert sorted(old.rerankers) == sorted(new.rerankers)
    assert old.manifest.created_at == new.manifest.created_at  # from the provenance record's time
    image = Image.open(new.paths[3]).convert("RGB")
    np.testing.assert_array_equal(old.embed(image), new.embed(image))


def test_a_format_1_folder_is_migrated_and_still_loads(index_dir, tmp_path):
    folder = shutil.copytree(index_dir, tmp_path / "v1")
    values = json.loads((folder / "manifest.json").read_text())
    absolute_gallery(folder, values.pop("images_root"))
    (folder / "manifest.json").write_text(json.dumps({**values, "format_version": 1}))
    old, new = load_index(folder), load_index(index_dir)
    assert old.manifest.format_version == 2 and old.manifest.images_root is None
    assert old.paths.tolist() == new.paths.tolist() and old.ids.tolist() == old.paths.tolist()  # the path is the id
    np.testing.assert_array_equal(
        old.search(old.gallery.vectors[2], 5, gallery_position=2)[0].positions,
        new.search(new.gallery.vectors[2], 5, gallery_position=2)[0].positions,
    )


def rewrite(folder: Path, **changes) -> Path:
    values = json.loads((folder / "manifest.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            values[section][field] = value
        else:
            values[section] = value
    (folder / "manifest.json").write_text(json.dumps(values))
    return folder


def test_a_newer_manifest_is_one_line_asking_for_an_upgrade(index_dir, tmp_path):
    folder = rewrite(shutil.copytree(index_dir, tmp_path / "index"), format_version=7)
    with pytest.raises(LookalikeError) as info:
        load_index(folder)
    assert str(info.value) == (
        f"{folder / 'manifest.json'}: format_version 7 is newer than this lookalike reads (2); upgrade lookalike"
    )
    code, _, stderr = cli("serve", str(folder))
    assert code == 2 and stderr.strip().count("\n") == 0 and "format_version 7 is newer" in stderr, stderr


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"serve__max_upload_mb": "lots"}, "serve.max_upload_mb: Input should be a valid number"),
        ({"serve__max_pixels": -1}, "serve.max_pixels: must be > 0, got -1"),
        ({"search__metric": "cosin"}, "search.metric: Input should be 'cosine' or 'euclidean', got 'cosin'"),
        ({"transform__mean": "imagenet"}, "transform.mean: Input should be a valid list"),
        ({"model": None}, "model: Input should be a valid dictionary or instance of ModelSpec"),
        ({"format_version": "1"}, "format_version: expected 2, got '1'"),
        ({"extra": 1}, "extra: Extra inputs are not permitted"),
    ],
)
def test_a_wrongly_typed_manifest_is_one_line_naming_file_and_field(index_dir, tmp_path, changes, message):
    folder = rewrite(shutil.copytree(index_dir, tmp_path / "index"), **changes)
    with pytest.raises(LookalikeError) as info:
        load_index(folder)
    assert str(info.value).startswith(f"{folder / 'manifest.json'}: {message}") and "\n" not in str(info.value)


def test_a_corrupt_or_missing_manifest_is_one_line(index_dir, tmp_path):
    folder = shutil.copytree(index_dir, tmp_path / "index")
    (folder / "manifest.json").write_text('{"format_version": 1, "model": ')
    with pytest.raises(LookalikeError, match=r"manifest\.json: not valid JSON \(.*\); rebuild with `lookalike index`$"):
        load_index(folder)
    (folder / "manifest.json").write_text("[1]")
    with pytest.raises(LookalikeError, match=r"manifest\.json: expected a JSON object, got list$"):
        load_index(folder)
    del_model = json.loads((index_dir / "manifest.json").read_text())
    del del_model["model"]
    (folder / "manifest.json").write_text(json.dumps(del_model))
    with pytest.raises(LookalikeError, match=r"manifest\.json: model: missing$"):
        load_index(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(LookalikeError, match=r"manifest\.json: missing \(expected a folder written by"):
        load_index(folder)


# ---------------------------------------------------------------- one evaluation transform


@pytest.mark.parametrize("size", [32, [40, 24]], ids=["square", "height-width"])
def test_every_entry_point_gets_the_transform_of_transforms_for(settings_table, tmp_path, monkeypatch, size):
    side = json.dumps(size).replace(" ", "")
    cfg = small_config(settings_table, f"data.image_size={side}", f"serve.index_dir={tmp_path / 'index'}")
    extractor = extractor_from_config(cfg)
    reference = transforms_for(extractor, cfg.data)
    seen = {}

    def capture(name):
        def extract(extractor, table, transform, *args, **kwargs):
            seen[name] = transform
            return Embeddings(np.zeros((len(table), 4), np.float32), [str(p) for p in table.image_paths()])

        return extract

    table = table_from_config(cfg)
    monkeypatch.setattr(pipeline, "extract_embeddings", capture("pipeline (extract, index)"))
    embed_table(cfg, extractor, table)
    monkeypatch.setattr(extract_module, "extract_embeddings", capture("Extractor.embed"))
    extractor.embed(table)
    monkeypatch.undo()
    seen["Extractor.transform"] = extractor.transform()
    seen["serve"] = load_index(build_index(cfg, table, extractor)).transform
    spec = PairwiseSpec(name="test_resnet", image_size=size, crop_fraction=cfg.data.crop_fraction)
    seen["pairwise"] = PairwiseModel(spec).transform()
    seen["adapt backbone"] = transforms_for(
        LayerFeatures(timm.create_model("test_resnet"), [0], "test_resnet"), cfg.data
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 37, 3), dtype=np.uint8))
    expected = reference(image)
    assert expected.shape[1:] == ((32, 32) if size == 32 else (40, 24))
    for name, transform in seen.items():
        assert torch.equal(transform(image), expected), name
    assert len(seen) == 6
