"""The evaluation protocol of a dataset table: which rows query, which form the gallery, what is never a match."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lookalike.core.errors import LookalikeError
from lookalike.core.table import DatasetTable


def query_gallery_ids(table: DatasetTable) -> tuple[np.ndarray, np.ndarray]:
    """Paths of the validation queries and of the validation gallery, in table order."""
    val = table.split("validation").frame
    if len(val) == 0:
        raise LookalikeError(f"{table.source}, column 'split': no validation rows to search")
    return val.loc[val["is_query"], "path"].to_numpy(str), val.loc[val["is_gallery"], "path"].to_numpy(str)


def exclusion_groups(
    table: DatasetTable, query_ids: np.ndarray, gallery_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Integer groups per query and gallery item: a gallery item is never a match for a query of its group.

    The group is the row itself ("a query never retrieves itself") or, when the table has a `sequence`
    column, the sequence (the re-ID "same camera" rule); rows without a sequence are their own group.
    """
    frame = table.frame.set_index("path")
    key = pd.Series(frame.index.to_numpy(str), index=frame.index, dtype=object)
    if "sequence" in frame.columns:
        seq = frame["sequence"]
        key = ("seq:" + seq.astype(str)).where(seq.notna(), "row:" + key)
    codes = pd.Series(pd.factorize(key)[0], index=frame.index)
    return codes.loc[query_ids].to_numpy(np.int64), codes.loc[gallery_ids].to_numpy(np.int64)
