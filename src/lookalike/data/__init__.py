"""Folder importers, pairs tables and image loading (the dataset table itself is lookalike.core.table)."""

from lookalike.data.folder import import_folder
from lookalike.data.pairs import PairsTable, load_pairs

__all__ = ["PairsTable", "import_folder", "load_pairs"]
