"""Training of extractors with Lightning: module, data module, trainer."""

from lookalike.train.run import TrainResult, build_parts, build_trainer, run_train, run_validate

__all__ = ["TrainResult", "build_parts", "build_trainer", "run_train", "run_validate"]
