"""The CTL backbones: ResNet50-IBN-a registered with timm (IBN in stages 1-3 only, forward, local weights, official key
names) and last stride 1."""

from __future__ import annotations

import subprocess

import pytest
import timm
import torch
from torch import nn

import lookalike.models  # noqa: F401 - registers resnet50_ibn_a
from helpers import LOOKALIKE
from lookalike.config import load_config
from lookalike.core.errors import LookalikeError
from lookalike.data.folder import import_folder
from lookalike.models.extractor import Extractor
from lookalike.models.ibn import IBN
from lookalike.pipeline import extractor_from_config


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet50_ibn_a", pretrained=False, num_classes=0).eval()


def test_instance_norm_in_stages_1_to_3_only(model):
    for stage, blocks in (("layer1", 3), ("layer2", 4), ("layer3", 6)):
        for block in getattr(model, stage):
            assert isinstance(block.bn1, IBN)
            assert block.bn1.IN.num_features == block.bn1.BN.num_features == block.conv1.out_channels // 2
            assert block.bn1.IN.affine and isinstance(block.bn2, nn.BatchNorm2d)
        assert len(getattr(model, stage)) == blocks
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in model.layer4.modules())
    assert isinstance(model.bn1, nn.BatchNorm2d) and sum(isinstance(m, IBN) for m in model.modules()) == 13


def test_ibn_normalises_each_half_its_own_way():
    torch.manual_seed(0)
    ibn = IBN(6).train()
    x = torch.randn(4, 6, 5, 5) * 3 + 2
    y = ibn(x)
    torch.testing.assert_close(y[:, :3].mean((2, 3)), torch.zeros(4, 3), atol=1e-5, rtol=0)  # per image and channel
    torch.testing.assert_close(
        y[:, 3:].mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0
    )  # per channel over the batch
    assert y[:, 3:].mean((2, 3)).abs().max() > 0.1  # but not per image


def test_forward_shape_and_official_key_names(model):
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 32)).shape == (2, 2048)
    keys = set(model.state_dict())
    # names of the IBN-Net / centroids-reid ResNet_IBN checkpoints (fc dropped with num_classes=0)
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.bn1.IN.weight",
        "layer1.0.bn1.BN.running_var",
        "layer3.5.bn1.IN.bias",
        "layer4.0.bn1.weight",
        "layer4.0.downsample.0.weight",
        "layer4.2.bn3.running_mean",
    ):
        assert key in keys
    assert not any(k.startswith("layer4") and ".IN." in k for k in keys)


def test_weights_round_trip_through_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet50_ibn_a", num_classes=1000)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "r50_ibn_a.pth"
    torch.save(
        {f"module.{k}": v for k, v in source.state_dict().items()}, path
    )  # a backbone-only file, with fc and a prefix
    cfg = load_config(None, ["model.name=resnet50_ibn_a", "model.pretrained=true", f"model.weights={path}"])
    extractor = extractor_from_config(cfg)  # pretrained=true with a weights file: the file, no download
    own = extractor.backbone.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(own[key], value)
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        source.eval().reset_classifier(0)
        torch.testing.assert_close(extractor.eval().backbone(images), source(images))


def test_pretrained_without_a_file_is_one_line_error(omniglot_small, tmp_path):
    with pytest.raises(LookalikeError, match="resnet50_ibn_a has no weights to download; pass a local file"):
        Extractor("resnet50_ibn_a", pretrained=True)
    import_folder(omniglot_small, validation_fraction=0.5, seed=0).save(tmp_path / "table.csv")
    done = subprocess.run(
        [
            LOOKALIKE,
            "extract",
            "model.name=resnet50_ibn_a",
            "model.pretrained=true",
            f"data.table={tmp_path / 'table.csv'}",
            f"extract.output={tmp_path / 'emb.npz'}",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert (
        "model.pretrained: resnet50_ibn_a has no weights to download" in done.stderr
        and not (tmp_path / "emb.npz").exists()
    )


@pytest.mark.parametrize("name", ["resnet18", "resnet50_ibn_a"])
def test_last_stride_one_doubles_the_last_feature_map_with_the_same_weights(name):
    torch.manual_seed(0)
    plain, strided = Extractor(name), Extractor(name, last_stride=1)
    strided.load_state_dict(plain.state_dict())  # the same parameters: only the stride differs
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert plain.backbone.forward_features(images).shape[-2:] == (2, 2)
        assert strided.backbone.forward_features(images).shape[-2:] == (4, 4)
        assert strided(images).shape == plain(images).shape


def test_last_stride_needs_a_resnet_stage():
    with pytest.raises(LookalikeError, match="model.last_stride: expected a positive stride for a ResNet-like model"):
        Extractor("test_vit", last_stride=1)
    cfg = load_config(None, ["model.name=resnet18", "model.pretrained=false", "model.last_stride=1"])
    assert extractor_from_config(cfg).backbone.layer4[0].conv2.stride == (1, 1)
