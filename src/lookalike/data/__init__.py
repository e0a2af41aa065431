"""Dataset tables, folder importers and image loading."""

from lookalike.data.folder import import_folder
from lookalike.data.pairs import PairsTable, load_pairs
from lookalike.data.table import DatasetTable, load_table, validate_table

__all__ = ["DatasetTable", "PairsTable", "import_folder", "load_pairs", "load_table", "validate_table"]
