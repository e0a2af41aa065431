"""Visual-similarity adaptation: loss, top-k accuracy, modules, PCA on train pairs only, pairing by name, the
command."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import LOOKALIKE
from lookalike.adapt import PairFeatures, TrainSettings, fit_adapter, run_adapt, topk_accuracy
from lookalike.adapt import run as adapt_run
from lookalike.adapt.backbones import create_layer_features
from lookalike.adapt.features import with_table_pca
from lookalike.config import load_config
from lookalike.core.errors import ConfigError, LookalikeError
from lookalike.data import pairs as pairs_module
from lookalike.losses.info_nce import symmetric_info_nce
from lookalike.models.adapter import create_adapter

TINY = [
    "adapt.backbones=[{name: test_resnet, layers: [-2, -1], pretrained: false}]",
    "data.image_size=32",
    "data.batch_size=64",
]


# --- the loss and the metric, by hand --------------------------------------------------------------------------------


def test_symmetric_info_nce_equals_a_hand_computation_on_3x3():
    left = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    right = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    r = 1 / math.sqrt(2)
    cos = [[1, r, 0], [0, r, 1], [r, 1, r]]  # cos(left_i, right_j), worked out on paper
    s = 2.0

    def ce(row: list[float], target: int) -> float:
        return -math.log(math.exp(s * row[target]) / sum(math.exp(s * v) for v in row))

    left_to_right = sum(ce(cos[i], i) for i in range(3)) / 3
    right_to_left = sum(ce([cos[i][j] for i in range(3)], j) for j in range(3)) / 3
    expected = (left_to_right + right_to_left) / 2
    assert symmetric_info_nce(left, right, scale=s).item() == pytest.approx(expected, rel=1e-6)
    assert symmetric_info_nce(left, right).item() != pytest.approx(expected)  # the default inverse temperature is 15


def test_topk_accuracy_per_direction_and_either():
    # left 0 finds right 0; left 1 finds right 0 before right 1; left 2 finds right 2
    left = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.5, 1.0]])
    right = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.9, 1.0]])
    acc = topk_accuracy(left, right, ks=(1, 3))
    assert acc["top1/left_to_right"] == pytest.approx(2 / 3)
    # right 0 finds left 0 (1.0 vs 0.99); right 1 finds left 2 before left 1; right 2 finds left 2
    assert acc["top1/right_to_left"] == pytest.approx(2 / 3)
    assert acc["top1/mean"] == pytest.approx(2 / 3)
    assert acc["top1/either"] == pytest.approx(2 / 3)  # pair 1 fails both ways
    assert acc["top3/mean"] == acc["top3/either"] == 1.0
    constant = topk_accuracy(np.ones((4, 2)), np.ones((4, 2)), ks=(1,))
    assert constant["top1/mean"] == 0.0  # ties count against the partner


def test_either_direction_counts_a_pair_found_one_way():
    left = np.array([[1.0, 0.0], [1.0, 0.1]])
    right = np.array([[1.0, 0.0], [0.0, 1.0]])  # left 1 picks right 0; right 1 picks left 1
    acc = topk_accuracy(left, right, ks=(1,))
    assert acc["top1/left_to_right"] == 0.5 and acc["top1/right_to_left"] == 1.0 and acc["top1/either"] == 1.0


# --- modules and training ----------------------------------------------------------------------------------------


def test_adapters():
    x = torch.randn(5, 8)
    assert torch.equal(create_adapter("diagonal", 8)(x), x)  # starts as the identity
    diagonal = create_adapter("diagonal", 3)
    with torch.no_grad():
        diagonal.weight.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    assert torch.equal(
        diagonal(torch.ones(2, 3)), torch.tensor([[0.0, 0.5, 2.0]] * 2)
    )  # the reference's relu on the weights
    assert torch.equal(create_adapter("identity", 8)(x), x)
    linear = create_adapter("linear", 8, 16)
    assert linear(x).shape == (5, 16) and (linear(x) >= 0).all() and linear.linear.bias is None
    with pytest.raises(LookalikeError, match="adapt.module: expected one of linear, diagonal, identity"):
        create_adapter("mlp", 8)


def synthetic(n: int, seed: int, nuisance: float = 3.0) -> PairFeatures:
    """Pairs sharing 4 signal dimensions, buried under 12 dimensions of independent noise that a module can learn to
    drop."""
    g = np.random.default_rng(seed)
    signal = g.normal(size=(n, 4))

    def side() -> np.ndarray:
        noisy = [signal + 0.1 * g.normal(size=(n, 4)), nuisance * g.normal(size=(n, 12))]
        return np.hstack(noisy).astype(np.float32)

    ids = np.array([f"p{i}" for i in range(n)])
    return PairFeatures(side(), side(), ids, ids, np.full(n, "train"))


def test_training_beats_raw_features_and_keeps_the_best_validation_epoch():
    train, val, test = synthetic(200, 0), synthetic(50, 1), synthetic(100, 2)
    s = TrainSettings(module="diagonal", epochs=60, lr=0.05, top_k=(1,))
    fit = fit_adapter(train, val, s, seed=0)
    raw = topk_accuracy(test.left, test.right, (1,))["top1/mean"]
    with torch.no_grad():
        adapted = topk_accuracy(fit.module(torch.as_tensor(test.left)), fit.module(torch.as_tensor(test.right)), (1,))[
            "top1/mean"
        ]
    assert adapted > raw + 0.2
    curve = [(h["validation/top1/mean"], -h["validation/loss"]) for h in fit.history]
    assert fit.best_epoch == max(range(len(curve)), key=lambda e: (curve[e], -e))
    assert len(fit.history) == 61 and "loss/train" in fit.history[1] and "loss/train" not in fit.history[0]


def test_minibatches_and_flips_train():
    train = synthetic(64, 0)
    train = PairFeatures(
        train.left,
        train.right,
        train.left_ids,
        train.right_ids,
        train.split,
        train.left[:, ::-1].copy(),
        train.right[:, ::-1].copy(),
    )
    fit = fit_adapter(train, None, TrainSettings(module="linear", hidden=32, epochs=3, batch_size=16), seed=0)
    assert fit.best_epoch == 3 and all(np.isfinite(h["loss/train"]) for h in fit.history[1:])
    with pytest.raises(LookalikeError, match="adapt.monitor"):
        fit_adapter(train, None, TrainSettings(monitor="top2/mean", top_k=(1,)))


# --- PCA on training pairs only, identity = raw, splits ---------------------------------------------------------------


def numbered(n: int, dim: int = 6, flip: bool = True) -> PairFeatures:
    """Features whose column 0 names the pair (left: i, right: 1000 + i, mirrors: + 0.5), the rest random."""
    g = np.random.default_rng(0)
    left, right = g.normal(size=(n, dim)), g.normal(size=(n, dim))
    left[:, 0], right[:, 0] = np.arange(n), 1000 + np.arange(n)
    shift = np.eye(dim)[0] * 0.5
    flips = {"left_flip": left + shift, "right_flip": right + shift} if flip else {}
    ids = np.array([f"p{i}" for i in range(n)])
    return PairFeatures(
        left.astype(np.float32),
        right.astype(np.float32),
        ids,
        ids,
        np.full(n, "train"),
        **{k: v.astype(np.float32) for k, v in flips.items()},
    )


@pytest.fixture
def pca_fits(monkeypatch) -> dict[str, np.ndarray]:
    """What adapt's PCA is fitted on: {"samples": [N, D]} once a run has fitted it."""
    seen, real_fit = {}, adapt_run.fit_pca

    def spy(samples, dim, seed):
        seen["samples"] = samples
        return real_fit(samples, dim, seed)

    monkeypatch.setattr(adapt_run, "fit_pca", spy)
    return seen


def test_pca_is_never_fitted_on_validation_or_test_pairs(pca_fits):
    features = numbered(40)
    cfg = load_config(
        None,
        [
            "adapt.pca_dim=3",
            "adapt.epochs=1",
            "adapt.hidden=8",
            "adapt.validation_fraction=0.25",
            "adapt.test_fraction=0.25",
        ],
    )
    result, _, pca, split = adapt_run.run_once(features, cfg, seed=3)
    train = np.flatnonzero(split == "train")
    assert result.sizes == {"train": 20, "validation": 10, "test": 10}
    fitted_on = set(np.round(pca_fits["samples"][:, 0], 1))
    assert fitted_on == set(train) | set(train + 1000) | set(train + 0.5) | set(train + 1000.5)
    assert np.allclose(pca.mean, features.images(train).mean(0))


def test_table_split_pca_uses_train_rows_and_table_mode_tests_on_validation_rows():
    features = numbered(10, flip=False)
    split = np.array(["train"] * 6 + ["validation"] * 4)
    features = PairFeatures(features.left, features.right, features.left_ids, features.right_ids, split)
    fitted = with_table_pca(features, 2).pca
    assert np.allclose(fitted.mean, features.images(np.arange(6)).mean(0))
    drawn = adapt_run.draw_split(
        split, load_config(None, ["adapt.split=table", "adapt.validation_fraction=0.34"]), seed=0
    )
    assert list(drawn[6:]) == ["test"] * 4 and sorted(drawn[:6]) == ["train"] * 4 + ["validation"] * 2


def test_identity_module_reproduces_raw_feature_accuracy_exactly():
    features = synthetic(60, 5)
    for pca in ("4", "null"):
        cfg = load_config(None, ["adapt.module=identity", f"adapt.pca_dim={pca}", "adapt.top_k=[1,3]"])
        result, fit, _, split = adapt_run.run_once(features, cfg, seed=0)
        assert result.adapted == result.raw and fit.best_epoch == 0
    test = np.flatnonzero(split == "test")
    assert result.raw == topk_accuracy(features.left[test], features.right[test], (1, 3))


def test_too_few_pairs_for_a_split_is_explained():
    with pytest.raises(LookalikeError, match=r"3 pairs split into .*expected at least 2 train and 2 test pairs"):
        adapt_run.draw_split(np.full(3, "train"), load_config(None, []), seed=0)


# --- pairing by file name and the TLL_obj subset ----------------------------------------------------------------


def tll_folder(root: Path, n: int = 6) -> Path:
    """left/ and right/ images sharing names; both images of pair i have grey level 20 * i."""
    for side in ("left", "right"):
        (root / side).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), 20 * i).save(root / side / f"{i:05d}.png")
    return root


def test_pairing_by_name_survives_shuffled_listings(tmp_path, monkeypatch):
    import lookalike.data.convert.tll as tll

    root = tll_folder(tmp_path / "TLL")
    real = tll.list_images
    orders = iter([np.random.default_rng(1).permutation, np.random.default_rng(2).permutation])
    monkeypatch.setattr(tll, "list_images", lambda folder: list(next(orders)(np.array(real(folder), dtype=object))))
    pairs = adapt_run.pairs_from_config(load_config(None, [f"adapt.pairs={root}"]))
    grey = lambda p: Image.open(p).getpixel((0, 0))  # noqa: E731
    assert [grey(p) for p in pairs.image_paths("left")] == [grey(p) for p in pairs.image_paths("right")]
    assert sorted(grey(p) for p in pairs.image_paths("left")) == [20 * i for i in range(6)]


def test_tll_obj_subset_keeps_the_named_pairs(tmp_path):
    root = tll_folder(tmp_path / "TLL")
    (tmp_path / "TLL_obj.csv").write_text(",TLL_obj\n0,00001.png\n1,00004.png\n")
    pairs = adapt_run.pairs_from_config(
        load_config(None, [f"adapt.pairs={root}", f"adapt.subset={tmp_path / 'TLL_obj.csv'}"])
    )
    assert pairs.frame["left"].tolist() == ["left/00001.png", "left/00004.png"]
    (tmp_path / "bad.csv").write_text("name\n00001.png\n99999.png\n")
    with pytest.raises(LookalikeError, match=r"bad.csv: 1 file names match no pair of .* \(99999.png\)"):
        adapt_run.pairs_from_config(load_config(None, [f"adapt.pairs={root}", f"adapt.subset={tmp_path / 'bad.csv'}"]))
    (tmp_path / "two.csv").write_text("a,b\nx,y\n")
    with pytest.raises(LookalikeError, match="expected one named column of file names, found a, b"):
        pairs_module.read_name_list(tmp_path / "two.csv")


# --- backbones, the whole run and the command ---------------------------------------------------------------------


def test_layer_features_pool_and_normalise_each_chosen_layer():
    backbone = create_layer_features("test_resnet", [-1, 1], pretrained=False)
    assert [b["layer"] for b in backbone.blocks] == [1, 4] and backbone.dim == 32 + 96
    out = backbone(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 128)
    assert torch.allclose(out[:, :32].norm(dim=1), torch.ones(3)) and torch.allclose(
        out[:, 32:].norm(dim=1), torch.ones(3)
    )
    assert torch.equal(
        create_layer_features("test_resnet", [4], pretrained=False).model.conv1[0].weight,
        backbone.model.conv1[0].weight,
    )
    with pytest.raises(
        LookalikeError, match=r"adapt.backbones\[0\].layers: expected layer indices in \[-5, 4\] .* got 7"
    ):
        create_layer_features("test_resnet", [7], pretrained=False)


@pytest.fixture(scope="module")
def omniglot_pairs(omniglot_small, tmp_path_factory) -> Path:
    """24 pairs: two drawings of the same character (drawers 1-2, 3-4, 5-6) of 8 Omniglot characters."""
    rows = [
        {"left": str(next(f.glob(f"*_{d:02d}.png"))), "right": str(next(f.glob(f"*_{d + 1:02d}.png")))}
        for f in sorted(omniglot_small.glob("*/*"))
        for d in (1, 3, 5)
    ]
    path = tmp_path_factory.mktemp("pairs") / "pairs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_run_adapt_writes_metrics_curves_and_reuses_features(omniglot_pairs, tmp_path):
    overrides = [
        f"adapt.pairs={omniglot_pairs}",
        f"adapt.output={tmp_path}/out",
        f"adapt.features={tmp_path}/f.npz",
        "adapt.runs=2",
        "adapt.epochs=4",
        "adapt.hidden=16",
        "adapt.pca_dim=8",
        "adapt.flip=true",
        "adapt.validation_fraction=0.25",
        *TINY,
    ]
    result = run_adapt(load_config(None, overrides))
    assert not result.features_reused and result.n_pairs == 24 and len(result.runs) == 2
    assert result.runs[0].sizes == {"train": 11, "validation": 6, "test": 7}
    with np.load(tmp_path / "f.npz", allow_pickle=False) as stored:
        assert stored["left"].shape == (24, 192 + 96) and stored["left_flip"].shape == (24, 288)
        assert stored["pca_components"].shape == (8, 288) and stored["left_reduced"].shape == (24, 8)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["summary"]["adapted"]) >= {"top1/left_to_right", "top5/either"} and len(metrics["runs"]) == 2
    for name in ("run0", "run1", "average"):
        assert list((tmp_path / "out" / "tensorboard" / name).glob("events.out.tfevents.*"))
    assert set(torch.load(tmp_path / "out" / "run1" / "adapter.pt", weights_only=True)) == {"linear.weight"}
    assert run_adapt(load_config(None, overrides)).features_reused
    assert (
        len(list((tmp_path / "out" / "tensorboard" / "run0").glob("events.out.tfevents.*"))) == 1
    )  # a rerun replaces the curves
    assert not run_adapt(load_config(None, [*overrides, "adapt.flip=false", "adapt.runs=1"])).features_reused


def test_adapt_command_prints_raw_and_adapted_per_k(omniglot_pairs, tmp_path):
    args = [
        f"adapt.pairs={omniglot_pairs}",
        f"adapt.output={tmp_path}/out",
        f"adapt.features={tmp_path}/f.npz",
        "adapt.runs=1",
        "adapt.epochs=2",
        "adapt.pca_dim=null",
        "adapt.module=diagonal",
        *TINY,
    ]
    done = subprocess.run([LOOKALIKE, "extract-pairs", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "24 pairs, 288 features per image" in done.stdout
    done = subprocess.run([LOOKALIKE, "adapt", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "over 1 runs (24 pairs, 288 features)" in done.stdout and "adapted (diagonal)" in done.stdout
    assert "either direction (published)" in done.stdout and "features: reused" in done.stdout
    done = subprocess.run([LOOKALIKE, "adapt", "adapt.runs=1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "adapt.pairs: expected a pairs CSV" in done.stderr


# --- the reference protocol (adapt.protocol=reference)
# ------------------------------------------------------------------


def test_reference_protocol_is_the_published_command(pca_fits):
    """PCA on every pair before the split, floor(25 %) test pairs and no validation, 150 full-batch epochs, Linear(->
    1024),
    the test pairs scored after every epoch and the last epoch reported, k = 1 3 5, one run."""
    features = numbered(41)
    cfg = adapt_run.protocol_config(
        load_config(None, ["adapt.protocol=reference", "adapt.pca_dim=3", "adapt.epochs=5", "adapt.runs=4"])
    )
    a = cfg.adapt
    assert (a.epochs, a.runs, a.test_fraction, a.validation_fraction, a.top_k, a.scale, a.hidden, a.batch_size) == (
        150,
        1,
        0.25,
        0.0,
        [1, 3, 5],
        15.0,
        1024,
        None,
    )
    result, fit, pca, _ = adapt_run.run_once(features, cfg, seed=3)
    assert result.sizes == {"train": 31, "validation": 0, "test": 10}  # floor(0.25 * 41) = 10
    assert len(pca_fits["samples"]) == 4 * 41 and np.allclose(
        pca.mean, features.images(np.arange(41)).mean(0)
    )  # all pairs, mirrors too
    assert result.best_epoch == 150 and len(fit.history) == 151
    assert set(fit.history[150]) >= {"loss/train", "test/loss", "test/top1/either", "test/top5/either"}
    assert not any(k.startswith("validation/") for k in fit.history[150])
    assert fit.module.linear.weight.shape == (1024, 3)
    last = fit.history[150]
    assert all(
        last[f"test/{k}"] == pytest.approx(v) for k, v in result.adapted.items()
    )  # reported = the last epoch's test scores
    assert "protocol: reference" in adapt_run.protocol_summary(
        cfg
    ) and "-e 150 -r 1 -t 15 --test-split 0.25 -k 1 3 5" in adapt_run.protocol_summary(cfg)
    with pytest.raises(ConfigError, match="adapt.split: the reference protocol"):
        adapt_run.protocol_config(load_config(None, ["adapt.protocol=reference", "adapt.split=table"]))


def test_reference_loss_averages_the_plain_and_the_mirrored_pairs():
    features = numbered(12)
    s = TrainSettings(module="linear", hidden=8, epochs=1, mirrors="both")
    fit = fit_adapter(features, None, s, seed=5)
    torch.manual_seed(5)
    start = create_adapter("linear", features.dim, 8)
    t = lambda x: torch.as_tensor(x)  # noqa: E731
    with torch.no_grad():
        plain = symmetric_info_nce(start(t(features.left)), start(t(features.right)), 15.0)
        mirrored = symmetric_info_nce(start(t(features.left_flip)), start(t(features.right_flip)), 15.0)
    assert fit.history[1]["loss/train"] == pytest.approx(((plain + mirrored) / 2).item(), rel=1e-5)


def test_adapt_command_says_which_protocol_ran(omniglot_pairs, tmp_path):
    args = [
        f"adapt.pairs={omniglot_pairs}",
        f"adapt.output={tmp_path}/out",
        f"adapt.features={tmp_path}/f.npz",
        "adapt.pca_dim=8",
        *TINY,
    ]
    done = subprocess.run(
        [LOOKALIKE, "adapt", *args, "adapt.protocol=reference"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "protocol: reference (the published train.py -e 150 -r 1 -t 15 --test-split 0.25 -k 1 3 5" in done.stdout
    assert "over 1 runs (24 pairs, 288 features)" in done.stdout and "epoch reported: the last (150)" in done.stdout
    stored = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert stored["adapt"]["protocol"] == "reference" and stored["runs"][0]["sizes"] == {
        "train": 18,
        "validation": 0,
        "test": 6,
    }
    done = subprocess.run(
        [LOOKALIKE, "adapt", *args, "adapt.runs=1", "adapt.epochs=2"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (
        "protocol: lookalike (PCA fitted on each run's training pairs; epoch chosen on validation pairs" in done.stdout
    )
