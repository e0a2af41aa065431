"""Training of extractors with Lightning: module, data module, trainer."""

from lookalike.train.run import (
    RepeatedTrainResult,
    TrainResult,
    build_parts,
    build_trainer,
    run_train,
    run_train_repeated,
    run_validate,
)

__all__ = [
    "RepeatedTrainResult",
    "TrainResult",
    "build_parts",
    "build_trainer",
    "run_train",
    "run_train_repeated",
    "run_validate",
]
