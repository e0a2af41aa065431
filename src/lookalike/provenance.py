"""Provenance: which model, weights, config and dataset table produced an output, recorded in it and checked on reading.

Every output (embeddings and results .npz meta, metrics JSON, an index folder's manifest.json) carries `record(cfg)`
under "provenance"; search, evaluate and rerank `check_input` what they read against the table and model of their own
config, so a stale runs/results.npz made from another table or model is refused instead of silently scored.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from lookalike import __version__
from lookalike.config import Config
from lookalike.core.errors import LookalikeWarning, ProvenanceError

KEY = "provenance"


def file_sha256(path: str | os.PathLike | None) -> str | None:
    """sha256 of a file's content (None when there is no such file); cached per path, size and modification time."""
    if not path:
        return None
    try:
        stat = Path(path).resolve().stat()
    except OSError:
        return None
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str | None:
    """The digest of one version of a file (size and mtime only key the cache)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as dotted keys; lists, mappings and None as JSON text (what TensorBoard's hparams accept)."""
    flat: dict[str, Any] = {}

    def visit(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                visit(sub, f"{prefix}{key}.")
            return
        flat[prefix.rstrip(".")] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)

    visit(cfg.model_dump(mode="json"), "")
    return flat


def config_sha256(cfg: Config) -> str:
    """sha256 of the resolved config (keys sorted): equal configs, equal digests."""
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def changed_settings(cfg: Config) -> dict[str, Any]:
    """The dotted settings of `cfg` that differ from the defaults (what -v shows)."""
    defaults = flat_config(Config())
    return {key: value for key, value in flat_config(cfg).items() if defaults.get(key) != value}


def model_record(cfg: Config) -> dict[str, Any]:
    """The extractor a config names: timm name, whether timm's pretrained weights are used, the weights file and its
    sha256."""
    from lookalike.models.extractor import model_name  # torch and timm only when a record is made

    m = cfg.model
    return {
        "name": model_name(m.name, m.weights),
        "pretrained": bool(m.pretrained and not m.weights),
        "weights": m.weights,
        "weights_sha256": file_sha256(m.weights),
    }


def table_record(cfg: Config) -> dict[str, Any]:
    """The dataset table a config names and the sha256 of its content."""
    return {"path": cfg.data.table, "sha256": file_sha256(cfg.data.table)}


def record(cfg: Config) -> dict[str, Any]:
    """One small provenance record: model + weights, dataset table, resolved config and its hash, lookalike version,
    time."""
    return {
        "lookalike": __version__,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_record(cfg),
        "table": table_record(cfg),
        "config_sha256": config_sha256(cfg),
        "config": cfg.model_dump(mode="json"),
    }


def _short(digest: str | None) -> str:
    return f"sha256 {digest[:12]}" if digest else "no such file"


def _describe_model(model: dict[str, Any]) -> str:
    """resnet18 with weights runs/last.ckpt (sha256 ...), or resnet18 (timm pretrained / random init)."""
    if model.get("weights"):
        return f"{model['name']} with weights {model['weights']} ({_short(model.get('weights_sha256'))})"
    return f"{model['name']} ({'timm pretrained' if model.get('pretrained') else 'random init'})"


def _same_model(made: dict[str, Any], now: dict[str, Any]) -> bool:
    """Same timm name, and the same weights: equal digests (paths when a file is gone), or both without weights files
    and the same pretrained choice."""
    if made.get("name") != now.get("name") or bool(made.get("weights")) != bool(now.get("weights")):
        return False
    if not made.get("weights"):
        return bool(made.get("pretrained")) == bool(now.get("pretrained"))
    if made.get("weights_sha256") and now.get("weights_sha256"):
        return made["weights_sha256"] == now["weights_sha256"]
    return made.get("weights") == now.get("weights")


def check_input(
    meta: dict, source: str | os.PathLike, cfg: Config, command: str, rerun: str, model: bool = True
) -> None:
    """Refuse `source` (read by `command`) when its provenance names another table, or (`model`) another model, than
    `cfg`; warn, and go on, when it records none (written before provenance existed)."""
    made = (meta or {}).get(KEY)
    if not made:
        warnings.warn(
            LookalikeWarning(
                f"{source} records no provenance (written by an older lookalike), so {command} cannot check "
                f"which table and model made it; rerun {rerun} to record it"
            ),
            stacklevel=2,
        )
        return
    table = table_record(cfg)
    was = made.get("table") or {}
    if was.get("sha256") and table["sha256"] and was["sha256"] != table["sha256"]:
        raise ProvenanceError(
            f"{source} was made from table {was.get('path')} ({_short(was['sha256'])}) but {command} reads "
            f"{table['path']} ({_short(table['sha256'])}); rerun {rerun}"
        )
    now = model_record(cfg)
    if model and not _same_model(made.get("model") or {}, now):
        raise ProvenanceError(
            f"{source} was made by model {_describe_model(made.get('model') or {})} but {command} is configured with "
            f"{_describe_model(now)}; rerun {rerun}, or set model.* as it was"
        )


def with_record(meta: dict, cfg: Config) -> dict:
    """`meta` plus this run's provenance record."""
    return {**meta, KEY: record(cfg)}
