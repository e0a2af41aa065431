"""The evaluation protocol of a dataset table: which rows query, which form the gallery, what is never a match."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lookalike.core.errors import LookalikeError
from lookalike.core.table import DatasetTable


def query_gallery_ids(table: DatasetTable) -> tuple[np.ndarray, np.ndarray]:
    """Paths of the validation queries and of the validation gallery, in table order."""
    val = table.split("validation")
    if len(val) == 0:
        raise LookalikeError(f"{table.source}, column 'split': no validation rows to search")
    return val.paths[val.column("is_query").astype(bool)], val.paths[val.column("is_gallery").astype(bool)]


def exclusion_groups(
    table: DatasetTable, query_ids: np.ndarray, gallery_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Integer groups per query and gallery item: a gallery item is never a match for a query of its group.

    The group is the row itself ("a query never retrieves itself") or, when the table has a `sequence`
    column, the sequence (the re-ID "same camera" rule); rows without a sequence are their own group.
    """
    if table.has_column("sequence"):
        seq = pd.Series(table.column("sequence"), dtype=object)
        codes = pd.factorize(("seq:" + seq.astype(str)).where(seq.notna(), "row:" + pd.Series(table.paths)))[0]
    else:
        codes = np.arange(len(table))
    q_rows, g_rows = table.rows_of(query_ids, "query id"), table.rows_of(gallery_ids, "gallery id")
    return codes[q_rows].astype(np.int64), codes[g_rows].astype(np.int64)


def split_as_protocol(table: DatasetTable, split: str) -> DatasetTable:
    """The rows of one split alone, arranged by the evaluation protocol (every row a query against all the others)
    and labelled "validation", so that search and metrics run on them unchanged; e.g. the training split for tuning
    without ever reading the validation split's rows.

    Args:
        table: the dataset table.
        split: "train" or "validation".

    Returns:
        A table of that split's rows only, each a query and a gallery item, split "validation".
    """
    rows = table.split(split)
    if len(rows) == 0:
        raise LookalikeError(f"{table.source}, column 'split': no {split} rows to arrange as queries and gallery")
    frame = rows.frame.assign(split="validation", is_query=True, is_gallery=True)
    return type(rows)(frame, rows.root, f"{table.source} ({split} split)")
