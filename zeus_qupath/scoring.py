"""Scores: raw cosine similarity of each patch with each class prototype (no softmax, no temperature).

With several models (an ensemble, ``--model a,b``) each model scores with its own prototypes and the
per-class scores are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .models.base import Encoder
from .prompts import PromptSet, class_prototypes


def cosine_scores(features: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """(N, C) float32 cosine similarities of unit patch features (N, D) and unit prototypes (C, D)."""
    if features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"feature dim {features.shape[1]} != prototype dim {prototypes.shape[1]}")
    return (features.astype(np.float32) @ prototypes.astype(np.float32).T).astype(np.float32)


def slide_scores(
    features: Sequence[np.ndarray],
    encoders: Sequence[Encoder],
    prompts: PromptSet,
    prototypes: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(N, C) scores of one slide from each model's patch features, averaged over the models.

    ``prototypes`` (one (C, D) array per model) are computed from ``prompts`` when not given.
    Returns the scores and what to record about them in the scores file's meta.
    """
    if len(features) != len(encoders) or not encoders:
        raise ValueError("one feature array per encoder is needed")
    protos = list(prototypes) if prototypes is not None else [class_prototypes(e, prompts) for e in encoders]
    per_model = [cosine_scores(f, p) for f, p in zip(features, protos, strict=True)]
    scores = np.mean(per_model, axis=0).astype(np.float32) if len(per_model) > 1 else per_model[0]
    return scores, {"models": [e.name for e in encoders]}
