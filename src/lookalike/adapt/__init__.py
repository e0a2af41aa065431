"""Visual-similarity adaptation: a small module learnt on frozen multi-backbone features of image pairs
(Risser-Maroix et
al., ICIP 2021), trained with symmetric InfoNCE and measured by top-k pair accuracy."""

from lookalike.adapt.evaluate import DIRECTIONS, topk_accuracy
from lookalike.adapt.features import PairFeatures, extract_pair_features
from lookalike.adapt.pca import PCAProjection, fit_pca
from lookalike.adapt.run import AdaptResult, RunResult, extract_from_config, pairs_from_config, run_adapt
from lookalike.adapt.train import FitResult, TrainSettings, fit_adapter

__all__ = [
    "DIRECTIONS",
    "AdaptResult",
    "FitResult",
    "PCAProjection",
    "PairFeatures",
    "RunResult",
    "TrainSettings",
    "extract_from_config",
    "extract_pair_features",
    "fit_adapter",
    "fit_pca",
    "pairs_from_config",
    "run_adapt",
    "topk_accuracy",
]
