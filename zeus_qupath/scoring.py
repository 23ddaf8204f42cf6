"""Scores: raw cosine similarity of each patch with each class prototype (no softmax, no temperature)."""

from __future__ import annotations

import numpy as np


def cosine_scores(features: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """(N, C) float32 cosine similarities of unit patch features (N, D) and unit prototypes (C, D)."""
    if features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"feature dim {features.shape[1]} != prototype dim {prototypes.shape[1]}")
    return (features.astype(np.float32) @ prototypes.astype(np.float32).T).astype(np.float32)
