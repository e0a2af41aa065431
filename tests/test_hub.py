"""Pretrained weights that cannot be downloaded: one line naming the field and what to set instead, at once."""

from __future__ import annotations

import time

import pytest
from huggingface_hub import constants

from lookalike.adapt.backbones import create_layer_features
from lookalike.core.errors import LookalikeError
from lookalike.models.extractor import Extractor
from lookalike.models.hub import hub_unreachable
from lookalike.models.pairwise import PairwiseSpec, create_backbone


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    """No weights cached anywhere timm looks, and no proxy."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


CREATORS = {
    "model": lambda: Extractor("resnet18", pretrained=True),
    "adapt.backbones[0]": lambda: create_layer_features("resnet18", [-1], pretrained=True, field="adapt.backbones[0]"),
    "pairwise": lambda: create_backbone(PairwiseSpec(name="resnet18", image_size=32), pretrained=True),
}
LOCAL = {
    "model": "model.weights=PATH",
    "adapt.backbones[0]": "adapt.backbones[0].weights=PATH",
    "pairwise": "pairwise.init_from_extractor=true",
}


@pytest.mark.parametrize("field", list(CREATORS))
def test_hub_offline_mode_is_one_line_naming_the_field(field, empty_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: the hub answers from the cache only
    with pytest.raises(LookalikeError) as err:
        CREATORS[field]()
    message = str(err.value)
    assert message.startswith(f"{field}.pretrained: could not download weights for resnet18 (") and "\n" not in message
    assert f"use {field}.pretrained=false to train from scratch, or {LOCAL[field]}" in message


def test_unreachable_hub_fails_at_once_without_retries(empty_cache, monkeypatch):
    monkeypatch.setattr(
        constants, "ENDPOINT", "http://127.0.0.1:9"
    )  # a closed port: refused at once, retried for a minute
    assert hub_unreachable().startswith("http://127.0.0.1:9 unreachable: ConnectionRefusedError")
    started = time.perf_counter()
    with pytest.raises(
        LookalikeError,
        match=r"model.pretrained: could not download weights for resnet18 \(http://127.0.0.1:9 unreachable",
    ):
        Extractor("resnet18", pretrained=True)
    assert time.perf_counter() - started < 20  # the hub's retries alone sleep 46 s
    assert (
        constants.HF_HUB_OFFLINE is False or constants.is_offline_mode() == constants.HF_HUB_OFFLINE
    )  # offline mode restored


def test_unknown_model_still_names_the_name_field():
    with pytest.raises(LookalikeError, match="pairwise.name: Unknown model"):
        create_backbone(PairwiseSpec(name="no_such_model", image_size=32))
