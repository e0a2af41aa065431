"""Stanford Online Products: Ebay_train.txt / Ebay_test.txt; every test image a query; category = super-class."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lookalike.data.convert.base import Conversion, find_file, finish, parse_numbers, read_columns

COLUMNS = ("image_id", "class_id", "super_class_id", "path")


def _read_split(root: Path, name: str) -> pd.DataFrame:
    """One Ebay_*.txt as rows: label = class_id, category = the super-class folder without '_final'."""
    path = find_file(root, (name,), name)
    frame = read_columns(path, COLUMNS, header=COLUMNS)
    parse_numbers(frame, ("image_id", "class_id", "super_class_id"), path)
    return pd.DataFrame(
        {
            "label": frame["class_id"],
            "path": frame["path"],
            "category": frame["path"].str.split("/").str[0].str.removesuffix("_final"),
            "line": frame["line"],
        }
    )


def convert_sop(root: Path) -> Conversion:
    """Ebay_train.txt rows train; Ebay_test.txt rows validation, each a query and in the gallery."""
    train, test = _read_split(root, "Ebay_train.txt"), _read_split(root, "Ebay_test.txt")
    train["split"], train["is_query"], train["is_gallery"] = "train", False, False
    test["split"], test["is_query"], test["is_gallery"] = "validation", True, True
    return finish(pd.concat([train, test], ignore_index=True), root, "sop")
