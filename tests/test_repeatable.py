"""One checkpoint, one number: training's validation, `validate` and extract -> search -> evaluate agree to the bit;
and two runs of the same training give the same metrics (issue 21, items 1 and 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lookalike.train.module as module_mod
from helpers import TINY_TRAINING
from lookalike.config import load_config
from lookalike.pipeline import embed_table, run_evaluate, run_extract, run_search, table_from_config
from lookalike.train import build_parts, run_train, run_validate

# resnet18 (not timm's test_resnet): its convolutions run different oneDNN kernels in channels-last and contiguous
# layout, enough to move CMC@1 of the validation split below when the paths embed differently
FAST = [
    "model.name=resnet18",
    *TINY_TRAINING,
    "train.grid=false",
    "search.k=79",  # the whole ranking: each of the 80 validation queries against the other 79 images
    "evaluate.grid=null",
    "evaluate.cmc_plot=null",
]


def config(table_csv, out, *extra: str):
    files = [f"extract.output={out}/emb.npz", f"search.output={out}/results.npz", f"evaluate.output={out}/metrics.json"]
    return load_config(None, [*FAST, f"data.table={table_csv}", f"train.output={out}", *files, *extra])


@pytest.fixture
def validation_embeddings(monkeypatch) -> list:
    """The Embeddings every Lightning validation searches, in order (training's, then `validate`'s)."""
    seen, search_and_score = [], module_mod.search_and_score
    monkeypatch.setattr(
        module_mod, "search_and_score", lambda cfg, emb, table: seen.append(emb) or search_and_score(cfg, emb, table)
    )
    return seen


def test_train_validate_and_extract_search_evaluate_give_one_number(table_csv, tmp_path, validation_embeddings):
    trained = run_train(config(table_csv, tmp_path, "train.epochs=1", "train.validate_before=false"))
    cfg = config(table_csv, tmp_path, f"model.weights={trained.last_checkpoint}")
    validated = run_validate(cfg)
    table = table_from_config(cfg)
    extracted = run_extract(cfg, table)
    evaluated = run_evaluate(cfg, table, run_search(cfg, table)).report.means
    assert (
        trained.metrics == validated == evaluated
    )  # exactly; was CMC@1 0.2875 in train and validate, 0.35 from evaluate
    last_fit, validate = validation_embeddings
    np.testing.assert_array_equal(last_fit.vectors, extracted.vectors)  # bit for bit: were 5e-8 apart (model layout)
    np.testing.assert_array_equal(validate.vectors, extracted.vectors)


def test_validation_under_mixed_precision_embeds_as_extract_does(table_csv, tmp_path):
    """trainer.precision=bf16-mixed runs validation_step under autocast; its embeddings stay extract's fp32 ones."""
    cfg = config(table_csv, tmp_path, "model.name=test_resnet", "trainer.channels_last=false")
    module, data = build_parts(cfg)
    extracted = embed_table(cfg, module.extractor, data.val_table)
    module.eval()
    images, rows = next(iter(data.val_dataloader()))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        module.validation_step((images, rows), 0)
    ((got_rows, got),) = module._val_parts
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), extracted.vectors[got_rows.numpy()])  # was bf16 numbers, ~1e-3 apart


def weights(checkpoint) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def test_two_runs_and_a_resumed_run_give_identical_metrics(table_csv, tmp_path):
    """The same seed gives the same weights and metrics, run after run, and when stopped after epoch 1 and resumed
    (batches and random augmentation of an epoch depend on the seed and the epoch alone)."""
    short = ["model.name=test_resnet", "train.batches_per_epoch=2", "train.validate_before=false", "train.augment=reid"]
    first = run_train(config(table_csv, tmp_path / "first", *short, "train.epochs=2"))
    second = run_train(config(table_csv, tmp_path / "second", *short, "train.epochs=2"))
    run_train(config(table_csv, tmp_path / "resumed", *short, "train.epochs=1"))
    resumed = run_train(config(table_csv, tmp_path / "resumed", *short, "train.epochs=2"), resume="last")
    assert (
        first.metrics == second.metrics == resumed.metrics
    )  # resumed: epoch 1 trained on epoch 0's batches, other crops
    for run in (second, resumed):
        for key, value in weights(first.last_checkpoint).items():
            assert torch.equal(value, weights(run.last_checkpoint)[key]), key
