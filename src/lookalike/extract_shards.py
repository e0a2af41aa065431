"""Sharded, resumable embedding of a dataset table into one Embeddings .npz, on one device or many.

One process (trainer.devices=1, trainer.num_nodes=1, the default) runs a plain batch loop on extract.device. More
(`trainer.devices=2 trainer.strategy=ddp`, `trainer.num_nodes`) run Lightning's predict loop: every rank embeds the
shards it owns (shard s: rank s % world size) and writes them with `ShardWriter`, a Lightning `BasePredictionWriter`;
rank 0 then merges. Either way rows are cut into fixed-size shards (`extract.shard_size`) written as they complete
(lookalike.shards), a rerun of a killed run computes only the shards that are missing, and the merged file holds the
rows in table order. Batches run through `embed_batch` in the layout of trainer.channels_last, as validation does: a
single-process run of a whole table cuts the same batches as validation, so it gives the same float bits.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lookalike.config import Config
from lookalike.core.table import DatasetTable
from lookalike.data.images import ImageDataset
from lookalike.devices import resolve_device
from lookalike.extract import RowSampler, embed_batch, set_layout
from lookalike.models.extractor import Extractor
from lookalike.progress import ImageMeter, Progress
from lookalike.provenance import file_sha256
from lookalike.shards import (
    Manifest,
    ShardSink,
    ids_sha256,
    merge_shards,
    missing_shards,
    prepare_folder,
    read_manifest,
    shard_folder,
)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, by name: the numbers a model computes with (random init included)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def embedding_spec(cfg: Config, extractor: Extractor) -> dict:
    """What fixes the numbers of a shard folder: the table's content, the model and its weights, the transform and
    the memory layout (not paths or times: the same run on another day resumes)."""
    model = {k: v for k, v in cfg.model.model_dump(mode="json").items() if k not in ("weights", "pretrained")}
    d = cfg.data
    return {
        "table_sha256": file_sha256(cfg.data.table),
        "model": model,
        "weights_sha256": weights_digest(extractor),
        "image_size": d.image_size,
        "crop_fraction": d.crop_fraction,
        "channels_last": cfg.trainer.channels_last,
    }


def world_size(cfg: Config) -> int | None:
    """1 when the config asks for one process (trainer.devices=1, num_nodes=1), else None (Lightning decides)."""
    tr = cfg.trainer
    return 1 if str(tr.devices).strip() == "1" and tr.num_nodes == 1 else None


def launch_rank() -> int:
    """This process's global rank as the launcher (Lightning, torchrun, SLURM) set it in the environment; 0 when it
    is the process the user started."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("NODE_RANK", 0)) + int(os.environ.get("LOCAL_RANK", 0))


def embed_to_file(
    cfg: Config,
    extractor: Extractor,
    table: DatasetTable,
    transform: Callable,
    output: str | os.PathLike,
    meta: dict,
    progress: Progress | None = None,
) -> bool:
    """Embed every row of `table` into shards beside `output` (`OUTPUT.shards/`), then merge them into the Embeddings
    .npz `output` (ids: the table's paths; `meta` stored with it).

    Args:
        cfg: extract.shard_size, extract.restart, extract.keep_shards, extract.device (one process) or
            trainer.devices / num_nodes / strategy / accelerator (several), data.batch_size, data.num_workers,
            trainer.channels_last.
        extractor: the model.
        table: the rows to embed, in order.
        transform: the evaluation transform of the images.
        output: the .npz to write.
        meta: Embeddings metadata (model, provenance).
        progress: wraps a loop over images (unit: image); in a multi-process run rank 0 reports its own share.

    Returns:
        True where `output` was written (rank 0); False on the other ranks of a multi-process run.
    """
    ids = table.paths
    folder = shard_folder(output)
    dataset = ImageDataset(table, transform)
    e = cfg.extract
    if launch_rank() == 0:
        spec = embedding_spec(cfg, extractor)
        prepare_folder(folder, Manifest(e.shard_size, len(table), extractor.dim, ids_sha256(ids), spec), e.restart)
    if world_size(cfg) == 1:
        _embed_here(cfg, extractor, dataset, folder, ids, progress)
    elif not _embed_distributed(cfg, extractor, dataset, folder, ids, progress):
        return False
    merge_shards(folder, output, meta)
    if not e.keep_shards:
        shutil.rmtree(folder, ignore_errors=True)
    return True


def _embed_here(
    cfg: Config, extractor: Extractor, dataset: ImageDataset, folder: Path, ids: np.ndarray, progress: Progress | None
) -> None:
    """The missing shards embedded in this process on extract.device, in batches of data.batch_size."""
    manifest = read_manifest(folder)
    sampler = RowSampler(manifest, missing_shards(folder, manifest))
    d = cfg.data
    loader = torch.utils.data.DataLoader(dataset, batch_size=d.batch_size, sampler=sampler, num_workers=d.num_workers)
    device = resolve_device(cfg.extract.device, "extract.device")
    extractor = set_layout(extractor.to(device), cfg.trainer.channels_last).eval()
    sink, meter = ShardSink(folder, manifest, ids), ImageMeter(progress, len(sampler))
    with torch.inference_mode():
        for images, rows in loader:
            sink.add(rows.numpy(), embed_batch(extractor, images.to(device)).cpu().numpy())
            meter.add(len(rows))
    meter.close()


def _embed_distributed(
    cfg: Config, extractor: Extractor, dataset: ImageDataset, folder: Path, ids: np.ndarray, progress: Progress | None
) -> bool:
    """The missing shards embedded by Lightning's predict loop on every rank; True on global rank 0 once every rank
    has written its shards."""
    import lightning as L

    from lookalike.extract_predict import EmbedModule, ShardWriter

    tr = cfg.trainer
    writer = ShardWriter(folder, ids, progress)
    trainer = L.Trainer(
        accelerator=tr.accelerator,
        devices=tr.devices,
        strategy=tr.strategy,
        num_nodes=tr.num_nodes,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # RowSampler hands each rank its own shards
        callbacks=[writer],
        default_root_dir=folder,
    )
    module = EmbedModule(extractor, dataset, folder, cfg.data.batch_size, cfg.data.num_workers, tr.channels_last)
    trainer.predict(module, return_predictions=False)
    trainer.strategy.barrier("shards written")
    return trainer.global_rank == 0
