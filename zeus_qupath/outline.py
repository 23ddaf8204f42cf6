"""Features -> scores -> polygons, for a whole slide or for a region of it: the one step both ``zeus segment``
and ``zeus serve`` run after embedding.

A region (a level-0 polygon, e.g. an annotation selected in QuPath) selects the grid patches whose area
meets it, and its mask is computed on a window around it: the region's bounds grown by one patch, so
that every pixel of the region sees exactly the patches (and the blur) it sees on the whole slide, while
the cost follows the region's size, not the slide's. The polygons are clipped to the tissue and to the
region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from .annotations import build_annotations
from .geometry import polygonal_or_empty
from .grid import PatchGeometry, PatchGrid
from .outputs import PatchScores
from .params import Threshold
from .polygons import PolygonParams, mask_polygons
from .prompts import PromptSet
from .qupath_geojson import feature_collection
from .reconstruct import zeus_mask
from .scoring import slide_scores

if TYPE_CHECKING:
    from .models.base import Encoder  # for annotations only: importing it imports torch
    from .params import SegmentParams


def patches_in_region(grid: PatchGrid, region: BaseGeometry | None) -> np.ndarray:
    """Grid positions of the patches whose area meets ``region`` (interiors overlap); all without a region."""
    n = len(grid)
    if region is None or n == 0:
        return np.arange(n, dtype=np.int64)
    coords = grid.coords
    p = grid.geometry.patch_size_l0
    minx, miny, maxx, maxy = region.bounds
    near = np.flatnonzero((coords[:, 0] + p > minx) & (coords[:, 0] < maxx) &
                          (coords[:, 1] + p > miny) & (coords[:, 1] < maxy))
    if len(near) == 0:
        return near.astype(np.int64)
    x, y = coords[near, 0], coords[near, 1]
    boxes = shapely.box(x, y, x + p, y + p)
    shapely.prepare(region)
    meets = shapely.intersects(region, boxes) & ~shapely.touches(region, boxes)
    return near[meets].astype(np.int64)


def polygon_params(params: SegmentParams, mpp: float | None) -> PolygonParams:
    """The polygon options of ``params`` in px (areas are given in um^2; in px^2 when the pixel size is unknown)."""
    area_unit = mpp**2 if mpp else 1.0
    return PolygonParams(min_area=params.min_area_um2 / area_unit, min_hole_area=params.min_hole_area_um2 / area_unit,
                         tolerance=params.tolerance_px)


def outline_polygons(scores: PatchScores, threshold: Threshold, params: SegmentParams,
                     clip: BaseGeometry | None = None, region: BaseGeometry | None = None) -> list[Polygon]:
    """Polygons of the positive class (level-0 px), clipped to ``clip`` and, with a region, computed around it."""
    poly_params = polygon_params(params, scores.mpp)
    if region is None:
        return mask_polygons(zeus_mask(scores, threshold=threshold), poly_params, clip=clip)
    clip = region if clip is None else polygonal_or_empty(clip.intersection(region))
    if clip.is_empty or len(scores.coords) == 0:
        return []
    p, s = scores.patch_size, scores.stride
    minx, miny, maxx, maxy = region.bounds
    ox = max(0, math.floor((minx - p) / s) * s)
    oy = max(0, math.floor((miny - p) / s) * s)
    ex = min(scores.width, math.ceil(maxx + p))
    ey = min(scores.height, math.ceil(maxy + p))
    window = replace(scores, coords=scores.coords - np.array([ox, oy], dtype=np.int64), width=ex - ox, height=ey - oy)
    polys = mask_polygons(zeus_mask(window, threshold=threshold), poly_params, clip=affinity.translate(clip, -ox, -oy))
    return [affinity.translate(poly, ox, oy) for poly in polys]


@dataclass(frozen=True)
class SlideOutline:
    """A slide's (or a region's) patch scores and the polygons drawn from them."""

    scores: PatchScores
    polygons: list[Polygon]

    def feature_collection(self) -> dict[str, Any]:
        """The QuPath GeoJSON FeatureCollection of the polygons (one annotation each)."""
        return feature_collection(build_annotations(self.polygons, self.scores))


def outline_patches(
    coords: np.ndarray,
    features: Sequence[np.ndarray],
    encoders: Sequence[Encoder],
    prompts: PromptSet,
    prototypes: Sequence[np.ndarray],
    *,
    geometry: PatchGeometry,
    width: int,
    height: int,
    mpp: float | None,
    params: SegmentParams,
    threshold: Threshold,
    clip: BaseGeometry | None,
    region: BaseGeometry | None = None,
    meta: dict[str, Any] | None = None,
    score_options: dict[str, Any] | None = None,
) -> SlideOutline:
    """Score patches at ``coords`` (one feature array per encoder) against the prompts and outline the positive class.

    ``score_options`` go to :func:`~zeus_qupath.scoring.slide_scores`; ``meta`` is recorded in the scores.
    """
    values, score_meta = slide_scores(list(features), list(encoders), prompts, prototypes=list(prototypes),
                                      **(score_options or {}))
    scores = PatchScores(
        coords=np.asarray(coords, dtype=np.int64).reshape(-1, 2),
        scores=values,
        classes=tuple(prompts.class_names),
        positive_class=prompts.positive_class,
        patch_size=geometry.patch_size_l0,
        stride=geometry.stride_l0,
        width=width,
        height=height,
        mpp=mpp,
        meta={**score_meta, "logit_scale": float(np.mean([e.logit_scale for e in encoders])), **(meta or {})},
    )
    polygons = outline_polygons(scores, threshold, params, clip=clip, region=region) if len(scores.coords) else []
    return SlideOutline(scores, polygons)
