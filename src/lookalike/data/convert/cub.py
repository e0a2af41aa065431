"""CUB-200-2011: images.txt + image_class_labels.txt (+ bounding_boxes.txt); classes 1-100 train, 101-200 validation."""

from __future__ import annotations

from pathlib import Path

from lookalike.data.convert.base import (
    Conversion,
    find_file,
    find_optional,
    finish,
    join_on,
    parse_numbers,
    read_columns,
    split_by_class,
)

LAST_TRAIN_CLASS = 100


def convert_cub(root: Path) -> Conversion:
    """One row per image of images.txt (paths under images/), label = class id, bbox from (x, y, width, height)."""
    images_path = find_file(root, ("images.txt", "CUB_200_2011/images.txt"), "images.txt")
    base = images_path.parent
    images = read_columns(images_path, ("image_id", "path"))
    labels_path = find_file(base, ("image_class_labels.txt",), "image_class_labels.txt")
    labels = read_columns(labels_path, ("image_id", "class_id"))
    parse_numbers(labels, ("class_id",), labels_path)
    frame = join_on(images, labels, "image_id", images_path, labels_path)
    notes = []
    boxes_path = find_optional(base, ("bounding_boxes.txt",))
    if boxes_path is None:
        notes.append("no bounding_boxes.txt: images are not cropped")
    else:
        boxes = read_columns(boxes_path, ("image_id", "x", "y", "width", "height"))
        parse_numbers(boxes, ("x", "y", "width", "height"), boxes_path, kind=float)
        frame = join_on(frame, boxes, "image_id", images_path, boxes_path)
        frame = frame.assign(
            x_1=frame["x"], y_1=frame["y"], x_2=frame["x"] + frame["width"], y_2=frame["y"] + frame["height"]
        )
    frame = frame.assign(
        label=frame["class_id"], path="images/" + frame["path"], **split_by_class(frame["class_id"], LAST_TRAIN_CLASS)
    )
    keep = ["label", "path", "split", "is_query", "is_gallery", *(["x_1", "y_1", "x_2", "y_2"] if boxes_path else [])]
    return finish(frame[keep], base, "cub", notes)
