"""The model spec a checkpoint keeps beside its weights, so that the file alone rebuilds the model.

One key per kind of model (plain types only, so the file loads with weights_only=True): the extractor's
(lookalike.models.extractor.Extractor.spec) and the STIR pairwise model's (lookalike.models.pairwise.PairwiseSpec).
"""

from __future__ import annotations

from typing import Any

SPEC_KEYS = {"extractor": "extractor_model", "pairwise": "pairwise_model"}


def store_spec(checkpoint: dict, kind: str, spec: dict[str, Any]) -> dict:
    """Put a model's spec into a checkpoint dict (a Lightning checkpoint in on_save_checkpoint, or a state-dict file).

    Args:
        checkpoint: the dict that will be saved; changed in place.
        kind: "extractor" or "pairwise".
        spec: the model's constructor settings, plain types only.

    Returns:
        The same checkpoint dict.
    """
    checkpoint[SPEC_KEYS[kind]] = dict(spec)
    return checkpoint


def stored_spec(checkpoint: object, kind: str) -> dict[str, Any] | None:
    """The spec of `kind` a loaded checkpoint keeps, or None for a file without one (older files, foreign files).

    Args:
        checkpoint: what read_checkpoint returned.
        kind: "extractor" or "pairwise".

    Returns:
        A copy of the stored spec, or None.
    """
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(SPEC_KEYS[kind]), dict):
        return None
    return dict(checkpoint[SPEC_KEYS[kind]])
