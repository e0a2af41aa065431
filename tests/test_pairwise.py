"""STIR pairwise re-ranker: the merge rule, pair mining, the model, training (frozen backbone, loss falls),
re-ranking."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from helpers import TINY_TRAINING, save_pairwise
from lookalike.config import load_config
from lookalike.core.errors import ConfigError, LookalikeError
from lookalike.core.results import PAD, RetrievalResults
from lookalike.data import images as image_io
from lookalike.data.folder import import_folder
from lookalike.losses.pairwise import mine_pairs, pair_bce
from lookalike.metrics import evaluate_table
from lookalike.models.pairwise import (
    SPEC_KEY,
    PairwiseModel,
    PairwiseSpec,
    init_from_extractor,
    load_pairwise,
)
from lookalike.pipeline import extractor_from_config, search_and_score, table_from_config
from lookalike.rerank import RerankContext, check_ascending, create_reranker
from lookalike.rerank.base import merge_head
from lookalike.rerank.pairwise import PairwiseReranker, table_rows
from lookalike.train import run_train
from lookalike.train.pairwise import FrozenBackbone, auto_precision, build_pairwise_parts, run_train_reranker
from lookalike.train.run import build_trainer

FAST = [
    "model.name=test_resnet",
    *TINY_TRAINING,
    "trainer.log_every_n_steps=1",
    "search.k=50",
    "pairwise.name=test_vit",
    "pairwise.pretrained=false",
    "pairwise.batch_size=64",
    "train.batches_per_epoch=2",
    "evaluate.grid_queries=3",
]


def results(indices, distances, n_gallery: int = 8) -> RetrievalResults:
    idx = np.asarray(indices, dtype=np.int64)
    return RetrievalResults(
        idx, np.asarray(distances, dtype=np.float32), np.arange(len(idx)).astype(str), np.arange(n_gallery).astype(str)
    )


# ---------------------------------------------------------------- the merge rule


def test_merge_sorts_the_head_and_keeps_the_tail_in_place():
    before = results([[3, 2, 1, 0, 4]], [[0.1, 0.2, 0.5, 0.6, 0.7]])
    after = merge_head(before, np.array([[0.4, 0.2, 0.3]]))
    assert after.indices.tolist() == [[2, 1, 3, 0, 4]]
    np.testing.assert_allclose(after.distances, [[0.2, 0.3, 0.4, 0.6, 0.7]], rtol=1e-6)  # below 0.6: no rescaling


def test_merge_rescales_a_head_that_would_pass_the_next_distance():
    before = results([[0, 1, 2, 3, 4]], [[0.1, 0.2, 0.3, 0.5, 0.6]])
    after = merge_head(before, np.array([[1.0, 2.0, 5.0]]))
    gap = 1000 * np.finfo(np.float32).eps  # relative: the largest new distance lands just below 0.5
    assert after.indices.tolist() == [[0, 1, 2, 3, 4]]
    np.testing.assert_allclose(after.distances[0, :3], np.array([1, 2, 5]) * 0.5 * (1 - gap) / 5, rtol=1e-6)
    assert after.distances[0, 2] < after.distances[0, 3] == np.float32(0.5) and after.distances[0, 4] == np.float32(0.6)
    check_ascending(after)
    tiny = merge_head(
        results([[0, 1, 2]], [[1e-6, 2e-6, 3e-6]]), np.array([[0.9, 0.2]])
    )  # cosine distances can be this small
    assert tiny.indices.tolist() == [[1, 0, 2]] and 0 < tiny.distances[0, 0] < tiny.distances[0, 1] < np.float32(3e-6)


def test_merge_keeps_tied_items_in_their_old_order():
    before = results([[5, 6, 7, 1, 2], [0, 1, 2, 3, 4]], [[0.1, 0.2, 0.3, 0.9, 0.9], [0.0, 0.0, 0.0, 0.0, 0.0]])
    after = merge_head(before, np.array([[0.7, 0.2, 0.7], [0.3, 0.3, 0.3]]))
    assert after.indices.tolist() == [[6, 5, 7, 1, 2], [0, 1, 2, 3, 4]]
    assert np.all(after.distances[1, :3] < 0) and after.distances[1, 3:].tolist() == [
        0,
        0,
    ]  # next distance 0: shifted below it
    assert after.distances[1, 0] == after.distances[1, 1] == after.distances[1, 2]  # the tie survives the shift
    check_ascending(after)


def test_merge_with_top_n_at_least_k_resorts_the_whole_list_without_rescaling():
    before = results([[4, 5, 6]], [[0.1, 0.2, 0.3]])
    after = merge_head(before, np.array([[0.9, 0.8, 0.95]]))
    assert after.indices.tolist() == [[5, 4, 6]]
    np.testing.assert_allclose(after.distances, [[0.8, 0.9, 0.95]], rtol=1e-6)


def test_merge_leaves_empty_slots_last_and_handles_negative_distances():
    before = results([[2, 1, PAD, PAD], [0, 1, 2, 3]], [[0.5, 0.6, np.inf, np.inf], [-3.0, -2.5, -2.0, -1.0]])
    after = merge_head(before, np.array([[0.9, 0.1, 0.3], [0.2, 0.1, 0.9]]))
    assert after.indices.tolist() == [[1, 2, PAD, PAD], [1, 0, 2, 3]]
    assert np.isinf(after.distances[0, 2:]).all() and after.distances[0, :2].tolist() == pytest.approx([0.1, 0.9])
    m = -1.0 - 1000 * np.finfo(np.float32).eps  # shifted below the next distance -1, not scaled by a negative ratio:
    assert after.distances[1].tolist() == pytest.approx([0.1 - 0.9 + m, 0.2 - 0.9 + m, m, -1.0], abs=1e-6)
    check_ascending(after)


# ---------------------------------------------------------------- pair mining and the loss


def test_hard_pairs_on_a_toy_batch():
    embeddings = torch.tensor([[0.0], [1.0], [1.5], [3.0]])
    first, second, negative = mine_pairs(embeddings, torch.tensor([0, 0, 1, 1]))
    pairs = list(zip(first.tolist(), second.tolist(), negative.tolist()))
    # anchors 0/1 and 2/3 are each other's only positive (kept once); closest negatives: 0->2, 1->2, 2->1 (= 1->2), 3->1
    assert pairs == [(0, 1, False), (2, 3, False), (0, 2, True), (1, 2, True), (3, 1, True)]


def test_mining_skips_padding_and_never_pairs_an_item_with_itself():
    embeddings = torch.tensor([[0.0], [0.0], [5.0], [1.0], [1.1]])
    labels, items = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([7, 7, 8, 9, 4])  # rows 0 and 1: the same image twice
    valid = torch.tensor([True, True, True, True, False])
    first, second, negative = mine_pairs(embeddings, labels, valid, items)
    pairs = {(int(items[a]), int(items[b]), bool(n)) for a, b, n in zip(first, second, negative)}
    assert all(a != b for a, b, _ in pairs) and all(4 not in (a, b) for a, b, _ in pairs)
    unordered = [frozenset((a, b)) for a, b, _ in pairs]
    assert len(unordered) == len(set(unordered))
    assert (7, 8, False) in pairs and (8, 7, False) not in pairs  # image 7's only other positive; the repeat is dropped


def test_random_pairs_are_a_positive_and_a_negative_per_anchor():
    labels = torch.arange(6).repeat_interleave(4)
    embeddings = torch.randn(24, 8)
    gen = torch.Generator().manual_seed(0)
    first, second, negative = mine_pairs(embeddings, labels, mining="random", generator=gen)
    same = labels[first] == labels[second]
    assert torch.equal(same, ~negative) and negative.any() and (~negative).any()
    again = mine_pairs(embeddings, labels, mining="random", generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((first, second, negative), again))
    with pytest.raises(LookalikeError, match="mining"):
        mine_pairs(embeddings, labels, mining="semi-hard")


def test_a_tiny_model_trains_on_mined_pairs_and_its_loss_falls():
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)
    prototypes = torch.rand(4, 3, 8, 8)
    images = (prototypes[labels] + 0.1 * torch.randn(16, 3, 8, 8)).clamp(0, 1)
    embeddings = prototypes[labels].flatten(1) + 0.3 * torch.randn(16, 192)  # an imperfect "extractor"
    model = PairwiseModel(PairwiseSpec("test_resnet", 8, dropout=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    first, second, negative = mine_pairs(embeddings, labels)
    losses = []
    for _ in range(12):
        out = pair_bce(model(images[first], images[second]), negative)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.5 * losses[0] and float(out.stats["accuracy"]) == 1.0


# ---------------------------------------------------------------- the model


def test_the_model_stacks_images_along_the_height_and_tta_averages_both_orders():
    model = PairwiseModel(PairwiseSpec("test_vit", [32, 16], hidden=8)).eval()
    assert tuple(model.backbone.patch_embed.img_size) == (64, 16)
    assert model.head[-2].bias is None and model.head[0].out_features == 8
    a, b = torch.randn(3, 3, 32, 16), torch.randn(3, 3, 32, 16)
    with torch.no_grad():
        plain = model.distance(a, b)
        model.spec.tta = True
        both = model.distance(a, b)
        assert torch.allclose(both, (plain + torch.sigmoid(model(b, a))) / 2) and torch.allclose(
            both, model.distance(b, a)
        )
    assert ((plain > 0) & (plain < 1)).all()


def test_the_backbone_starts_from_an_extractor_checkpoint_with_resampled_positions(tmp_path):
    from lookalike.models.extractor import Extractor

    extractor = Extractor("test_vit", embedding_dim=16)
    torch.save({"state_dict": {f"extractor.{k}": v for k, v in extractor.state_dict().items()}}, tmp_path / "ext.ckpt")
    model = init_from_extractor(PairwiseModel(PairwiseSpec("test_vit", 32)), tmp_path / "ext.ckpt")
    theirs = extractor.backbone.state_dict()
    ours = model.backbone.state_dict()
    assert torch.equal(ours["blocks.0.attn.qkv.weight"], theirs["blocks.0.attn.qkv.weight"])
    assert ours["pos_embed"].shape == (1, 1 + 4 * 2, 64) and theirs["pos_embed"].shape == (
        1,
        1 + 10 * 10,
        64,
    )  # 160 px default
    assert torch.equal(ours["pos_embed"][:, 0], theirs["pos_embed"][:, 0])  # the class token's position is kept


def test_save_and_load_round_trip_and_bad_files(tmp_path):
    model = PairwiseModel(PairwiseSpec("test_vit", 32, model_kwargs={"depth": 1})).eval()
    loaded = load_pairwise(save_pairwise(model, tmp_path / "pair.pt"), tta=True)
    assert loaded.spec.tta and loaded.spec.model_kwargs == {"depth": 1} and len(loaded.backbone.blocks) == 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x, x.flip(0)), model(x, x.flip(0)))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(LookalikeError, match="not a pairwise checkpoint"):
        load_pairwise(tmp_path / "other.pt")
    with pytest.raises(LookalikeError, match="no such file"):
        load_pairwise(tmp_path / "missing.pt")
    with pytest.raises(LookalikeError, match="pairwise.name"):
        PairwiseModel(PairwiseSpec("no_such_model", 32))
    with pytest.raises(LookalikeError, match="dropout"):
        PairwiseSpec("test_vit", 32, dropout=1.5)
    with pytest.raises(LookalikeError, match="image_size"):
        PairwiseSpec("test_vit", [32, 16, 8])


# ---------------------------------------------------------------- training and re-ranking on real images


@pytest.fixture(scope="module")
def trained(omniglot_small, tmp_path_factory):
    """A table, a tiny extractor trained for one epoch, and its config."""
    out = tmp_path_factory.mktemp("pairwise")
    table = import_folder(omniglot_small, validation_fraction=0.5, seed=0)
    table.save(out / "table.csv")
    base = [*FAST, f"data.table={out / 'table.csv'}"]
    extractor = run_train(load_config(None, [*base, f"train.output={out / 'extractor'}", "train.epochs=1"]))
    return out, [*base, f"model.weights={extractor.last_checkpoint}"]


class Snapshots(L.Callback):
    """The pairwise backbone's and head's state after every training epoch."""

    def __init__(self) -> None:
        self.states: list[tuple[dict, dict]] = []

    @staticmethod
    def _copy(module: torch.nn.Module) -> dict:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_start(self, trainer, module) -> None:
        self.states.append((self._copy(module.model.backbone), self._copy(module.model.head)))

    def on_train_epoch_end(self, trainer, module) -> None:
        self.states.append((self._copy(module.model.backbone), self._copy(module.model.head)))


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scheduler", ["none", "cosine"])  # a schedule must cover the backbone's group too
def test_the_backbone_stays_frozen_for_the_first_epochs_then_trains(trained, tmp_path, scheduler):
    _, base = trained
    cfg = load_config(
        None,
        [
            *base,
            f"train.output={tmp_path}",
            "train.epochs=3",
            "pairwise.freeze_epochs=2",
            "train.backbone_lr=1e-4",
            "pairwise.name=test_resnet",
            "train.val_every=3",
            f"train.scheduler={scheduler}",
        ],
    )  # a CNN: BN too
    L.seed_everything(0)
    module, data = build_pairwise_parts(cfg)
    snapshots = Snapshots()
    trainer = build_trainer(cfg, [snapshots, FrozenBackbone(2)])
    trainer.fit(module, datamodule=data)
    (b0, h0), (b1, h1), (b2, h2), (b3, h3) = snapshots.states
    assert _same(b0, b1) and _same(b1, b2)  # frozen: weights and batch-norm buffers unchanged for two epochs
    assert not _same(h0, h1) and not _same(h1, h2)  # while the head learns
    assert not _same(b2, b3)  # unfrozen in the third epoch
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1].get("initial_lr", groups[1]["lr"]) == pytest.approx(
        1e-4
    )  # before any schedule


def test_train_reranker_validates_by_reranking_and_the_reranker_reproduces_it(trained, tmp_path, monkeypatch):
    root, base = trained
    cfg = load_config(
        None, [*base, f"train.output={tmp_path}", "train.epochs=2", "pairwise.top_n=4", "pairwise.tta=true"]
    )
    assert auto_precision(cfg) == "32-true"
    result = run_train_reranker(cfg)
    assert result.best_checkpoint.is_file() and result.last_checkpoint.is_file()
    record = json.loads((tmp_path / "validation" / "metrics_last.json").read_text())
    assert record["epoch"] == 1 and record["top_n"] == 4 and record["after"]["means"] == pytest.approx(result.metrics)
    assert record["before"]["means"] == pytest.approx(result.metrics_before)
    assert {"grid_0_extractor.png", "grid_1_epoch001.png"} <= {p.name for p in (tmp_path / "validation").iterdir()}
    hparams = yaml.safe_load(next(tmp_path.glob("tensorboard/version_*/hparams.yaml")).read_text())
    assert (
        hparams["pairwise.top_n"] == 4
        and hparams["pairwise.tta"] is True
        and hparams["model.weights"] == cfg.model.weights
    )
    assert (
        record["provenance"]["model"]["weights"] == cfg.model.weights
        and record["provenance"]["model"]["weights_sha256"]
    )

    # the re-ranker, loaded from the last checkpoint, re-ranks the extractor's lists into the same metrics
    table = table_from_config(cfg).split("validation")
    from lookalike.pipeline import embed_table

    # embedded as training's validation embeds (its batches and layout, to the bit): with other batch shapes a
    # near-tie of the extractor's lists may fall the other way (it did with one OpenMP thread)
    embeddings = embed_table(cfg, extractor_from_config(cfg), table)
    report, before = search_and_score(cfg, embeddings, table)
    assert report.means == result.metrics_before  # the same lists as validation re-ranked
    decoded = []
    monkeypatch.setattr(
        image_io,
        "read_image",
        lambda path, bbox=None, _read=image_io.read_image: decoded.append(path) or _read(path, bbox),
    )
    reranker = create_reranker("pairwise", weights=str(result.last_checkpoint), top_n=4, progress=False)
    after = reranker.rerank(before, RerankContext(table=table))
    assert evaluate_table(
        after, table, cmc_k=(1, 5, 10), precision_k=(5, 10), map_k=(5, 10, 100)
    ).means == pytest.approx(result.metrics)
    q_rows, g_rows = table_rows(table, before)
    needed = set(q_rows) | set(g_rows[before.indices[:, :4].ravel()])
    assert len(decoded) == len(set(decoded)) == len(needed)  # every distinct image decoded once
    assert (after.indices[:, 4:] == before.indices[:, 4:]).all() and (
        after.distances[:, 4:] == before.distances[:, 4:]
    ).all()
    assert after.meta["rerank"][-1] == {"name": "pairwise", "top_n": 4, "model": "test_vit", "tta": True}

    # the same pairs scored one by one give the same head; a tiny cache (many chunks) gives the same lists
    model = reranker.model
    transform = model.transform()
    image = lambda row: transform(image_io.read_image(str(table.image_paths()[row])))[None]  # noqa: E731
    with torch.no_grad():
        q = 3
        direct = [float(model.distance(image(q_rows[q]), image(g_rows[g]))) for g in before.indices[q, :4]]
    order = np.argsort(direct, kind="stable")
    assert after.indices[q, :4].tolist() == before.indices[q, :4][order].tolist()
    n_decoded = len(decoded)
    small = PairwiseReranker(str(result.last_checkpoint), top_n=4, cache_mb=1, progress=False).rerank(
        before, RerankContext(table=table)
    )
    assert (small.indices == after.indices).all() and np.allclose(small.distances, after.distances, atol=1e-6)
    assert len(decoded) - n_decoded > len(needed)  # several chunks: images shared by chunks are decoded again

    with pytest.raises(LookalikeError, match="needs table"):
        reranker.rerank(before, RerankContext())


def test_train_reranker_needs_the_extractor_weights(trained, tmp_path):
    _, base = trained
    cfg = load_config(None, [*[a for a in base if not a.startswith("model.weights")], f"train.output={tmp_path}"])
    with pytest.raises(ConfigError, match="model.weights"):
        run_train_reranker(cfg)


def test_cli_trains_a_reranker_and_validate_shows_each_stage(trained, tmp_path):
    from typer.testing import CliRunner

    from lookalike.cli import app

    _, base = trained
    args = [a for a in base if not a.startswith("model.weights")]
    weights = next(a for a in base if a.startswith("model.weights")).split("=", 1)[1]
    runner = CliRunner()
    run = runner.invoke(
        app, ["train-reranker", *args, f"extractor_weights={weights}", f"train.output={tmp_path}", "train.epochs=1"]
    )
    assert run.exit_code == 0, run.output
    assert "re-ranked top 5" in run.output and "cmc@1" in run.output and "best checkpoint" in run.output
    chain = f"rerank=[{{pairwise: {{weights: {tmp_path / 'checkpoints' / 'last.ckpt'}, progress: false}}}}]"
    run = runner.invoke(app, ["validate", *args, f"weights={weights}", f"train.output={tmp_path}", chain])
    assert run.exit_code == 0, run.output
    assert "original" in run.output and "1:pairwise" in run.output
    assert {"grid_rerank_0_original.png", "grid_rerank_1_pairwise.png", "metrics_rerank.json"} <= {
        p.name for p in (tmp_path / "validation").iterdir()
    }
    run = runner.invoke(
        app,
        [
            "validate",
            *args,
            f"weights={weights}",
            f"train.output={tmp_path}",
            "evaluate.centroids=label",
            "rerank=[qe]",
        ],
    )
    assert run.exit_code == 0 and "1:qe" in run.output, (
        run.output
    )  # the chain re-ranks the images' lists, not centroids
    run = runner.invoke(app, ["train-reranker", *args, f"train.output={tmp_path}"])
    assert run.exit_code == 2 and "model.weights" in run.output


DDP_SCRIPT = '''
import sys
from pathlib import Path

import lightning as L
import torch

from lookalike.config import load_config
from lookalike.train.pairwise import run_train_reranker


class Snapshots(L.Callback):
    """Each rank writes its backbone's and head's state at the start and after every training epoch."""

    def __init__(self, out):
        self.out = Path(out)

    def _save(self, trainer, module, tag):
        state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
        torch.save(state, self.out / f"rank{trainer.global_rank}_{tag}.pt")

    def on_train_start(self, trainer, module):
        self._save(trainer, module, "start")

    def on_train_epoch_end(self, trainer, module):
        self._save(trainer, module, f"epoch{trainer.current_epoch}")


if __name__ == "__main__":
    result = run_train_reranker(load_config(None, sys.argv[2:]), callbacks=(Snapshots(sys.argv[1]),))
    if result.is_global_zero:
        print("done", result.metrics["cmc@1"])
'''


def test_freeze_epochs_under_ddp_keeps_the_backbone_frozen_on_every_rank_then_trains_it_in_sync(trained, tmp_path):
    """Real 2-process DDP (gloo, CPU): after the frozen epoch every rank's backbone equals the initial one (the head
    learnt); after unfreezing it changed, identically on both ranks (its gradients are all-reduced)."""
    import subprocess
    import sys

    _, base = trained
    script = tmp_path / "ddp_freeze.py"
    script.write_text(DDP_SCRIPT)
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    args = [
        *base,
        f"train.output={tmp_path / 'run'}",
        "train.epochs=2",
        "pairwise.freeze_epochs=1",
        "pairwise.name=test_resnet",
        "train.backbone_lr=1e-3",
        "train.val_every=2",
        "train.validate_before=false",
        "train.grid=false",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    ]
    run = subprocess.run([sys.executable, str(script), str(snaps), *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done") == 1
    states = {
        (r, tag): torch.load(snaps / f"rank{r}_{tag}.pt") for r in (0, 1) for tag in ("start", "epoch0", "epoch1")
    }
    backbone = lambda state: {k: v for k, v in state.items() if k.startswith("backbone.")}  # noqa: E731
    head = lambda state: {k: v for k, v in state.items() if k.startswith("head.")}  # noqa: E731
    for r in (0, 1):
        assert _same(backbone(states[r, "start"]), backbone(states[r, "epoch0"]))  # frozen: weights and BN statistics
        assert not _same(head(states[r, "start"]), head(states[r, "epoch0"]))  # while the head learnt
        assert not _same(backbone(states[r, "epoch0"]), backbone(states[r, "epoch1"]))  # trained after unfreezing
    assert _same(states[0, "epoch0"], states[1, "epoch0"]) and _same(
        states[0, "epoch1"], states[1, "epoch1"]
    )  # ranks agree


# ---------------------------------------------------------------- the recipe's configs

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


def _header_command(path) -> list[str]:
    """The `lookalike train configs/X.yaml ...` command in a config's header comment, as its overrides."""
    import shlex

    lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("lookalike train configs/"))
    command = ""
    for line in lines[start:]:
        command += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            break
    return shlex.split(command)[2:]


@pytest.mark.parametrize("dataset", ["sop", "inshop", "cub", "cars"])
def test_the_stir_recipe_configs_hold_the_published_settings(dataset):
    cfg = load_config(CONFIGS / f"{dataset}_pairwise.yaml")
    p, t = cfg.pairwise, cfg.train
    assert (p.freeze_epochs, p.top_n, p.hidden, p.dropout, p.mining, p.batch_size, p.precision) == (
        3,
        5,
        192,
        0.5,
        "hard",
        128,
        "16-mixed",
    )
    assert p.init_from_extractor and p.name == cfg.model.name == "vit_small_patch16_224.dino" and cfg.model.normalize
    assert (t.optimizer, t.lr, t.backbone_lr, t.scheduler, t.step_epochs, t.step_gamma) == (
        "adam",
        2e-3,
        None,
        "step",
        [3],
        5e-3,
    )
    assert (t.p, t.k, t.epochs, t.val_every, t.seed) == (30, 4, 1000, 10, 42)
    assert (cfg.data.image_size, cfg.data.crop_fraction) == (224, 1.0)
    assert (cfg.trainer.devices, cfg.trainer.strategy) == (2, "ddp")
    # the header's command trains the recipe's extractor from configs/{dataset}.yaml
    config, *overrides = _header_command(CONFIGS / f"{dataset}_pairwise.yaml")
    extractor = load_config(CONFIGS.parent / config, overrides)
    e, loss = extractor.train, extractor.train.loss
    assert extractor.model.name == "vit_small_patch16_224.dino" and extractor.model.normalize
    assert (e.optimizer, e.lr, e.p, e.k, e.val_every) == ("adamw", 1e-5, 150, 4, 5)
    assert (loss.triplet, loss.margin, loss.miner, loss.memory_size, loss.centroid, loss.cross_entropy) == (
        1.0,
        0.15,
        "batch_hard",
        0,
        0.0,
        0.0,
    )
    assert (extractor.trainer.devices, extractor.trainer.strategy, extractor.trainer.precision) == (
        2,
        "ddp",
        "16-mixed",
    )


def test_the_step_schedule_multiplies_by_step_gamma():
    from lookalike.train.trainer import build_scheduler

    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    scheduler = build_scheduler(optimizer, "step", 0, 10, [3], 5e-3)
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2e-3, 2e-3, 2e-3, 1e-5, 1e-5])


def test_train_reranker_stops_on_sigterm_with_a_checkpoint_that_resumes(trained, tmp_path):
    """Was: `kill PID` printed "Received SIGTERM" and the re-ranker kept training."""
    from lookalike.signals import EXIT_CODE
    from test_signals import last_line, start, terminate, wait_for

    _, base = trained
    args = [*base, f"train.output={tmp_path}"]
    process = start("train-reranker", *args, "train.epochs=1000")
    wait_for(process, (tmp_path / "validation" / "metrics_epoch000.json").is_file, "the first validation")
    rc, stderr, _ = terminate(process)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert rc == EXIT_CODE and last_line(stderr) == f"stopped by SIGTERM; saved {last}; continue with --resume last", (
        stderr[-2000:]
    )
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] >= 2 and SPEC_KEY in saved
    resumed = run_train_reranker(load_config(None, [*args, f"train.epochs={saved['epoch'] + 2}"]), resume="last")
    after = torch.load(resumed.last_checkpoint, map_location="cpu", weights_only=False)
    assert after["global_step"] > saved["global_step"] and after["epoch"] == saved["epoch"] + 1
