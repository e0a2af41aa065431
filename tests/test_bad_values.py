"""Bad config values, weights files, resume checkpoints and index folders (issue 14, items 7-8): each fails in one line
naming the field or file (exit code 2 from the command) and leaves nothing behind, instead of a traceback or a silent
run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from lookalike.cli import app
from lookalike.config import load_config
from lookalike.core.errors import ConfigError, LookalikeError
from lookalike.core.results import RetrievalResults
from lookalike.metrics import compute_metrics
from lookalike.models.extractor import Extractor, load_weights
from lookalike.serve import load_index
from lookalike.train import run_train

SMALL = [
    "model.name=resnet18",
    "model.pretrained=false",
    "data.image_size=32",
    "data.crop_fraction=1.0",
    "data.batch_size=32",
]
TRAIN = [
    "train.p=2",
    "train.k=4",
    "train.augment=none",
    "trainer.accelerator=cpu",
    "trainer.progress=false",
    "search.k=20",
]


def cli(*args: str):
    """The `lookalike` command in-process: (exit code, stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr


def assert_one_line_error(code: int, stderr: str, *expected: str) -> None:
    assert code == 2, stderr
    assert stderr.strip().count("\n") == 0 and stderr.startswith("error:"), stderr
    for text in expected:
        assert text in stderr, stderr


# ---------------------------------------------------------------- config values (item 7, 8)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=-3", "train.epochs: must be > 0, got -3"),
        ("data.batch_size=0", "data.batch_size: must be > 0, got 0"),
        ("data.crop_fraction=0", "data.crop_fraction: must be > 0, got 0"),
        ("data.crop_fraction=1.5", "data.crop_fraction: must be <= 1, got 1.5"),
        ("data.num_workers=-1", "data.num_workers: must be >= 0, got -1"),
        ("train.lr=-1", "train.lr: must be > 0, got -1"),
        ("evaluate.cmc_k=[1,0]", "evaluate.cmc_k.1: must be > 0, got 0"),
        ("serve.max_upload_mb=-1", "serve.max_upload_mb: must be > 0, got -1"),
        ("serve.candidates=0", "serve.candidates: must be > 0, got 0"),
        ("search.k=0", "search.k: must be > 0, got 0"),
        ("pairwise.dropout=1", "pairwise.dropout: must be < 1, got 1"),
    ],
)
def test_out_of_range_value_names_the_field_and_bound(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message


def test_unresolvable_interpolation_names_the_field():
    with pytest.raises(ConfigError, match=r"^model\.name: cannot resolve the interpolation \(.*'nope' not found\)$"):
        load_config(None, ["model.name=${nope}"])
    assert (
        load_config(None, ["extract.output=${train.output}/e.npz"]).extract.output == "runs/train/e.npz"
    )  # a good one resolves


def test_yaml_file_with_non_utf8_bytes(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"model:\n  name: r\xe9snet18\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not UTF-8 text \(byte 0xe9 at offset 16\)"):
        load_config(path)
    assert_one_line_error(*cli("extract", path), "bad.yaml: not UTF-8 text")


@pytest.mark.parametrize("override", ["data.crop_fraction=0", "data.num_workers=-1", "model.name=${nope}"])
def test_bad_value_on_the_command_line_is_one_line_and_writes_nothing(table_csv, tmp_path, override):
    output = tmp_path / "emb.npz"
    code, stderr = cli("extract", f"data.table={table_csv}", f"extract.output={output}", *SMALL, override)
    assert_one_line_error(code, stderr, override.split("=")[0])
    assert not output.exists()


def test_metrics_refuse_a_cutoff_of_zero():
    results = RetrievalResults(np.array([[1, 0]]), np.array([[0.1, 0.2]], np.float32), ["q"], ["a", "b"])
    with pytest.raises(LookalikeError, match=r"metrics: cmc_k must be positive integers, got 0"):
        compute_metrics(results, np.array([0]), np.array([0, 1]), cmc_k=(0,))
    assert_one_line_error(*cli("evaluate", "evaluate.cmc_k=[0]"), "evaluate.cmc_k.0: must be > 0, got 0")


# ---------------------------------------------------------------- weights files (item 7, 8)


def test_weights_of_another_architecture_name_missing_and_unexpected_keys(tmp_path):
    torch.save(Extractor("resnet34").state_dict(), tmp_path / "r34.pt")  # ResNet-18's keys are a subset of ResNet-34's
    with pytest.raises(
        LookalikeError, match=r"r34\.pt has 96 weights this model does not, e.g\. 'backbone\.layer1\.2\.conv1\.weight'"
    ):
        load_weights(Extractor("resnet18"), tmp_path / "r34.pt")
    torch.save(Extractor("resnet18").state_dict(), tmp_path / "r18.pt")
    with pytest.raises(
        LookalikeError, match=r"r18\.pt lacks 96 weights of this model, e\.g\. 'backbone\.layer1\.2\.conv1\.weight'"
    ):
        load_weights(Extractor("resnet34"), tmp_path / "r18.pt")


def test_weights_of_another_embedding_size_name_the_parameter_and_both_shapes(table_csv, tmp_path):
    torch.save(Extractor("resnet18", embedding_dim=8).state_dict(), tmp_path / "e8.pt")
    message = "'projection.weight' has shape [8, 512], this model expects [16, 512]"
    with pytest.raises(LookalikeError) as info:
        load_weights(Extractor("resnet18", embedding_dim=16), tmp_path / "e8.pt")
    assert message in str(info.value)
    folder = tmp_path / "index"
    code, stderr = cli(
        "index",
        f"data.table={table_csv}",
        *SMALL,
        "model.embedding_dim=16",
        f"model.weights={tmp_path / 'e8.pt'}",
        f"serve.index_dir={folder}",
    )
    assert_one_line_error(code, stderr, "model.weights:", message)
    assert not folder.exists()


def test_a_timm_checkpoint_loads_into_a_headless_backbone(tmp_path):
    source = timm.create_model("resnet18", num_classes=10)
    torch.save(
        source.state_dict(), tmp_path / "timm.pt"
    )  # fc.weight, fc.bias: left out, as timm does for num_classes=0
    loaded = load_weights(timm.create_model("resnet18", num_classes=0), tmp_path / "timm.pt")
    torch.testing.assert_close(loaded.conv1.weight, source.conv1.weight)


def test_index_refuses_pairwise_weights_that_do_not_load(table_csv, tmp_path):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    folder = tmp_path / "index"
    chain = f"rerank=[{{pairwise: {{weights: {tmp_path / 'random.pt'}}}}}]"
    code, stderr = cli("index", f"data.table={table_csv}", *SMALL, f"serve.index_dir={folder}", chain)
    assert_one_line_error(code, stderr, "pairwise weights:", "random.pt is not a PyTorch checkpoint")
    assert not folder.exists()


# ---------------------------------------------------------------- resume (item 7)


def lightning_like(state: dict) -> dict:
    """A checkpoint dict with the keys Lightning's fit writes, around `state`."""
    return {"state_dict": state, "optimizer_states": [], "lr_schedulers": [], "loops": {}, "epoch": 0, "global_step": 0}


def write_truncated(path: Path) -> None:
    torch.save(lightning_like(Extractor("resnet18").state_dict()), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("write", "message"),
    [
        pytest.param(
            lambda p: p.write_bytes(np.random.default_rng(1).bytes(2048)),
            "is not a PyTorch checkpoint",
            id="random-bytes",
        ),
        pytest.param(
            lambda p: torch.save(Extractor("resnet18").state_dict(), p),
            "is not a Lightning training checkpoint (no 'state_dict'",
            id="plain-state-dict",
        ),
        pytest.param(write_truncated, "is not a PyTorch checkpoint", id="truncated"),
        pytest.param(
            lambda p: torch.save(lightning_like(Extractor("resnet34").state_dict()), p), "lacks", id="another-model"
        ),
    ],
)
def test_bad_resume_file_fails_before_any_log_is_written(table_csv, tmp_path, write, message):
    ckpt = tmp_path / "resume.ckpt"
    write(ckpt)
    out = tmp_path / "run"
    cfg = load_config(None, [*SMALL, *TRAIN, f"data.table={table_csv}", f"train.output={out}"])
    with pytest.raises(LookalikeError, match=r"^--resume: .*resume\.ckpt") as info:
        run_train(cfg, str(ckpt))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()  # no csv/version_0, no TensorBoard file, no checkpoints folder


def test_bad_resume_on_the_command_line_is_one_line(table_csv, tmp_path):
    torch.save(Extractor("resnet18").state_dict(), tmp_path / "plain.pt")
    out = tmp_path / "run"
    code, stderr = cli(
        "train", f"data.table={table_csv}", *SMALL, *TRAIN, f"train.output={out}", "--resume", tmp_path / "plain.pt"
    )
    assert_one_line_error(code, stderr, "--resume:", "plain.pt is not a Lightning training checkpoint")
    assert not out.exists()


# ---------------------------------------------------------------- index folders (item 7)


@pytest.mark.parametrize("name", ["model.pt", "embeddings.npz"])
def test_serving_an_index_with_a_truncated_file_names_it(index_dir, tmp_path, name):
    folder = shutil.copytree(index_dir, tmp_path / "index")
    (folder / name).write_bytes((index_dir / name).read_bytes()[: (index_dir / name).stat().st_size // 2])
    with pytest.raises(LookalikeError, match=str(folder / name).replace(".", r"\.")):
        load_index(folder)
    assert_one_line_error(*cli("serve", folder), str(folder / name))
