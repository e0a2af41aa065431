"""Extractor training with Lightning on real Omniglot images: checkpoints, logs, resume, validate, BNNeck recipe,
DDP."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from helpers import LOOKALIKE, TINY_TRAINING
from lookalike.config import load_config
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import ConfigError, LookalikeError, LookalikeWarning
from lookalike.data.folder import import_folder
from lookalike.models.extractor import Extractor
from lookalike.pipeline import embed_table, table_from_config
from lookalike.train import run_train, run_validate
from lookalike.train.data import LabelledImages, train_transform

FAST = ["model.name=test_resnet", *TINY_TRAINING, "trainer.log_every_n_steps=1", "search.k=50"]


@pytest.fixture(scope="module")
def table_csv(omniglot_small, tmp_path_factory) -> Path:
    """4 train characters, 4 validation characters minus one image (79 rows: uneven shards under DDP)."""
    table = import_folder(omniglot_small, validation_fraction=0.5, seed=0)
    frame = table.frame
    drop = frame.index[frame["split"] == "validation"][0]
    table = dataclasses.replace(table, frame=frame.drop(index=drop).reset_index(drop=True))
    path = tmp_path_factory.mktemp("table") / "table.csv"
    table.save(path)
    return path


def config(table_csv: Path, out: Path, *extra: str):
    return load_config(None, [*FAST, f"data.table={table_csv}", f"train.output={out}", *extra])


def test_training_writes_checkpoints_logs_pictures_and_lifts_the_metrics(table_csv, tmp_path):
    result = run_train(config(table_csv, tmp_path, "train.epochs=2"))
    assert result.best_checkpoint.is_file() and result.last_checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert result.images_per_second > 0 and set(result.metrics) >= {"cmc@1", "map@all"}
    # training lifts CMC@1 over the untrained model on the same validation split (79 queries, 4 unseen characters):
    # +0.051, +0.152, +0.101 at train.seed 0, 1, 2 (2026-11-30); a change or a drop of the metrics fails
    assert result.metrics["cmc@1"] >= result.metrics_before["cmc@1"] + 0.04
    assert result.metrics["map@all"] > result.metrics_before["map@all"]
    val = tmp_path / "validation"
    assert {p.name for p in val.iterdir()} >= {
        "metrics_before.json",
        "metrics_epoch000.json",
        "metrics_epoch001.json",
        "grid_epoch001.png",
    }
    last = json.loads((val / "metrics_last.json").read_text())
    assert last["epoch"] == 1 and last["n_queries"] == 79 and last["means"] == pytest.approx(result.metrics)
    assert last["complete_ranking"]  # map@all over the whole ranking, not search.k=50 of the 78 others
    logged = pd.read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert {
        "train/loss",
        "train/triplet_active",
        "train/triplet_pos_dist",
        "train/triplet_neg_dist",
        "train/neighbour_distance",
        "val/cmc@1",
        "val/neighbour_distance",
    } <= set(logged.columns)
    assert len(result.triplet_losses) == 2 and 0 < result.neighbour_distance <= 2  # on the unit sphere
    assert list(tmp_path.glob("tensorboard/version_0/events.out.tfevents.*"))
    hparams = yaml.safe_load(
        (tmp_path / "tensorboard" / "version_0" / "hparams.yaml").read_text()
    )  # the resolved config, flattened
    assert (
        hparams["model.name"] == "test_resnet" and hparams["train.p"] == 2 and hparams["data.table"] == str(table_csv)
    )
    events = b"".join(p.read_bytes() for p in tmp_path.glob("tensorboard/version_0/events.out.tfevents.*"))
    assert b"train.loss.margin" in events and b"test_resnet" in events  # TensorBoard's hparams tab
    assert (
        last["provenance"]["table"]["path"] == str(table_csv) and last["provenance"]["model"]["name"] == "test_resnet"
    )


class BatchRecorder(L.Callback):
    def __init__(self) -> None:
        self.seen: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen.setdefault(trainer.current_epoch, []).append(float(batch[0].sum()))


def test_every_epoch_draws_new_batches(table_csv, tmp_path):
    from lookalike.train import build_parts, build_trainer

    cfg = config(table_csv, tmp_path, "train.epochs=3", "train.validate_before=false")
    module, data = build_parts(cfg)
    recorder = BatchRecorder()
    build_trainer(cfg, [recorder]).fit(module, datamodule=data)
    assert len(recorder.seen) == 3 and all(len(v) == 2 for v in recorder.seen.values())
    assert recorder.seen[0] != recorder.seen[1] != recorder.seen[2]  # the sampler's epoch advanced


def test_validate_reproduces_the_last_validation_and_resume_continues(table_csv, tmp_path):
    first = run_train(config(table_csv, tmp_path, "train.epochs=1", "train.scheduler=cosine"))
    again = run_validate(config(table_csv, tmp_path, f"model.weights={first.last_checkpoint}"))
    assert again == pytest.approx(first.metrics, abs=1e-6)
    resumed = run_train(config(table_csv, tmp_path, "train.epochs=2", "train.scheduler=cosine"), resume="last")
    ckpt = torch.load(resumed.last_checkpoint, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 * 2  # two epochs of 4 labels / p=2 batches: the second continued the first
    assert (tmp_path / "validation" / "metrics_epoch001.json").is_file()
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").is_file() and (
        tmp_path / "csv" / "version_1" / "metrics.csv"
    ).is_file()


def test_resume_after_a_killed_run_keeps_one_best_checkpoint(table_csv, tmp_path):
    first = run_train(config(table_csv, tmp_path, "train.epochs=1", "train.validate_before=false"))
    # what kill -9 leaves between the two checkpoint callbacks of epoch 1: the best callback wrote best-epoch001.ckpt
    # and removed best-epoch000.ckpt (save_top_k=1), last.ckpt is still the one of epoch 0 that --resume reads
    first.best_checkpoint.rename(first.best_checkpoint.with_name("best-epoch001.ckpt"))
    resumed = run_train(config(table_csv, tmp_path, "train.epochs=2", "train.validate_before=false"), resume="last")
    bests = sorted((tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert bests == [
        resumed.best_checkpoint
    ]  # was: the killed run's file next to best-epoch001-v1.ckpt, or a best that is gone
    assert torch.load(bests[0], map_location="cpu", weights_only=False)["epoch"] == 1  # written by the resumed run


def test_ctl_recipe_trains_with_bnneck_and_mock_instances(table_csv, tmp_path):
    recipe = [
        "model.bnneck=true",
        "train.k=24",
        "train.few_images=pad",
        "train.loss.centroid=1",
        "train.loss.cross_entropy=1",
        "train.loss.center=0.0005",
        "train.augment=reid",
        "train.scheduler=step",
        "train.warmup_epochs=1",
        "train.step_epochs=[1]",
        "evaluate.centroids=label",
        "train.epochs=2",
    ]
    result = run_train(config(table_csv, tmp_path, *recipe))
    logged = pd.read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert {"train/triplet", "train/centroid", "train/cross_entropy", "train/center"} <= set(logged.columns)
    assert np.isfinite(logged["train/loss"].dropna()).all()
    state = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(
        state["extractor.neck.bias"], torch.zeros_like(state["extractor.neck.bias"])
    )  # BNNeck shift frozen


class CentreRecorder(L.Callback):
    """Centres and their gradient as the optimizer is about to step (callbacks run before the module's hook), and
    after."""

    def __init__(self) -> None:
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.after: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.before.append((module.center.centers.detach().clone(), module.center.centers.grad.clone()))
        assert all(p is not module.center.centers for g in optimizer.param_groups for p in g["params"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.after.append(module.center.centers.detach().clone())


def test_centres_step_by_their_own_sgd_on_the_unweighted_center_loss(table_csv, tmp_path):
    from lookalike.train import build_parts, build_trainer

    cfg = config(
        table_csv,
        tmp_path,
        "train.epochs=1",
        "train.validate_before=false",
        "train.loss.center=0.25",
        "train.optimizer=adam",
    )
    module, data = build_parts(cfg)
    recorder = CentreRecorder()
    build_trainer(cfg, [recorder]).fit(module, datamodule=data)
    assert len(recorder.before) == 2
    for (centres, weighted_grad), after in zip(recorder.before, recorder.after):
        assert weighted_grad.abs().sum() > 0
        torch.testing.assert_close(after, centres - 0.5 * weighted_grad / 0.25)  # official: grad / weight, SGD lr 0.5
    optimizer = module.optimizers().optimizer
    assert isinstance(optimizer, torch.optim.Adam) and len(optimizer.param_groups) == 2


def test_repeated_runs_report_mean_and_std_of_the_final_metrics(table_csv, tmp_path):
    args = [
        *FAST,
        f"data.table={table_csv}",
        f"train.output={tmp_path}",
        "train.epochs=1",
        "train.validate_before=false",
        "train.grid=false",
        "train.runs=2",
        "train.seed=3",
    ]
    done = subprocess.run([LOOKALIKE, "train", *args], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "runs.json").read_text())
    assert [r["seed"] for r in record["runs"]] == [3, 4]
    finals = [
        json.loads((tmp_path / f"run{r}" / "validation" / "metrics_last.json").read_text())["means"] for r in range(2)
    ]
    assert [r["metrics"] for r in record["runs"]] == [pytest.approx(f) for f in finals]
    values = np.array([f["cmc@1"] for f in finals])
    assert record["summary"]["cmc@1"] == pytest.approx({"mean": values.mean(), "std": values.std(ddof=1)})
    assert "mean ± std over 2 runs (seeds 3, 4)" in done.stdout and "cmc@1" in done.stdout
    resumed = subprocess.run(
        [LOOKALIKE, "train", *args, "--resume", "last"], check=False, capture_output=True, text=True, timeout=120
    )
    assert (
        resumed.returncode == 2
        and resumed.stderr.strip().count("\n") == 0
        and "--resume: continues one run" in resumed.stderr
    )


def test_bnneck_splits_metric_and_retrieval_features():
    torch.manual_seed(0)
    model = Extractor("test_resnet", embedding_dim=16, bnneck=True).train()
    before, after = model.features(torch.randn(6, 3, 32, 32))
    assert before.shape == after.shape == (6, 16)
    assert torch.allclose(after.mean(0), torch.zeros(16), atol=1e-5)  # batch-normalised, no shift
    assert not model.neck.bias.requires_grad and model.neck.weight.requires_grad


def test_channels_last_layout_gives_the_same_embeddings(table_csv, tmp_path):
    from lookalike.train.module import ExtractorModule
    from lookalike.train.run import build_trainer

    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    modules = {}
    for flag in ("true", "false"):
        torch.manual_seed(0)
        cfg = config(table_csv, tmp_path, f"trainer.channels_last={flag}")
        module = ExtractorModule(Extractor("test_resnet", pretrained=False), cfg, 8)
        trainer = build_trainer(cfg, validate_only=True)
        for callback in trainer.callbacks:  # what the Trainer does at setup
            callback.setup(trainer, module, "fit")
        modules[flag] = module.eval()
    conv = next(m.weight for m in modules["true"].extractor.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    plain = next(m.weight for m in modules["false"].extractor.modules() if isinstance(m, torch.nn.Conv2d))
    assert plain.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(modules["true"](images), modules["false"](images), atol=1e-5, rtol=1e-4)


def test_mock_instances_load_their_image_flagged_invalid(table_csv):
    from lookalike.core.table import load_table

    train = load_table(table_csv).split("train")
    items = LabelledImages(train, train_transform("none", 32))
    real, mock = items[3], items[-4]
    assert real[2] is True and mock[2] is False
    assert torch.equal(real[0], mock[0]) and real[1] == mock[1]


def test_unknown_monitor_metric_is_a_config_error(table_csv, tmp_path):
    with pytest.raises(ConfigError, match=r"train.monitor: expected one of cmc@1, .*got 'cmc@3'"):
        run_train(config(table_csv, tmp_path, "train.monitor=cmc@3"))


def test_ddp_on_two_cpu_processes_matches_single_process_validation(table_csv, tmp_path):
    """Real 2-process DDP (gloo) through the CLI; the gathered validation equals a 1-process run of the same
    checkpoint."""
    args = [*FAST, f"data.table={table_csv}", f"train.output={tmp_path}"]
    ddp = subprocess.run(
        [LOOKALIKE, "train", *args, "train.epochs=2", "trainer.devices=2", "trainer.strategy=ddp"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("best checkpoint:") == 1  # only rank 0 reports
    distributed = json.loads((tmp_path / "validation" / "metrics_last.json").read_text())
    single = subprocess.run(
        [LOOKALIKE, "validate", *args, f"weights={tmp_path / 'checkpoints' / 'last.ckpt'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    alone = json.loads((tmp_path / "validation" / "metrics_validate.json").read_text())
    assert distributed["n_queries"] == alone["n_queries"] == 79
    assert alone["means"] == pytest.approx(distributed["means"], abs=1e-6)


def _trained_extractor(ckpt: Path, **settings) -> Extractor:
    """The extractor of a training checkpoint rebuilt by hand: settings given, the module's 'extractor.' weights."""
    extractor = Extractor(**settings)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    extractor.load_state_dict({k.removeprefix("extractor."): v for k, v in state.items() if k.startswith("extractor.")})
    return extractor


def test_a_checkpoint_alone_rebuilds_its_extractor(table_csv, tmp_path):
    """last.ckpt records the model and the config: `lookalike extract model.weights=last.ckpt` needs no model.name or
    embedding_dim and embeds as the trained module does; a conflicting model.name is one line."""
    arch = ["model.embedding_dim=8", "model.bnneck=true", "model.normalize=false"]  # none of them the default
    result = run_train(config(table_csv, tmp_path, "train.epochs=1", "train.validate_before=false", *arch))
    saved = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    spec = {"name": "test_resnet", "embedding_dim": 8, "normalize": False, "bnneck": True, "last_stride": None}
    assert saved["extractor_model"] == {
        **spec,
        "pretrained": False,
        "image_size": 32,
        "crop_fraction": 1.0,
        "mean": [0.5, 0.5, 0.5],  # timm's for test_resnet
        "std": [0.5, 0.5, 0.5],
    }
    assert saved["hyper_parameters"]["model.embedding_dim"] == 8 and saved["hyper_parameters"]["train.epochs"] == 1
    inputs = [f"data.table={table_csv}", "data.image_size=32", "data.crop_fraction=1.0", "data.batch_size=16"]
    out = tmp_path / "emb.npz"
    args = [LOOKALIKE, "extract", *inputs, f"model.weights={result.last_checkpoint}", f"extract.output={out}"]
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    by_hand = _trained_extractor(result.last_checkpoint, image_size=32, crop_fraction=1.0, **spec)
    table = load_config(None, inputs)
    expected = embed_table(table, by_hand, table_from_config(table).split("validation"))
    assert np.array_equal(Embeddings.load(out).vectors, expected.vectors)
    assert Extractor(weights=result.last_checkpoint).settings() == spec  # the Python API: the file alone
    other_size = load_config(None, [f"model.weights={result.last_checkpoint}", "data.image_size=48"])
    with pytest.warns(LookalikeWarning, match=r"^data.image_size: 48, but model.weights was trained with 32 \(set"):
        Extractor.from_config(other_size)
    wrong = subprocess.run([*args, "model.name=resnet18"], check=False, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and wrong.stderr.strip().count("\n") == 0
    assert "model.name: 'resnet18', but" in wrong.stderr and "'test_resnet'" in wrong.stderr


def test_a_checkpoint_without_its_spec_needs_model_name(table_csv, tmp_path):
    """An older checkpoint (no spec) loads when model.name (and embedding_dim) say the model; without them it is one
    line saying what to add."""
    result = run_train(config(table_csv, tmp_path, "train.epochs=1", "train.validate_before=false"))
    older = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    del older["extractor_model"]
    torch.save(older, tmp_path / "older.ckpt")
    with pytest.raises(LookalikeError, match=r"does not record its model .*add model.name=") as caught:
        Extractor.from_config(load_config(None, [f"model.weights={tmp_path / 'older.ckpt'}"]))
    assert "\n" not in str(caught.value)
    named = Extractor.from_config(config(table_csv, tmp_path, f"model.weights={tmp_path / 'older.ckpt'}"))
    by_hand = _trained_extractor(result.last_checkpoint, name="test_resnet")
    assert all(torch.equal(a, b) for a, b in zip(named.state_dict().values(), by_hand.state_dict().values()))


def test_a_collapsing_run_warns_once_in_one_line(table_csv, tmp_path):
    """Decoupled weight decay of 50 x lr 0.01 halves every weight each step: every image soon embeds to the same point
    and the batch-hard loss sits at the margin; the CLI then prints the collapse warning, once, as one line."""
    args = [
        *FAST,
        f"data.table={table_csv}",
        f"train.output={tmp_path}",
        "train.epochs=7",
        "train.batches_per_epoch=2",
        "train.val_every=7",
        "train.validate_before=false",
        "train.grid=false",
        "train.lr=1e-2",
        "train.optimizer=adamw",
        "train.weight_decay=50",
        "model.embedding_dim=16",
        "model.normalize=false",
    ]
    done = subprocess.run([LOOKALIKE, "train", *args], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "may have collapsed" in line]
    assert len(lines) == 1, done.stderr
    expected = "warning: train.loss: the triplet loss stayed within 1% of the margin (0.2) for 3 epochs"
    assert lines[0].startswith(expected)
    assert "median neighbour distance" in lines[0] and "try model.bnneck=true" in lines[0]
