"""Dataset tables, folder importers and image loading."""

from lookalike.data.folder import import_folder
from lookalike.data.table import DatasetTable, load_table, validate_table

__all__ = ["DatasetTable", "import_folder", "load_table", "validate_table"]
