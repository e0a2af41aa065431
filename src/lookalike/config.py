"""Typed configs: a YAML file plus `section.key=value` overrides, validated by pydantic with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, ValidationError

from lookalike.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    table: str | None = None  # dataset CSV
    root: str | None = None  # folder that relative paths start from; default: the CSV's folder
    image_size: int = 224
    crop_fraction: float = 0.875
    batch_size: int = 64
    num_workers: int = 0


class ModelConfig(Section):
    name: str = "resnet50"  # any timm model name
    pretrained: bool = True  # download timm's pretrained weights
    weights: str | None = None  # local state dict or Lightning checkpoint, loaded after creation
    embedding_dim: int | None = None  # linear projection after pooling; None keeps the backbone's features
    normalize: bool = True  # L2-normalise embeddings


class ExtractConfig(Section):
    output: str = "runs/embeddings.npz"
    device: str = "cpu"
    split: str | None = "validation"  # embed only this split; None embeds every row


class SearchConfig(Section):
    embeddings: str | None = None  # default: extract.output
    output: str = "runs/results.npz"
    k: int = 100
    metric: str = "cosine"  # cosine | euclidean
    index: str = "exact"  # exact, or a FAISS factory string: Flat, IVF256,Flat, HNSW32, ...
    device: str = "cpu"


class EvaluateConfig(Section):
    results: str | None = None  # default: search.output
    output: str = "runs/metrics.json"
    cmc_k: list[int] = [1, 5, 10]
    precision_k: list[int] = [5, 10]
    map_k: list[int] = [5, 10, 100]
    grid: str | None = "runs/grid.png"  # picture of queries and their top results; null to skip
    cmc_plot: str | None = "runs/cmc.png"
    grid_queries: int = 8
    grid_top_k: int = 6


class Config(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    extract: ExtractConfig = ExtractConfig()
    search: SearchConfig = SearchConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts."""
    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += valid_keys(sub, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _check_keys(values: dict, source: str, model: type[BaseModel] = Config, prefix: str = "") -> None:
    """Reject an unknown key, listing the valid ones of its section."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {values!r}")
    for key, value in values.items():
        field = model.model_fields.get(str(key))
        if field is None:
            keys = ", ".join(valid_keys(model, prefix))
            raise ConfigError(f"{source}: unknown key {prefix + str(key)!r}; valid keys: {keys}")
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            _check_keys(value, source, sub, f"{prefix}{key}.")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), base: Config | None = None) -> Config:
    """Defaults (or `base`), then the YAML file, then `key=value` overrides, validated as one Config."""
    merged = OmegaConf.create((base or Config()).model_dump())
    if path is not None:
        merged = OmegaConf.merge(merged, _read_yaml(Path(path)))
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0]]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: expected key=value, e.g. model.name=resnet18")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(f"overrides: {str(exc).splitlines()[0]}") from None
    _check_keys(OmegaConf.to_container(dotlist), "override")
    merged = OmegaConf.merge(merged, dotlist)
    try:
        return Config.model_validate(OmegaConf.to_container(merged, resolve=True))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{where}: {err['msg']}, got {err.get('input')!r}") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    _check_keys(values, str(path))
    return values
