"""lookalike: train embeddings, search a gallery, re-rank the top results, measure the ranking.

The nouns and verbs of the library, importable from here (loaded on first use: `import lookalike` does not import
torch):

    import lookalike
    extractor = lookalike.Extractor("resnet18", image_size=32)
    index = lookalike.GalleryIndex.build("data/omniglot/images_background_small1/Latin", extractor, "runs/latin")
    print(index.query("data/omniglot/images_background_small1/Greek/character01/0394_01.png", k=5))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (where it lives today; the top level only re-exports)
_EXPORTS = {
    "DatasetTable": "lookalike.core.table",
    "load_table": "lookalike.core.table",
    "import_folder": "lookalike.data.folder",
    "Embeddings": "lookalike.core.embeddings",
    "RetrievalResults": "lookalike.core.results",
    "search": "lookalike.search",  # the subpackage, callable as its search function
    "search_table": "lookalike.search",
    "MetricsReport": "lookalike.metrics",
    "compute_metrics": "lookalike.metrics",
    "evaluate_table": "lookalike.metrics",
    "RerankContext": "lookalike.rerank",
    "Reranker": "lookalike.rerank",
    "create_reranker": "lookalike.rerank",
    "list_rerankers": "lookalike.rerank",
    "Extractor": "lookalike.models.extractor",
    "embed": "lookalike.extract",
    "GalleryIndex": "lookalike.serve.index",
    "Config": "lookalike.config",
    "load_config": "lookalike.config",
    "LookalikeError": "lookalike.core.errors",
}

__all__ = [
    "Config", "DatasetTable", "Embeddings", "Extractor", "GalleryIndex", "LookalikeError", "MetricsReport",
    "RerankContext", "Reranker", "RetrievalResults", "__version__", "compute_metrics", "create_reranker", "embed",
    "evaluate_table", "import_folder", "list_rerankers", "load_config", "load_table", "search", "search_table",
]  # fmt: skip

if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load on first use (__getattr__)
    from lookalike import search
    from lookalike.config import Config, load_config
    from lookalike.core.embeddings import Embeddings
    from lookalike.core.errors import LookalikeError
    from lookalike.core.results import RetrievalResults
    from lookalike.core.table import DatasetTable, load_table
    from lookalike.data.folder import import_folder
    from lookalike.extract import embed
    from lookalike.metrics import MetricsReport, compute_metrics, evaluate_table
    from lookalike.models.extractor import Extractor
    from lookalike.rerank import RerankContext, Reranker, create_reranker, list_rerankers
    from lookalike.search import search_table
    from lookalike.serve.index import GalleryIndex


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use, so that `import lookalike` stays light (no torch until needed)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lookalike' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name == "search" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
