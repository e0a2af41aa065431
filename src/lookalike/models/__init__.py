"""Models: the embedding extractor (timm backbone + optional projection + L2 norm)."""

from lookalike.models.extractor import Extractor, load_weights

__all__ = ["Extractor", "load_weights"]
