"""The web app: `lookalike index` writes a served gallery, `lookalike serve` answers searches over it in the browser."""

from lookalike.serve.index import Column, GalleryIndex, IndexBusy, build_index, load_index
from lookalike.serve.uploads import UploadRejected, decode_upload

__all__ = ["Column", "GalleryIndex", "IndexBusy", "UploadRejected", "build_index", "decode_upload", "load_index"]
