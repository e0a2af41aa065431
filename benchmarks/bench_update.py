"""Updating a served gallery in place vs rebuilding it: `lookalike index add` of 1,000 images to a 100,000-item index.

Run from the repository root with the project's python:

    .venv/bin/python benchmarks/bench_update.py [--g 100000 --add 1000 --rounds 3 --image-size 128]

The index folder is written as `lookalike index` writes one (manifest.json, model.pt of resnet18 without pretrained
weights, gallery.csv, embeddings.npz; exact search) but its G gallery vectors are seeded random unit vectors, so no
image is embedded to make it. The two costs of an update are measured apart:

- the index update: `lookalike.serve.update.add_items` with precomputed embeddings of the new items (read the served
  generation, write the next one's gallery.csv and embeddings.npz, switch manifest.json), then `remove_items` of the
  same items (timed too, it is the same write);
- the embedding: `extract_embeddings` of `--add` real images (the bundled Omniglot drawings, resnet18 at
  `--image-size`, CPU, batch 64) with the folder's model and transform, in images/s.

The peer, a full rebuild, writes the whole folder again (atomic_folder: model.pt, manifest, gallery.csv and
embeddings.npz of G + add items) and embeds all G + add images. Rounds interleave update and rebuild, so a change of
the machine's load hits both; every run is printed, then the medians and the totals: update = index update + add /
images-per-s, rebuild = folder write + (G + add) / images-per-s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lookalike.core.atomic import atomic_folder
from lookalike.core.embeddings import Embeddings
from lookalike.core.table import save_csv
from lookalike.data.bundled import OMNIGLOT_ZIP
from lookalike.data.folder import import_folder
from lookalike.data.images import transforms_for
from lookalike.extract import extract_embeddings
from lookalike.models.extractor import Extractor
from lookalike.serve.index import EMBEDDINGS_FILE, GALLERY_FILE, MODEL_FILE
from lookalike.serve.manifest import IndexManifest, ModelSpec
from lookalike.serve.update import NewItems, add_items, remove_items

SEED = 0


def log(message: str = "") -> None:
    """Print one line at once."""
    print(message, flush=True)


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    """Seeded random unit vectors [n, d] float32."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_folder(target: Path, manifest: IndexManifest, extractor: Extractor, paths: np.ndarray, vectors: np.ndarray):
    """Write an index folder as build_index does (atomically, as a whole), from precomputed vectors."""
    with atomic_folder(target) as folder:
        manifest.write(folder)
        torch.save(extractor.state_dict(), folder / MODEL_FILE)
        labels = np.char.add("label", (np.arange(len(paths)) % 1000).astype(str))
        save_csv(pd.DataFrame({"path": paths, "label": labels}), ("path",), folder, folder / GALLERY_FILE)
        Embeddings(vectors, paths).save(folder / EMBEDDINGS_FILE)


def images_per_second(extractor: Extractor, manifest: IndexManifest, n: int, scratch: Path) -> float:
    """Embed n bundled Omniglot drawings with the folder's model and transform; images per second."""
    with zipfile.ZipFile(OMNIGLOT_ZIP) as zf:
        names = [name for name in zf.namelist() if name.endswith(".png")][:n]
        for name in names:
            (scratch / "omniglot" / name).parent.mkdir(parents=True, exist_ok=True)
            (scratch / "omniglot" / name).write_bytes(zf.read(name))
    table = import_folder(scratch / "omniglot", validation_fraction=0.0)
    transform = transforms_for(manifest.transform, manifest.transform)
    started = time.perf_counter()
    emb = extract_embeddings(extractor.eval(), table, transform, batch_size=64)
    seconds = time.perf_counter() - started
    log(f"embedding: {len(emb)} images in {seconds:.2f} s = {len(emb) / seconds:.1f} images/s")
    return len(emb) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--g", type=int, default=100_000, help="gallery items in the index")
    parser.add_argument("--add", type=int, default=1000, help="items added per update")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(SEED)
    extractor = Extractor("resnet18", pretrained=False, image_size=args.image_size)
    dc = extractor.data_config()
    manifest = IndexManifest(
        model=ModelSpec(name="resnet18"),
        transform={"image_size": args.image_size, "crop_fraction": 0.875, "mean": dc["mean"], "std": dc["std"]},
    )
    d = extractor.dim
    base_paths = np.array([f"/gallery/{i:06d}.jpg" for i in range(args.g)])
    new_paths = np.array([f"/new/{i:06d}.jpg" for i in range(args.add)])
    base, new = unit_vectors(args.g, d, SEED), unit_vectors(args.add, d, SEED + 1)
    all_paths, all_vectors = np.concatenate([base_paths, new_paths]), np.concatenate([base, new])
    log(f"index: G={args.g:,} exact, d={d}, resnet18 model.pt; add {args.add:,}; {args.rounds} rounds; {time.ctime()}")
    with tempfile.TemporaryDirectory(prefix="bench-update-") as scratch:
        scratch = Path(scratch)
        folder = scratch / "index"
        write_folder(folder, manifest, extractor, base_paths, base)
        items = NewItems(new_paths, new_paths, new, np.array(["new"] * args.add))
        timings: dict[str, list[float]] = {"add": [], "remove": [], "rebuild write": []}
        for r in range(args.rounds):
            started = time.perf_counter()
            report = add_items(folder, items)
            timings["add"].append(time.perf_counter() - started)
            assert report.size == args.g + args.add
            started = time.perf_counter()
            remove_items(folder, new_paths.tolist())
            timings["remove"].append(time.perf_counter() - started)
            started = time.perf_counter()
            write_folder(scratch / "rebuilt", manifest, extractor, all_paths, all_vectors)
            timings["rebuild write"].append(time.perf_counter() - started)
            log(
                f"round {r}: add {timings['add'][-1]:.2f} s, remove {timings['remove'][-1]:.2f} s, "
                f"rebuild write {timings['rebuild write'][-1]:.2f} s"
            )
        shutil.rmtree(scratch / "rebuilt")
        ips = images_per_second(extractor, manifest, args.add, scratch)
    median = {name: statistics.median(values) for name, values in timings.items()}
    add, remove, write = median["add"], median["remove"], median["rebuild write"]
    update_total, rebuild_total = add + args.add / ips, write + (args.g + args.add) / ips
    log(f"median: add {add:.2f} s, remove {remove:.2f} s, rebuild write {write:.2f} s")
    log(
        f"total: update {update_total:.1f} s (index {add:.2f} s + embedding {args.add / ips:.1f} s) vs rebuild "
        f"{rebuild_total:.1f} s (write {write:.2f} s + embedding {(args.g + args.add) / ips:.1f} s): "
        f"{rebuild_total / update_total:.0f}x"
    )


if __name__ == "__main__":
    main()
