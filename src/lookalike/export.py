"""ONNX export of an extractor or a pairwise re-ranker model, with its preprocessing in a JSON sidecar.

The .onnx file takes float32 NCHW images with a dynamic batch axis: an extractor gives the embeddings exactly as
`Extractor.embed` computes them (normalised when the model normalises), a pairwise model the distances of image pairs
(`PairwiseModel.distance`: two images stacked along the height, sigmoid of the logit). `<name>.preprocessing.json`
beside it records how images become that input (size, crop, resize, mean, std, channel order), so
`lookalike.onnx_runtime.OnnxExtractor` embeds with onnxruntime and no training stack.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lookalike import __version__
from lookalike.core.atomic import atomic_path, write_text_atomic
from lookalike.core.errors import LookalikeError
from lookalike.models.extractor import Extractor
from lookalike.models.pairwise import PairwiseModel, load_pairwise
from lookalike.onnx_runtime import INPUT_NAME, OUTPUT_NAME, SIDECAR_FORMAT, sidecar_path

if TYPE_CHECKING:
    from lookalike.config import Config

OPSET = 18  # the newest opset torch.onnx's exporter writes natively (onnxruntime 1.17+ runs it)
PAIR_INPUTS, PAIR_OUTPUT = ("first", "second"), "distances"
RESIZE = "bilinear, antialiased, on 8-bit RGB (torchvision v2.Resize of a uint8 image)"


class _PairDistance(nn.Module):
    """A pairwise model's distance (what the re-ranker ranks by) as the exported forward."""

    def __init__(self, model: PairwiseModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self.model.distance(first, second)


def export_onnx(model: Extractor | PairwiseModel, path: str | os.PathLike, opset: int = OPSET) -> tuple[Path, Path]:
    """Write `model` as ONNX (dynamic batch, checked by onnx.checker) and its preprocessing sidecar, both atomically.

    Args:
        model: an Extractor (images -> embeddings) or a PairwiseModel (first, second -> distances).
        path: the .onnx file to write; the sidecar goes beside it as `<stem>.preprocessing.json`.
        opset: the ONNX opset.

    Returns:
        The paths of the .onnx file and of the sidecar.

    Example:
        >>> import lookalike
        >>> from lookalike.export import export_onnx
        >>> export_onnx(lookalike.Extractor("resnet18", image_size=32), "runs/export/model.onnx")  # doctest: +SKIP
        (PosixPath('runs/export/model.onnx'), PosixPath('runs/export/model.preprocessing.json'))
    """
    _require_onnx()
    path = Path(path)
    if isinstance(model, Extractor):
        module, names, output, settings = model, (INPUT_NAME,), OUTPUT_NAME, extractor_settings(model)
    elif isinstance(model, PairwiseModel):
        module, names, output, settings = _PairDistance(model), PAIR_INPUTS, PAIR_OUTPUT, pairwise_settings(model)
    else:
        raise LookalikeError(f"export: expected an Extractor or a PairwiseModel, got {type(model).__name__}")
    height, width = settings["input_size"]
    examples = tuple(torch.zeros(2, 3, height, width) for _ in names)
    with atomic_path(path, suffix=".onnx") as tmp:
        _export(module.eval(), examples, tmp, names, output, opset)
    sidecar = sidecar_path(path)
    write_text_atomic(sidecar, json.dumps(settings, indent=2) + "\n")
    return path, sidecar


def _require_onnx() -> Any:
    """The onnx module, once onnxscript (torch.onnx's exporter) imports too; else one line naming the extra."""
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise LookalikeError(f"export: ONNX export needs {exc.name}: pip install 'lookalike[onnx]'") from None
    return onnx


def _export(module: nn.Module, examples: tuple, target: Path, names: tuple, output: str, opset: int) -> None:
    """torch.onnx's exporter into one file (weights inside), the batch axis dynamic; then onnx.checker on the file."""
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes about its own internals
        torch.onnx.export(
            module,
            examples,
            target,
            input_names=list(names),
            output_names=[output],
            dynamic_shapes=tuple({0: batch} for _ in names),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    onnx = _require_onnx()
    onnx.checker.check_model(str(target), full_check=True)
    fixed = [i.name for i in onnx.load(str(target), load_external_data=False).graph.input if not _dynamic_batch(i)]
    if fixed:
        raise LookalikeError(
            f"export: the batch axis of input {fixed[0]!r} came out fixed (the model's code makes the batch size a "
            "constant)"
        )


def _dynamic_batch(value: Any) -> bool:
    """Whether a graph input's first axis is symbolic (any batch size)."""
    dims = value.type.tensor_type.shape.dim
    return bool(dims) and bool(dims[0].dim_param) and not dims[0].dim_value


def extractor_settings(extractor: Extractor) -> dict:
    """The sidecar of an exported extractor: its input, preprocessing and output (`OnnxExtractor` reads it)."""
    dc = extractor.data_config()
    size = extractor.image_size
    return {
        "format": SIDECAR_FORMAT,
        "kind": "extractor",
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "input_size": _sides(size),
        **_preprocessing(size, extractor.crop_fraction, dc["mean"], dc["std"]),
        "embedding_dim": extractor.dim,
        "normalize": extractor.normalize,
        "model": extractor.settings(),
        "lookalike_version": __version__,
    }


def pairwise_settings(model: PairwiseModel) -> dict:
    """The sidecar of an exported pairwise model: each image's preprocessing, and the pair's inputs and output."""
    from dataclasses import asdict

    dc = model.data_config()
    spec = model.spec
    return {
        "format": SIDECAR_FORMAT,
        "kind": "pairwise",
        "inputs": list(PAIR_INPUTS),
        "output": PAIR_OUTPUT,
        "output_meaning": "distance in [0, 1] of each pair (sigmoid of the logit; 0 = the same item)",
        "input_size": _sides(spec.image_size),
        **_preprocessing(spec.image_size, spec.crop_fraction, dc["mean"], dc["std"]),
        "model": asdict(spec),
        "lookalike_version": __version__,
    }


def _sides(size: int | list[int]) -> list[int]:
    """[height, width] of a square side or a [height, width] pair."""
    return [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]


def _preprocessing(size: int | list[int], crop_fraction: float, mean: tuple, std: tuple) -> dict:
    """How an image becomes one model input (lookalike.data.images.eval_transform, spelt out)."""
    square = isinstance(size, int)
    return {
        "image_size": size,
        "crop_fraction": crop_fraction,
        "resize": "shorter side to round(image_size / crop_fraction), then centre crop" if square else "exactly",
        "interpolation": RESIZE,
        "scale": "pixel / 255",
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "channel_order": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
    }


def export_weights(
    weights: str | os.PathLike, output: str | os.PathLike, kind: str = "extractor", cfg: Config | None = None
) -> tuple[Path, Path]:
    """Load a checkpoint and export it (`lookalike export`): an extractor built from `cfg` (model.weights = weights), or
    a pairwise model from its own checkpoint.

    Args:
        weights: the checkpoint file.
        output: the .onnx file to write.
        kind: "extractor" or "pairwise".
        cfg: the extractor's config (model.*, data.image_size, data.crop_fraction); unused for a pairwise model.

    Returns:
        The paths of the .onnx file and of its preprocessing sidecar.
    """
    if kind == "pairwise":
        model = load_pairwise(weights)
    elif kind == "extractor":
        if cfg is None:
            raise LookalikeError("export: an extractor needs its config (model.name, data.image_size, ...)")
        cfg.model.weights = os.fspath(weights)
        model = Extractor.from_config(cfg)
    else:
        raise LookalikeError(f"--kind: expected extractor or pairwise, got {kind!r}")
    return export_onnx(model, output)
