"""Extractor, weights loading and batched extraction on real Omniglot images with a tiny timm model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import LookalikeError
from lookalike.data.folder import import_folder
from lookalike.data.images import eval_transform, read_image
from lookalike.extract import extract_embeddings
from lookalike.models.extractor import Extractor, load_weights


@pytest.fixture(scope="module")
def table(omniglot_small):
    return import_folder(omniglot_small, validation_fraction=0.25, seed=0).split("validation")


def test_embeddings_are_l2_normalised_and_in_row_order(table):
    torch.manual_seed(0)
    model = Extractor("test_resnet", embedding_dim=24)
    calls = []
    emb = extract_embeddings(
        model, table, eval_transform(32), batch_size=16, progress=lambda it, n: calls.append(n) or it
    )
    assert emb.vectors.shape == (len(table), 24)
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1, atol=1e-5)
    assert emb.ids.tolist() == table.frame["path"].tolist()
    assert calls == [int(np.ceil(len(table) / 16))]
    one = model.eval()(eval_transform(32)(read_image(str(table.image_paths()[5])))[None])
    np.testing.assert_allclose(emb.vectors[5], one[0].detach().numpy(), atol=1e-5)


def test_lightning_checkpoint_with_prefix_loads(tmp_path, table):
    torch.manual_seed(1)
    trained = Extractor("test_resnet")
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()},
        "epoch": 3,
        "optimizer_states": [{"lr": np.float64(1e-4), "step": np.int64(7)}],
    }  # numpy scalars, as older checkpoints hold
    torch.save(ckpt, tmp_path / "last.ckpt")
    torch.manual_seed(2)
    fresh = load_weights(Extractor("test_resnet"), tmp_path / "last.ckpt")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), trained.eval()(x))


def test_weights_of_another_model_are_refused(tmp_path):
    torch.save(Extractor("test_resnet", embedding_dim=8).state_dict(), tmp_path / "w.pt")
    with pytest.raises(LookalikeError, match=r"lacks 1 weights .*projection|lacks \d+ weights"):
        load_weights(Extractor("test_vit"), tmp_path / "w.pt")
    (tmp_path / "bad.pt").write_text("hello")
    with pytest.raises(LookalikeError, match="not a PyTorch checkpoint"):
        load_weights(Extractor("test_resnet"), tmp_path / "bad.pt")


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(LookalikeError, match="model.name: Unknown model"):
        Extractor("no_such_model_xyz")


def test_grayscale_becomes_rgb_and_bbox_crops(tmp_path):
    gray = np.zeros((40, 60), dtype=np.uint8)
    gray[10:20, 30:50] = 255
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    img = read_image(str(tmp_path / "g.png"), np.array([30, 10, 50, 20]))
    assert img.mode == "RGB" and img.size == (20, 10)
    assert np.asarray(img).min() == 255  # only the white box is left
    with pytest.raises(LookalikeError, match="cannot read image"):
        (tmp_path / "broken.png").write_bytes(b"not a png")
        read_image(str(tmp_path / "broken.png"))


def test_embeddings_save_load_and_select(tmp_path):
    emb = Embeddings(np.arange(6, dtype=np.float32).reshape(3, 2), ["a", "b", "c"], {"model": "x"})
    emb.save(tmp_path / "e.npz")
    back = Embeddings.load(tmp_path / "e.npz")
    np.testing.assert_array_equal(back.select(["c", "a"]).vectors, [[4, 5], [0, 1]])
    assert back.meta == {"model": "x"}
    with pytest.raises(LookalikeError, match="no embedding for id 'zz'"):
        back.select(["zz"])
