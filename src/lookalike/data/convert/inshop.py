"""DeepFashion In-shop: list_eval_partition.txt (train / query / gallery as published), list_bbox_inshop.txt boxes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lookalike.core.table import BBOX_COLUMNS
from lookalike.data.convert.base import (
    Conversion,
    check_values,
    find_file,
    find_optional,
    finish,
    join_on,
    parse_numbers,
    read_columns,
)

PARTITION = ("image_name", "item_id", "evaluation_status")
BBOXES = ("image_name", "clothes_type", "pose_type", *BBOX_COLUMNS)


def _boxes(root: Path, partition: pd.DataFrame, partition_path: Path) -> tuple[pd.DataFrame, list[str]]:
    """The partition with x_1, y_1, x_2, y_2 from list_bbox_inshop.txt, when that file is there."""
    path = find_optional(root, ("list_bbox_inshop.txt", "Anno/list_bbox_inshop.txt"))
    if path is None:
        return partition, ["no list_bbox_inshop.txt: images are not cropped"]
    boxes = read_columns(path, BBOXES, header=BBOXES, counted=True)
    parse_numbers(boxes, BBOX_COLUMNS, path, kind=float)
    return join_on(partition, boxes[["image_name", *BBOX_COLUMNS, "line"]], "image_name", partition_path, path), []


def convert_inshop(root: Path) -> Conversion:
    """Label = item_id; train rows train, query rows queries, gallery rows gallery; category = e.g. WOMEN/Dresses."""
    image_root = root / "Img" if (root / "Img").is_dir() else root
    path = find_file(root, ("list_eval_partition.txt", "Eval/list_eval_partition.txt"), "list_eval_partition.txt")
    partition = read_columns(path, PARTITION, header=PARTITION, counted=True)
    check_values(partition, "evaluation_status", ("train", "query", "gallery"), path)
    frame, notes = _boxes(root, partition, path)
    status = frame["evaluation_status"]
    frame = frame.assign(
        label=frame["item_id"],
        path=frame["image_name"],
        split=status.map({"train": "train"}).fillna("validation"),
        is_query=status == "query",
        is_gallery=status == "gallery",
        category=frame["image_name"].str.split("/").str[1:3].str.join("/"),
    )
    return finish(frame.drop(columns=["image_name", "item_id", "evaluation_status"]), image_root, "inshop", notes)
