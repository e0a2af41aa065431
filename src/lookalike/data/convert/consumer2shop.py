"""Street2Shop and DeepFashion(2) consumer-to-shop from COCO-style JSON: user photos query the shop gallery."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from lookalike.core.errors import LookalikeError
from lookalike.data.convert.base import Conversion, find_optional, finish
from lookalike.data.decode import display_path

# annotation file stem -> (split, default source); validation.json / train.json need a `source` per image or annotation
FILES = {
    "train": ("train", None),
    "validation": ("validation", None),
    "query": ("validation", "user"),
    "gallery": ("validation", "shop"),
}
SOURCES = ("user", "shop")


def _records(data: object, key: str, fields: tuple[str, ...], path: Path) -> pd.DataFrame:
    """The list `data[key]` of JSON objects as a frame; a missing list, non-object entry or missing field is named."""
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise LookalikeError(f"{display_path(path)}: expected a COCO-style object with a list {key!r}")
    for i, item in enumerate(items):
        absent = [f for f in fields if not isinstance(item, dict) or item.get(f) is None]
        if absent:
            raise LookalikeError(f"{display_path(path)}: {key}[{i}]: expected an object with the field {absent[0]!r}")
    return pd.DataFrame(items, columns=None if items else list(fields))


def _boxes(annotations: pd.DataFrame, path: Path) -> np.ndarray:
    """COCO boxes [x, y, width, height] as an [N, 4] float array; anything else is named by its index."""
    boxes = np.full((len(annotations), 4), np.nan)
    for i, box in enumerate(annotations["bbox"]):
        try:
            boxes[i] = np.asarray(box, dtype=float).reshape(4)
        except (TypeError, ValueError):
            raise LookalikeError(
                f"{display_path(path)}: annotations[{i}].bbox: expected [x, y, width, height], got {box!r}"
            ) from None
    return boxes


def _load(path: Path) -> object:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise LookalikeError(f"{display_path(path)}: not a readable JSON file ({exc})") from None


def _one_file(root: Path, path: Path, split: str, default_source: str | None) -> tuple[pd.DataFrame, int]:
    """One row per image of one annotation file (its largest retrievable item); also the number of images dropped."""
    data = _load(path)
    images = _records(data, "images", ("id", "file_name"), path)
    ann = _records(data, "annotations", ("image_id", "pair_id", "bbox"), path)
    box = _boxes(ann, path)
    ann = ann.assign(
        x_1=box[:, 0], y_1=box[:, 1], x_2=box[:, 0] + box[:, 2], y_2=box[:, 1] + box[:, 3], area=box[:, 2] * box[:, 3]
    )
    if "style" in ann.columns:  # DeepFashion2: style 0 marks an item without a shop/user counterpart
        ann = ann[ann["style"].fillna(0).astype(int) > 0]
        ann = ann.assign(label=ann["pair_id"].astype(str) + "_" + ann["style"].astype(int).astype(str))
    else:
        ann = ann.assign(label=ann["pair_id"].astype(str))
    best = ann.sort_values("area", ascending=False, kind="stable").drop_duplicates("image_id")
    rows = images.merge(best, left_on="id", right_on="image_id", how="inner", suffixes=("_image", ""))
    source = _source(rows, default_source, path)
    folder = _image_folder(root, path.stem)
    frame = pd.DataFrame(
        {
            "label": rows["label"],
            "path": [(folder / str(f)).relative_to(root).as_posix() for f in rows["file_name"]],
            "split": split,
            "is_query": (source == "user") & (split == "validation"),
            "is_gallery": (source == "shop") & (split == "validation"),
            "domain": source,
            **{c: rows[c] for c in ("x_1", "y_1", "x_2", "y_2")},
        }
    )
    return frame, len(images) - len(rows)


def _source(rows: pd.DataFrame, default: str | None, path: Path) -> np.ndarray:
    """'user' or 'shop' per row: the `source` of the image or annotation, or the file's default (query/gallery
    files)."""
    source = pd.Series(default, index=rows.index, dtype=object)
    for col in ("source_image", "source"):  # the annotation's source wins over the image's
        if col in rows.columns:
            source = rows[col].where(rows[col].notna(), source)
    bad = ~source.isin(SOURCES).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LookalikeError(
            f"{display_path(path)}: image {rows['file_name'].iloc[i]!r}: expected a source 'user' or 'shop' (on the "
            f"image or its annotation), got {source.iloc[i]!r}"
        )
    return source.to_numpy(str)


def _image_folder(root: Path, stem: str) -> Path:
    """Where an annotation file's images are: ROOT/<stem>/image (DeepFashion2), ROOT/<stem>, or ROOT."""
    return next((f for f in (root / stem / "image", root / stem) if f.is_dir()), root)


def convert_consumer2shop(root: Path, name: str = "consumer2shop") -> Conversion:
    """train.json (train), validation.json (user = queries, shop = gallery), or query.json + gallery.json, in ROOT or
    ROOT/annotations."""
    found = {stem: find_optional(root, (f"{stem}.json", f"annotations/{stem}.json")) for stem in FILES}
    if not any(found.values()):
        raise LookalikeError(
            f"{display_path(root)}: no annotation file found (looked for {', '.join(f'{s}.json' for s in FILES)}, also "
            "under annotations/)"
        )
    parts, dropped = [], 0
    for stem, path in found.items():
        if path is not None:
            frame, n = _one_file(root, path, *FILES[stem])
            parts.append(frame)
            dropped += n
    notes = [f"dropped {dropped} images without a retrievable item (no annotation, or style 0)"] if dropped else []
    return finish(pd.concat(parts, ignore_index=True), root, name, notes)


def convert_street2shop(root: Path) -> Conversion:
    """Exact Street2Shop in COCO form: pair_id = product id."""
    return convert_consumer2shop(root, "street2shop")


def convert_deepfashion2(root: Path) -> Conversion:
    """DeepFashion2 consumer-to-shop in COCO form: label = pair_id and style."""
    return convert_consumer2shop(root, "deepfashion2")
