"""Models: the embedding extractor (timm backbone + optional projection + L2 norm); resnet50_ibn_a registered with
timm."""

from lookalike.models import ibn  # noqa: F401 - registers resnet50_ibn_a with timm
from lookalike.models.extractor import Extractor, load_weights

__all__ = ["Extractor", "load_weights"]
