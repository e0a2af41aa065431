"""The embedding extractor: any timm backbone, pooled, optionally projected, L2-normalised."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import timm
import torch
from torch import nn
from torchvision.transforms import v2

from lookalike.core.errors import LookalikeError, LookalikeWarning
from lookalike.core.table import DatasetTable
from lookalike.data.images import ImageSource, transforms_for
from lookalike.extract import embed
from lookalike.models.hub import create_timm_model
from lookalike.models.spec import store_spec, stored_spec

DEFAULT_NAME = "resnet50"  # model.name when neither it nor the weights name a model

if TYPE_CHECKING:
    from lookalike.config import Config
    from lookalike.core.embeddings import Embeddings


class Extractor(nn.Module):
    """timm backbone (classifier removed) -> optional linear projection -> optional BNNeck -> optional L2 normalisation.

    Args:
        name: any timm model name (e.g. "resnet18", "vit_small_patch16_224.dino"); None: the model `weights` records
            (a checkpoint lookalike wrote), else resnet50.
        pretrained: start from timm's pretrained weights (downloads them once).
        embedding_dim: size of a linear projection after the backbone; None keeps the backbone's features.
        normalize: L2-normalise the embeddings.
        bnneck: batch norm without shift after the projection (CTL / re-ID).
        weights: a state dict or Lightning checkpoint to load (e.g. runs/omniglot/checkpoints/last.ckpt). When it
            records its model (training's checkpoints and `save` do), the architecture (embedding_dim, normalize,
            bnneck, last_stride) and, unless given, image_size and crop_fraction come from it; a given name or
            embedding_dim that differs from it is an error.
        image_size: side (or [height, width]) that `transform` and `embed` feed the model; None: timm's input size.
        crop_fraction: `transform` resizes the short side to image_size / crop_fraction and centre-crops; None: timm's
        crop_pct.

    Example:
        >>> import lookalike
        >>> extractor = lookalike.Extractor("resnet18", image_size=32)  # pretrained=True for ImageNet weights
        >>> extractor.embed("data/omniglot/images_background_small1/Latin/character01/0683_01.png").vectors.shape
        (1, 512)
    """

    def __init__(
        self,
        name: str | None = None,
        pretrained: bool = False,
        embedding_dim: int | None = None,
        normalize: bool = True,
        bnneck: bool = False,
        last_stride: int | None = None,
        *,
        weights: str | os.PathLike | None = None,
        image_size: int | list[int] | None = None,
        crop_fraction: float | None = None,
    ) -> None:
        super().__init__()
        checkpoint = read_checkpoint(weights) if weights is not None else None
        spec = spec_of(checkpoint, weights, name, embedding_dim)
        if spec is not None:
            name, embedding_dim, normalize = spec["name"], spec["embedding_dim"], spec["normalize"]
            bnneck, last_stride = spec["bnneck"], spec["last_stride"]
            image_size = image_size if image_size is not None else spec.get("image_size")
            crop_fraction = crop_fraction if crop_fraction is not None else spec.get("crop_fraction")
        name = name or DEFAULT_NAME
        self.backbone = create_timm_model(name, "model", pretrained=pretrained, num_classes=0)
        if last_stride is not None:
            set_last_stride(self.backbone, last_stride, name)
        features = self.backbone.num_features
        self.projection = nn.Linear(features, embedding_dim) if embedding_dim else nn.Identity()
        self.dim = embedding_dim or features
        self.neck = _bnneck(self.dim) if bnneck else nn.Identity()
        self.normalize = normalize
        self.name = name
        self.last_stride = last_stride
        timm_config = self.data_config()
        height, width = timm_config["input_size"][1:]
        self.image_size = image_size if image_size is not None else (height if height == width else [height, width])
        self.crop_fraction = crop_fraction if crop_fraction is not None else float(timm_config.get("crop_pct", 0.875))
        self.weights_spec = spec  # what the weights file recorded (None: no weights, or an older file)
        if weights is not None:
            load_weights(self, weights, checkpoint=checkpoint)

    @classmethod
    def from_config(cls, cfg: Config) -> Extractor:
        """The extractor of a config: model.* (model.weights loaded when given), with data.image_size and
        data.crop_fraction.

        Args:
            cfg: a Config, e.g. `lookalike.load_config("configs/omniglot.yaml")`.

        Returns:
            The extractor, in training mode as nn.Modules start (embed switches it to eval).

        Example:
            >>> import lookalike
            >>> overrides = ["model.name=resnet18", "model.pretrained=false", "data.image_size=32"]
            >>> cfg = lookalike.load_config(None, overrides)
            >>> lookalike.Extractor.from_config(cfg).image_size
            32
        """
        m, d = cfg.model, cfg.data
        extractor = cls(
            m.name,
            pretrained=m.pretrained and not m.weights,
            embedding_dim=m.embedding_dim,
            normalize=m.normalize,
            bnneck=m.bnneck,
            last_stride=m.last_stride,
            weights=m.weights,
            image_size=d.image_size,
            crop_fraction=d.crop_fraction,
        )
        extractor.warn_input_change()
        return extractor

    def settings(self) -> dict:
        """The constructor arguments that rebuild this architecture (name, embedding_dim, normalize, bnneck,
        last_stride)."""
        projection = self.projection.out_features if isinstance(self.projection, nn.Linear) else None
        return {
            "name": self.name,
            "embedding_dim": projection,
            "normalize": self.normalize,
            "bnneck": isinstance(self.neck, nn.BatchNorm1d),
            "last_stride": self.last_stride,
        }

    def spec(self) -> dict[str, Any]:
        """What rebuilds this extractor and its input from a file alone: settings(), pretrained=False (the weights are
        in the file), and its transform's image_size, crop_fraction, mean and std (plain types: weights_only loads it).

        Returns:
            The spec that training's checkpoints and `save` store (lookalike.models.spec).
        """
        dc = self.data_config()
        size = self.image_size if isinstance(self.image_size, int) else [int(s) for s in self.image_size]
        return {
            **self.settings(),
            "pretrained": False,
            "image_size": size,
            "crop_fraction": float(self.crop_fraction),
            "mean": [float(x) for x in dc["mean"]],
            "std": [float(x) for x in dc["std"]],
        }

    def warn_input_change(self) -> None:
        """Warn (one line) when the images are fed at another size or crop than the weights were trained with: the
        embeddings then differ from training's validation, usually for the worse."""
        stored = self.weights_spec or {}
        for key, field in (("image_size", "data.image_size"), ("crop_fraction", "data.crop_fraction")):
            if key in stored and stored[key] != getattr(self, key):
                warnings.warn(
                    f"{field}: {getattr(self, key)!r}, but model.weights was trained with {stored[key]!r} (set "
                    f"{field}={stored[key]} to embed as training validated)",
                    LookalikeWarning,
                    stacklevel=2,
                )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the weights with the spec into one file, atomically: `Extractor(weights=path)` rebuilds this model.

        Args:
            path: the file (.pt).

        Returns:
            The path written.
        """
        from lookalike.core.atomic import atomic_path

        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(store_spec({"state_dict": self.state_dict()}, "extractor", self.spec()), tmp)
        return Path(path)

    def transform(self) -> v2.Compose:
        """The evaluation transform this model expects: image_size, crop_fraction, and timm's mean and std for the
        backbone."""
        return transforms_for(self, self)

    def embed(self, images: DatasetTable | ImageSource | Sequence[ImageSource], **kwargs: Any) -> Embeddings:
        """`lookalike.embed(self, images, **kwargs)`: a table, folder, file, PIL image or list of them as Embeddings."""
        return embed(self, images, **kwargs)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalised features before and after the neck: the inputs of the metric and the classification losses."""
        features = self.projection(self.backbone(images))
        return features, self.neck(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, embeddings = self.features(images)
        return nn.functional.normalize(embeddings, dim=1) if self.normalize else embeddings

    def data_config(self) -> dict:
        """timm's preprocessing for this backbone (mean, std, input size)."""
        return timm.data.resolve_model_data_config(self.backbone)


def model_name(name: str | None, weights: str | os.PathLike | None) -> str | None:
    """The timm name an extractor built from model.name and model.weights has: the given one, else the one the weights
    record, else resnet50 (no weights); None when the weights cannot say (an older file, or none readable).

    Args:
        name: model.name.
        weights: model.weights.

    Returns:
        The timm name, or None.
    """
    if name or not weights:
        return name or DEFAULT_NAME
    try:
        spec = stored_spec(read_checkpoint(weights), "extractor")
    except LookalikeError:
        return None
    return spec["name"] if spec else None


def spec_of(
    checkpoint: object, path: str | os.PathLike | None, name: str | None, embedding_dim: int | None
) -> dict[str, Any] | None:
    """The extractor spec a checkpoint records, checked against a given name and embedding_dim; None for a file
    without one when `name` says which model it holds.

    Args:
        checkpoint: what read_checkpoint returned (None: no weights).
        path: the file, for messages.
        name: the timm name asked for, or None.
        embedding_dim: the projection size asked for, or None.

    Returns:
        The spec, or None (no weights, or an older file with `name` given).
    """
    if checkpoint is None:
        return None
    spec = stored_spec(checkpoint, "extractor")
    if spec is None:
        if name is None:
            raise LookalikeError(
                f"model.weights: {path} does not record its model (a file written before checkpoints did, or not by "
                "lookalike); add model.name=<its timm model> (and model.embedding_dim if it has a projection)"
            )
        return None
    for key, asked in (("name", name), ("embedding_dim", embedding_dim)):
        if asked is not None and asked != spec[key]:
            raise LookalikeError(
                f"model.{key}: {asked!r}, but {path} holds a model with {key} {spec[key]!r}; leave model.{key} out "
                "(the checkpoint names its model) or give the weights of that model"
            )
    return spec


def set_last_stride(backbone: nn.Module, stride: int, name: str) -> None:
    """Give the first block of a ResNet's last stage (layer4) `stride` in place of its 2: the re-ID "last stride 1" of
    BoT and the official CTL code (a feature map twice as high and wide; the weights stay the same)."""
    stage = getattr(backbone, "layer4", None)
    if stride < 1 or not isinstance(stage, nn.Sequential) or len(stage) == 0:
        raise LookalikeError(
            f"model.last_stride: expected a positive stride for a ResNet-like model with a layer4 stage, got {stride} "
            f"for {name!r}"
        )
    strided = [
        m for m in stage[0].modules() if isinstance(m, (nn.Conv2d, nn.AvgPool2d)) and m.stride not in (1, (1, 1))
    ]
    if any(isinstance(m, nn.AvgPool2d) for m in strided):
        raise LookalikeError(
            f"model.last_stride: {name!r} downsamples by average pooling, which last_stride does not change"
        )
    for conv in strided:
        conv.stride = (stride, stride)


def _bnneck(dim: int) -> nn.BatchNorm1d:
    """Batch norm without a learnt shift (Luo et al., "Bag of Tricks" re-ID baseline): it separates the
    metric-loss space (before) from the classification/retrieval space (after)."""
    neck = nn.BatchNorm1d(dim)
    neck.bias.requires_grad_(False)
    return neck


# plain numbers that other tools (and Lightning optimiser states) store as numpy scalars: data, not code
NUMPY_SCALAR_GLOBALS = [
    np._core.multiarray.scalar,
    np.dtype,
    *{type(np.dtype(t)) for t in (np.float32, np.float64, np.int64, np.bool_)},
]


def read_checkpoint(path: str | os.PathLike, field: str = "model.weights") -> object:
    """torch.load with weights_only (numpy scalars allowed); a missing or foreign file is one error naming `field`."""
    path = Path(path)
    if not path.is_file():
        raise LookalikeError(f"{field}: no such file {path}")
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  torch raises many types for a file that is not a checkpoint
        raise LookalikeError(f"{field}: {path} is not a PyTorch checkpoint ({exc.__class__.__name__})") from None


def load_weights(
    module: nn.Module,
    path: str | os.PathLike,
    adapt: Callable[[dict], dict] | None = None,
    field: str = "model.weights",
    checkpoint: object | None = None,
) -> nn.Module:
    """Load a state dict or a Lightning checkpoint into `module`, finding the key prefix by itself, or into
    module.backbone
    when no key fits the module (a backbone-only file such as ImageNet or IBN-Net weights); `adapt` may reshape the
    stripped state first (e.g. resample position embeddings). Errors name `field`; `checkpoint` is the file already
    read."""
    state = read_checkpoint(path, field) if checkpoint is None else checkpoint
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise LookalikeError(f"{field}: {path} holds no state dict")
    own = module.state_dict()
    prefix = _common_prefix(state, own)
    if prefix is None and isinstance(
        getattr(module, "backbone", None), nn.Module
    ):  # the backbone's own weights (e.g. ImageNet)
        load_weights(module.backbone, path, adapt, field, state)
        return module
    prefix = prefix or ""
    stripped = {
        k[len(prefix) :]: v
        for k, v in state.items()
        if k.startswith(prefix) and k[len(prefix) :] not in _dropped_head(module)
    }
    stripped = adapt(stripped) if adapt is not None else stripped
    check_state(stripped, own, f"{field}: {path}")
    module.load_state_dict(stripped)
    return module


def check_state(state: dict, own: dict, where: str) -> None:
    """Refuse a state dict that does not fit a model: missing or unexpected keys (a few named), or a shape mismatch."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [f"lacks {len(missing)} weights of this model, e.g. {_few(missing)}"] if missing else []
        parts += [f"has {len(unexpected)} weights this model does not, e.g. {_few(unexpected)}"] if unexpected else []
        raise LookalikeError(f"{where} {' and '.join(parts)} (wrong model name?)")
    for key, value in own.items():
        theirs = state[key]
        if not isinstance(theirs, torch.Tensor) or theirs.shape != value.shape:
            got = list(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            raise LookalikeError(
                f"{where}: {key!r} has shape {got}, this model expects {list(value.shape)} (another embedding size or "
                "model?)"
            )


def _few(keys: list[str], n: int = 3) -> str:
    """The first n keys, quoted, and how many more."""
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _dropped_head(module: nn.Module) -> set[str]:
    """Classifier keys of a timm checkpoint that a head-less timm model (num_classes=0) leaves out, as timm itself
    does."""
    if getattr(module, "num_classes", None) != 0:
        return set()
    names = (getattr(module, "pretrained_cfg", None) or {}).get("classifier") or ()
    return {f"{name}.{part}" for name in ([names] if isinstance(names, str) else names) for part in ("weight", "bias")}


def _common_prefix(state: dict, own: dict) -> str | None:
    """The prefix that, removed from checkpoint keys, matches the most of the model's own keys; None when no key
    matches."""
    votes = Counter(
        k[: len(k) - len(o)]
        for k in state
        for o in own
        if k.endswith(o) and (len(k) == len(o) or k[len(k) - len(o) - 1] == ".")
    )
    return votes.most_common(1)[0][0] if votes else None
