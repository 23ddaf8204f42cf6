"""The ZEUS score heatmap as QuPath tile detections (``<stem>.tiles.geojson``).

One QuPath ``tile`` object per patch with one measurement per class, ``ZEUS score: <Class>`` (the
patch's cosine similarity with that class's prototype, as in the scores file), so that QuPath's
*Measure > Show measurement maps* colours the slide by any class's score, as WSInfer users know it.

The square of a tile is the patch's *stride cell*: ``stride`` x ``stride`` px centred on the patch's
centre. Patches are 448 px every 112 px, so patch-sized squares would overlap 16-fold and a
measurement map would show whichever square QuPath draws last; the stride cells of one lattice tile
the plane without overlap, each coloured by the patch centred on it, which is what a heatmap should
show. Squares are clipped to the slide (a border tile can be a rectangle); a patch whose cell lies
wholly outside the slide gets no tile. (Where two tissue contours' lattices overlap, their cells
may overlap too.)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .errors import ZeusError
from .outputs import PatchScores
from .qupath_geojson import (
    COORDINATE_PRECISION,
    TILE_MEASUREMENT_PREFIX,
    qupath_class_name,
    tile_feature,
    write_geojson,
)


def measurement_name(class_name: str) -> str:
    """The measurement holding a class's score, e.g. ``ZEUS score: Tumor``."""
    return TILE_MEASUREMENT_PREFIX + qupath_class_name(class_name)


def tile_boxes(scores: PatchScores) -> tuple[np.ndarray, np.ndarray]:
    """(M, 4) float64 boxes (x0, y0, x1, y1) of the patches' stride cells, clipped to the slide, and the kept rows."""
    half = scores.stride / 2
    centre = scores.coords.astype(np.float64) + scores.patch_size / 2
    lo = np.clip(centre - half, 0, [scores.width, scores.height])
    hi = np.clip(centre + half, 0, [scores.width, scores.height])
    keep = np.all(hi > lo, axis=1)
    grid = COORDINATE_PRECISION  # QuPath's own GeoJSON precision: a re-export matches
    boxes = np.round(np.concatenate([lo, hi], axis=1)[keep] / grid) * grid
    return boxes, np.flatnonzero(keep)


def tile_collection(scores: PatchScores) -> dict[str, Any]:
    """A QuPath FeatureCollection of ``tile`` objects, one per patch, with the class scores as measurements."""
    names = [measurement_name(c) for c in scores.classes]
    if len(set(names)) != len(names):  # one measurement would silently overwrite another's score
        twice = next(n for n in names if names.count(n) > 1)
        raise ZeusError(f"classes {', '.join(repr(c) for c in scores.classes if measurement_name(c) == twice)} "
                        f"would share the tile measurement {twice!r}: rename one")
    boxes, rows = tile_boxes(scores)
    values = scores.scores[rows].astype(np.float32)
    features = [tile_feature((x0, y0, x1, y1), dict(zip(names, row, strict=True)))
                for (x0, y0, x1, y1), row in zip(boxes.tolist(), values.tolist(), strict=True)]
    return {"type": "FeatureCollection", "features": features}


def write_tiles(path: str | os.PathLike[str], scores: PatchScores) -> int:
    """Write ``scores`` as QuPath tile detections to ``path`` (atomically); returns the number of tiles."""
    collection = tile_collection(scores)
    write_geojson(path, collection)
    return len(collection["features"])
