"""ONNX export: onnxruntime's embeddings and pair distances against torch's on real images, the torch-free runtime,
the `lookalike export` command, and a served index that embeds queries with onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from helpers import save_pairwise
from lookalike.core.errors import LookalikeError
from lookalike.data.folder import list_images
from lookalike.data.images import read_image
from lookalike.export import export_onnx
from lookalike.models.extractor import Extractor
from lookalike.models.pairwise import PairwiseModel, PairwiseSpec
from lookalike.onnx_runtime import OnnxExtractor, preprocess, sidecar_path
from lookalike.pipeline import extractor_from_config, table_from_config
from lookalike.serve import build_index, load_index
from test_serve import index_config, start_serve

LOOKALIKE = str(Path(sys.executable).parent / "lookalike")
TINY = ["model.name=resnet18", "model.pretrained=false", "data.image_size=32", "model.embedding_dim=64"]


@pytest.fixture(scope="module")
def extractor() -> Extractor:
    """A resnet18 with a 64-d projection at 32 px: random weights, fixed by the seed."""
    torch.manual_seed(0)
    return Extractor("resnet18", embedding_dim=64, image_size=32).eval()


@pytest.fixture(scope="module")
def exported(extractor, tmp_path_factory) -> Path:
    return export_onnx(extractor, tmp_path_factory.mktemp("export") / "model.onnx")[0]


@pytest.fixture(scope="module")
def images(omniglot_small) -> list[Path]:
    """The 160 drawings of the bundled Omniglot subset (8 Balinese characters x 20 drawers)."""
    return list_images(omniglot_small)


def top10(vectors: np.ndarray) -> np.ndarray:
    """Each row's 10 nearest other rows by cosine distance."""
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :10]


def test_onnxruntime_embeds_real_images_as_torch_does(extractor, exported, images):
    reference = extractor.embed(images, batch_size=64).vectors
    onnx_emb = OnnxExtractor(exported).embed(images, batch_size=7)  # batches of 7, the last one of 6
    assert onnx_emb.vectors.shape == (160, 64) and list(onnx_emb.ids) == [str(p) for p in images]
    assert np.abs(onnx_emb.vectors - reference).max() <= 1e-4
    np.testing.assert_array_equal(top10(onnx_emb.vectors), top10(reference))


def test_preprocessing_without_torch_equals_the_torchvision_transform(images):
    rng = np.random.default_rng(0)
    pictures = [read_image(p) for p in images[:20]] + [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(300, 217), (17, 19), (640, 96)]
    ]
    for size, crop in [(32, 0.875), (224, 1.0), ([64, 32], 1.0)]:
        model = Extractor("resnet18", image_size=size, crop_fraction=crop)
        settings = {"image_size": size, "crop_fraction": crop, **{k: model.data_config()[k] for k in ("mean", "std")}}
        transform = model.transform()
        for picture in pictures:
            np.testing.assert_allclose(preprocess(picture, settings), transform(picture).numpy(), atol=1e-6, rtol=0)


def test_the_batch_axis_is_dynamic_and_the_sidecar_records_the_preprocessing(extractor, exported):
    onnx.checker.check_model(str(exported), full_check=True)
    batch_dim = onnx.load(str(exported)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = extractor(x).numpy()
        assert np.abs(session.run(None, {"images": x.numpy()})[0] - expected).max() <= 1e-4
    settings = json.loads(sidecar_path(exported).read_text())
    assert (
        settings["kind"] == "extractor"
        and settings["image_size"] == 32
        and settings["crop_fraction"] == extractor.crop_fraction
    )
    assert settings["embedding_dim"] == 64 and settings["normalize"] is True and settings["channel_order"] == "RGB"
    assert settings["model"]["name"] == "resnet18" and settings["model"]["embedding_dim"] == 64
    assert settings["mean"] == pytest.approx([0.485, 0.456, 0.406]) and settings["lookalike_version"]
    assert sorted(p.name for p in exported.parent.iterdir()) == ["model.onnx", "model.preprocessing.json"]  # no temps


@pytest.mark.parametrize("tta", [False, True])
def test_pairwise_distances_match_torch(images, tmp_path, tta):
    torch.manual_seed(0)
    model = PairwiseModel(PairwiseSpec(name="resnet18", image_size=32, hidden=16, tta=tta)).eval()
    path, sidecar = export_onnx(model, tmp_path / "pairwise.onnx")
    settings = json.loads(sidecar.read_text())
    assert settings["kind"] == "pairwise" and settings["inputs"] == ["first", "second"]
    with pytest.raises(LookalikeError, match="a 'pairwise' model, expected an extractor"):
        OnnxExtractor(path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = np.stack([preprocess(read_image(p), settings) for p in images[:14]])
    for n in (1, 7):
        first, second = batch[:n], batch[7 : 7 + n]
        with torch.no_grad():
            expected = model.distance(torch.from_numpy(first), torch.from_numpy(second)).numpy()
        got = session.run(None, {"first": first, "second": second})[0]
        assert got.shape == (n,) and np.abs(got - expected).max() <= 1e-4


def test_a_model_without_its_sidecar_is_refused_in_one_line(exported, tmp_path):
    alone = tmp_path / "alone.onnx"
    alone.write_bytes(exported.read_bytes())
    with pytest.raises(LookalikeError, match=r"alone.preprocessing.json: missing \(the preprocessing"):
        OnnxExtractor(alone)
    sidecar_path(alone).write_text("{not json")
    with pytest.raises(LookalikeError, match="alone.preprocessing.json: not valid JSON"):
        OnnxExtractor(alone)


def test_the_onnx_runtime_imports_no_torch(exported, images):
    script = (
        "import sys; from lookalike.onnx_runtime import OnnxExtractor; "
        f"v = OnnxExtractor({str(exported)!r}).embed({[str(p) for p in images[:3]]!r}).vectors; "
        "print(v.shape, sorted(m for m in ('torch', 'torchvision', 'timm', 'lightning') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 64) []"


def test_cli_exports_an_extractor_checkpoint_and_a_pairwise_model(extractor, images, tmp_path):
    weights = tmp_path / "extractor.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in extractor.state_dict().items()}}, weights)  # Lightning-like
    result = subprocess.run(
        [LOOKALIKE, "export", str(weights), *TINY, "--format", "onnx"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    onnx_path = tmp_path / "extractor.onnx"
    assert (
        result.stdout.strip()
        == f"wrote {onnx_path} (extractor, ONNX) and {sidecar_path(onnx_path)} (its preprocessing)"
    )
    got = OnnxExtractor(onnx_path).embed(images[:9]).vectors
    assert np.abs(got - extractor.embed(images[:9]).vectors).max() <= 1e-4

    torch.manual_seed(1)
    pairwise = save_pairwise(PairwiseModel(PairwiseSpec(name="resnet18", image_size=32, hidden=8)), tmp_path / "p.pt")
    out = tmp_path / "out" / "reranker.onnx"
    result = subprocess.run(
        [LOOKALIKE, "-q", "export", str(pairwise), "--kind", "pairwise", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(sidecar_path(out).read_text())["model"]["hidden"] == 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "tflite"], "error: --format: expected onnx, got 'tflite'"),
        (["--kind", "ranker"], "error: --kind: expected extractor or pairwise, got 'ranker'"),
        (["--kind", "pairwise"], "is not a pairwise checkpoint"),
    ],
    ids=["format", "kind", "not-pairwise"],
)
def test_cli_export_errors_are_one_line_and_write_nothing(extractor, tmp_path, args, message):
    weights = tmp_path / "extractor.pt"
    torch.save(extractor.state_dict(), weights)
    result = subprocess.run(
        [LOOKALIKE, "export", str(weights), *TINY, *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extractor.pt"]


def test_cli_export_of_a_missing_or_foreign_file_is_one_line(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    for name, message in [("missing.pt", "model.weights: no such file"), ("notes.pt", "is not a PyTorch checkpoint")]:
        result = subprocess.run(
            [LOOKALIKE, "export", str(tmp_path / name), *TINY], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pt"]


def test_a_served_onnx_index_answers_like_torch(omniglot_small, tmp_path):
    from lookalike.data.folder import import_folder

    table = tmp_path / "table.csv"
    import_folder(omniglot_small, validation_fraction=0.5, seed=0).save(table)
    cfg = index_config(table, tmp_path / "index", "serve.runtime=onnx", "model.name=resnet18", "data.image_size=32")
    folder = build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))
    assert (folder / "model.onnx").is_file() and (folder / "model.preprocessing.json").is_file()
    with pytest.raises(LookalikeError, match="model.onnx: missing"):
        (folder / "model.onnx").rename(tmp_path / "moved.onnx")
        try:
            load_index(folder)
        finally:
            (tmp_path / "moved.onnx").rename(folder / "model.onnx")
    query = next(p for p in list_images(omniglot_small) if str(p) not in set(load_index(folder, "torch").paths))
    answers = {}
    for runtime in ("onnx", "torch"):
        process, base = start_serve(folder, *([] if runtime == "onnx" else ["--runtime", "torch"]))
        try:
            assert httpx.get(f"{base}/health", timeout=10).json()["runtime"] == runtime
            response = httpx.post(
                f"{base}/search", files={"file": ("q.png", query.read_bytes(), "image/png")}, data={"k": 10}, timeout=60
            )
            assert response.status_code == 200, response.text
            answers[runtime] = response.json()["columns"][0]["items"]
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert [i["id"] for i in answers["onnx"]] == [i["id"] for i in answers["torch"]]
    np.testing.assert_allclose(
        [i["distance"] for i in answers["onnx"]], [i["distance"] for i in answers["torch"]], atol=1e-4
    )
