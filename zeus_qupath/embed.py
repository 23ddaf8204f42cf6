"""Patch embeddings: stream the grid's patches through the image tower in batches."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .grid import PatchGrid
from .models.base import Encoder
from .reader import RegionReader

ProgressFn = Callable[[int], None]


def embed_grid(
    slide_path: str,
    grid: PatchGrid,
    encoder: Encoder,
    *,
    mpp: float | None = None,
    batch_size: int = 64,
    workers: int = 2,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """(N, D) float32 unit embeddings of the grid's patches, in grid order."""
    features = np.zeros((len(grid), encoder.embed_dim), dtype=np.float32)
    if len(grid) == 0:
        return features
    reader = RegionReader(slide_path, grid, mpp=mpp, batch_size=batch_size, workers=workers)
    for batch in reader:
        features[batch.indices] = encoder.encode_images(batch.pixels)
        if progress is not None:
            progress(len(batch.indices))
    return features
