"""device: auto (and every other device name) in each device field: resolved in one place, a bad name one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lookalike.config import load_config
from lookalike.core.errors import ConfigError
from lookalike.devices import resolve_device
from lookalike.rerank.pairwise import PairwiseReranker
from lookalike.search.exact import exact_knn


def test_auto_resolves_to_the_best_device_present():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("field", ["extract.device", "search.device", "adapt.device"])
def test_every_device_field_accepts_auto_and_names_a_bad_value(field):
    assert load_config(None, [f"{field}=auto"]).model_dump()[field.split(".")[0]]["device"] == "auto"
    with pytest.raises(
        ConfigError, match=rf"^{field}: Value error, expected auto, cpu, cuda, cuda:N or mps, got 'gpu'$"
    ):
        load_config(None, [f"{field}=gpu"])


def test_library_calls_take_auto():
    assert PairwiseReranker("unused.ckpt", device="auto").device == resolve_device("auto")
    with pytest.raises(ConfigError, match="pairwise.device: expected auto"):
        PairwiseReranker("unused.ckpt", device="gpu")
    x = np.eye(4, dtype=np.float32)
    index, _ = exact_knn(x, x, 1, device="auto")
    assert index[:, 0].tolist() == [0, 1, 2, 3]
