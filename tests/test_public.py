"""The public face: `import lookalike` exports the nouns and verbs lazily; Extractor/embed take files, folders, PIL
images
and tables with the model's own transform; GalleryIndex builds from a class-per-folder tree and answers one image."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import lookalike
from lookalike.config import load_config
from lookalike.core.errors import ImageError, LookalikeError
from lookalike.data.folder import import_folder, list_images
from lookalike.data.images import eval_transform, read_image
from lookalike.models.extractor import Extractor
from lookalike.serve.index import load_index


def python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (with this process's import path)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=None)


def test_import_lookalike_is_light_and_search_stays_callable():
    """A fresh interpreter: no torch until a name needs it; then importing lookalike.search.* (which rebinds
    lookalike.search
    to the subpackage) leaves the verb callable and the package's names reachable."""
    done = python(
        "import sys, lookalike\n"
        "assert 'torch' not in sys.modules and 'lookalike.metrics' not in sys.modules, 'import lookalike loaded "
        "torch'\n"
        "lookalike.Embeddings, lookalike.DatasetTable, lookalike.load_config\n"
        "assert 'torch' not in sys.modules, 'the data nouns loaded torch'\n"
        "import lookalike.search.exact, numpy as np\n"
        "assert 'torch' in sys.modules\n"
        "g = lookalike.Embeddings(np.eye(3), ['a', 'b', 'c']); q = lookalike.Embeddings([[0.1, 1.0, 0.0]], ['q'])\n"
        "print(lookalike.search(q, g, k=2).indices.tolist(), lookalike.search.exact_knn.__name__)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[[1,", "0]]", "exact_knn"]


def test_all_names_resolve_to_the_objects_where_they_live():
    import lookalike.core.embeddings
    import lookalike.metrics
    import lookalike.serve.index

    for name in lookalike.__all__:
        assert getattr(lookalike, name) is not None, name
    assert set(lookalike.__all__) - {"__version__"} == set(lookalike._EXPORTS)
    assert lookalike.Embeddings is lookalike.core.embeddings.Embeddings
    assert lookalike.compute_metrics is lookalike.metrics.compute_metrics
    assert lookalike.GalleryIndex is lookalike.serve.index.GalleryIndex
    assert set(lookalike.__all__) <= set(dir(lookalike))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lookalike.nope  # noqa: B018
    star: dict = {}
    exec("from lookalike import *", star)
    assert sorted(k for k in star if k != "__builtins__") == sorted(lookalike.__all__)


def test_list_rerankers_names_what_create_reranker_accepts():
    names = lookalike.list_rerankers()
    assert names == sorted(names) and {"icfrr", "kreciprocal", "qe", "dba", "centroids", "pairwise"} <= set(names)
    assert all(
        lookalike.create_reranker(name, **({"weights": "x.ckpt"} if name == "pairwise" else {})).name == name
        for name in names
    )


@pytest.fixture(scope="module")
def extractor() -> Extractor:
    torch.manual_seed(0)
    return Extractor("test_resnet", embedding_dim=16, image_size=32, crop_fraction=1.0).eval()


def test_embed_applies_the_models_own_transform(extractor, omniglot_small):
    """embed(files) equals the model run by hand on the transform of image_size, crop_fraction and timm's mean and
    std."""
    files = list_images(omniglot_small)[:5]
    emb = lookalike.embed(extractor, files, batch_size=2)
    dc = extractor.data_config()
    by_hand = torch.stack([eval_transform(32, 1.0, dc["mean"], dc["std"])(read_image(f)) for f in files])
    with torch.inference_mode():
        np.testing.assert_allclose(emb.vectors, extractor(by_hand).numpy(), atol=1e-5)
    assert emb.ids.tolist() == [str(f) for f in files]


def test_embed_takes_folders_pil_images_and_tables_alike(extractor, omniglot_small):
    folder = omniglot_small / "Balinese" / "character01"
    files = list_images(folder)
    from_folder = extractor.embed(folder)
    from_pil = extractor.embed([Image.open(f) for f in files])
    assert from_folder.ids.tolist() == [str(f) for f in files] and len(from_folder) == 20
    assert from_pil.ids.tolist() == [str(f) for f in files]  # a PIL image opened from a file keeps its name
    np.testing.assert_allclose(from_pil.vectors, from_folder.vectors, atol=1e-6)
    one = extractor.embed(Image.new("L", (40, 30), 255))
    assert one.ids.tolist() == ["image0"] and one.vectors.shape == (1, 16)
    table = import_folder(omniglot_small, validation_fraction=0.0)
    from_table = extractor.embed(table)
    assert from_table.ids.tolist() == table.frame["path"].tolist()
    np.testing.assert_allclose(
        from_table.select([f"Balinese/character01/{f.name}" for f in files]).vectors, from_folder.vectors, atol=1e-6
    )


def test_embed_errors_are_one_line_naming_the_input(extractor, tmp_path):
    with pytest.raises(LookalikeError, match=f"^{tmp_path}: no images found"):
        extractor.embed(tmp_path)
    with pytest.raises(ImageError, match="missing.png: cannot read image \\(no such file\\)"):
        extractor.embed(tmp_path / "missing.png")
    with pytest.raises(LookalikeError, match="at least one image"):
        extractor.embed([])


def test_extractor_defaults_and_weights_and_config(extractor, tmp_path):
    default = Extractor("resnet18")
    assert default.image_size == 224 and default.crop_fraction == pytest.approx(default.data_config()["crop_pct"])
    torch.save(extractor.state_dict(), tmp_path / "model.pt")
    loaded = Extractor("test_resnet", embedding_dim=16, image_size=32, crop_fraction=1.0, weights=tmp_path / "model.pt")
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    np.testing.assert_allclose(loaded.embed(image).vectors, extractor.embed(image).vectors, atol=1e-6)
    cfg = load_config(
        None,
        [
            "model.name=test_resnet",
            "model.pretrained=false",
            "model.embedding_dim=16",
            f"model.weights={tmp_path / 'model.pt'}",
            "data.image_size=[32, 24]",
            "data.crop_fraction=0.5",
        ],
    )
    from_cfg = Extractor.from_config(cfg)
    assert (from_cfg.image_size, from_cfg.crop_fraction, from_cfg.settings()["embedding_dim"]) == ([32, 24], 0.5, 16)
    torch.testing.assert_close(from_cfg.state_dict(), extractor.state_dict())


def test_gallery_index_builds_from_a_folder_tree_and_answers_one_image(extractor, omniglot_small, tmp_path):
    folder = tmp_path / "index"
    index = lookalike.GalleryIndex.build(omniglot_small, extractor, folder, rerank=[{"qe": {"n": 3}}], batch_size=32)
    assert len(index) == 160 and (folder / "manifest.json").is_file()
    assert sorted(set(index.labels)) == [f"Balinese/character0{i}" for i in range(1, 9)]  # the leaf folder is the label
    query = list_images(omniglot_small / "Balinese" / "character03")[4]
    hits = index.query(query, k=5)
    assert list(hits.columns) == ["id", "path", "label", "distance"] and hits.index.tolist() == [1, 2, 3, 4, 5]
    assert hits["path"].iloc[0] == str(query.resolve()) and hits["distance"].iloc[0] == pytest.approx(
        0, abs=1e-5
    )  # a gallery image finds itself
    assert hits["distance"].is_monotonic_increasing
    with Image.open(query) as picture:
        np.testing.assert_allclose(index.query(picture, k=5)["distance"], hits["distance"], atol=1e-6)
    reranked = index.query(query, k=5, reranker="qe(n=3)")  # the column name, as the README says
    assert len(reranked) == 5 and reranked["distance"].is_monotonic_increasing
    with pytest.raises(LookalikeError, match="unknown 'qe'; this index has qe\\(n=3\\)"):
        index.query(query, reranker="qe")
    again = lookalike.GalleryIndex.load(folder)
    assert again.query(query, k=5)["path"].tolist() == hits["path"].tolist()
    assert load_index(folder).manifest.model.model_dump() == extractor.settings()


def test_gallery_index_build_refuses_bad_settings_in_one_line(extractor, omniglot_small, tmp_path):
    with pytest.raises(LookalikeError, match="^GalleryIndex.build: extract.device: "):
        lookalike.GalleryIndex.build(omniglot_small, extractor, tmp_path / "i", device="gpu9")
    with pytest.raises(LookalikeError, match="unknown re-ranker 'nope'"):
        lookalike.GalleryIndex.build(omniglot_small, extractor, tmp_path / "i", rerank=["nope"])
    assert not (tmp_path / "i").exists()  # nothing half-written
