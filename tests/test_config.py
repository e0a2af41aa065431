"""Configs: defaults < YAML file < key=value overrides, and one-line errors for every mistake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lookalike.config import Config, ModelConfig, load_config, valid_keys
from lookalike.core.errors import ConfigError, LookalikeError


def write_yaml(directory: Path, text: str, name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def config_error(match: str, *args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(*args, **kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, LookalikeError)
    return info.value


def test_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name is None and cfg.model.pretrained is True  # None: the weights' model, else resnet50
    assert cfg.data.table is None and cfg.data.image_size == 224
    assert cfg.evaluate.cmc_k == [1, 5, 10]
    assert cfg.search.metric == "cosine"


def test_yaml_file_and_overrides_precedence(tmp_path):
    path = write_yaml(
        tmp_path, "model:\n  name: resnet18\n  pretrained: false\ndata:\n  batch_size: 8\n  table: data/t.csv\n"
    )
    from_file = load_config(path)
    assert from_file.model.name == "resnet18"  # file over defaults
    assert from_file.model.pretrained is False
    assert from_file.data.batch_size == 8
    assert from_file.data.image_size == 224  # untouched default
    cfg = load_config(path, ["model.name=vit_small_patch16_224", "data.image_size=32"])
    assert cfg.model.name == "vit_small_patch16_224"  # override over file
    assert cfg.data.image_size == 32  # override over default
    assert cfg.data.batch_size == 8 and cfg.data.table == "data/t.csv" and cfg.model.pretrained is False


def test_later_override_wins():
    assert load_config(overrides=["search.k=5", "search.k=7"]).search.k == 7


def test_override_values_are_typed():
    cfg = load_config(
        overrides=[
            "data.crop_fraction=1",
            "model.pretrained=false",
            "model.embedding_dim=128",
            "evaluate.grid=null",
            "data.root=/x",
        ]
    )
    assert cfg.data.crop_fraction == 1.0 and isinstance(cfg.data.crop_fraction, float)
    assert cfg.model.pretrained is False
    assert cfg.model.embedding_dim == 128
    assert cfg.evaluate.grid is None
    assert cfg.data.root == "/x"


def test_list_values():
    cfg = load_config(overrides=["evaluate.cmc_k=[1,2]", "evaluate.map_k=[3]"])
    assert cfg.evaluate.cmc_k == [1, 2]
    assert cfg.evaluate.map_k == [3]
    assert cfg.evaluate.precision_k == [5, 10]


def test_list_in_yaml_replaces_default_and_override_replaces_file(tmp_path):
    path = write_yaml(tmp_path, "evaluate:\n  cmc_k: [2, 4]\n")
    assert load_config(path).evaluate.cmc_k == [2, 4]
    assert load_config(path, ["evaluate.cmc_k=[1]"]).evaluate.cmc_k == [1]


def test_base_config_is_the_starting_point(tmp_path):
    base = Config(model=ModelConfig(name="resnet18", normalize=False))
    cfg = load_config(write_yaml(tmp_path, "search:\n  k: 3\n"), ["model.normalize=true"], base=base)
    assert cfg.model.name == "resnet18"
    assert cfg.model.normalize is True
    assert cfg.search.k == 3


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == Config()
    assert load_config(write_yaml(tmp_path, "# only a comment\n", "c.yaml")) == Config()


def test_valid_keys_lists_every_leaf():
    keys = valid_keys()
    assert "data.table" in keys and "evaluate.cmc_k" in keys and "model.name" in keys
    assert "data" not in keys
    assert len(keys) == len(set(keys))


# --- errors --------------------------------------------------------------------------------


def test_unknown_override_key_lists_its_section():
    err = config_error(
        r"^override: unknown key 'model\.nam'; valid keys: model\.name, model\.pretrained, model\.weights, "
        r"model\.embedding_dim, model\.normalize, model\.last_stride, model\.bnneck$",
        overrides=["model.nam=x"],
    )
    assert "data.table" not in str(err)


def test_unknown_override_section_lists_all_keys():
    err = config_error(r"^override: unknown key 'fitter'; valid keys: data\.table, ", overrides=["fitter.epochs=3"])
    assert "evaluate.grid_top_k" in str(err)


def test_unknown_yaml_key_lists_its_section(tmp_path):
    path = write_yaml(tmp_path, "search:\n  k: 5\n  topk: 3\n")
    err = config_error(
        rf"^{re.escape(str(path))}: unknown key 'search\.topk'; valid keys: search\.embeddings, search\.output, "
        r"search\.k, ",
        path,
    )
    assert "model.name" not in str(err)


def test_unknown_yaml_section(tmp_path):
    path = write_yaml(tmp_path, "modle:\n  name: x\n")
    config_error(r"unknown key 'modle'; valid keys: data\.table, ", path)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        pytest.param(["data.batch_size=abc"], r"^data\.batch_size: .*integer.*, got 'abc'$", id="int"),
        pytest.param(["data.crop_fraction=big"], r"^data\.crop_fraction: .*number.*, got 'big'$", id="float"),
        pytest.param(["model.pretrained=maybe"], r"^model\.pretrained: .*boolean.*, got 'maybe'$", id="bool"),
        pytest.param(["evaluate.cmc_k=[1,x]"], r"^evaluate\.cmc_k\.1: .*integer.*, got 'x'$", id="list-item"),
        pytest.param(["evaluate.cmc_k=5"], r"^evaluate\.cmc_k: .*list.*, got 5$", id="list"),
        pytest.param(["model.weights.path=x"], r"^model\.weights: .*string.*", id="mapping-for-str"),
    ],
)
def test_bad_type_names_the_dotted_field(overrides, match):
    config_error(match, overrides=overrides)


def test_bad_type_in_yaml_names_the_dotted_field(tmp_path):
    config_error(r"^search\.k: .*integer.*, got 'many'$", write_yaml(tmp_path, "search:\n  k: many\n"))


def test_section_that_is_not_a_mapping(tmp_path):
    config_error(r"^override: data: expected a mapping of keys, got 5$", overrides=["data=5"])
    path = write_yaml(tmp_path, "model: resnet18\n")
    config_error(rf"^{re.escape(str(path))}: model: expected a mapping of keys, got 'resnet18'$", path)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "- a\n- b\n")
    config_error(rf"^{re.escape(str(path))}: config: expected a mapping of keys, got \['a', 'b'\]$", path)


@pytest.mark.parametrize("override", ["model.name", "=resnet18", ""])
def test_override_without_equals(override):
    config_error(
        rf"^override '{override}': expected key=value, e\.g\. model\.name=resnet18$", overrides=["search.k=3", override]
    )


def test_malformed_override_value():
    config_error(r"^overrides: ", overrides=["evaluate.cmc_k=[1,2"])


def test_missing_config_file(tmp_path):
    config_error(r"nope\.yaml: no such config file$", tmp_path / "nope.yaml")
    config_error(r"no such config file$", tmp_path)


def test_invalid_yaml(tmp_path):
    path = write_yaml(tmp_path, "model:\n  name: [unclosed\n")
    config_error(rf"^{re.escape(str(path))}: not valid YAML \(", path)
    path = write_yaml(tmp_path, "model:\n\tname: x\n", "tab.yaml")
    config_error(r"tab\.yaml: not valid YAML \(", path)
