"""Masks to polygons in level-0 pixel coordinates (rasterio for tracing, shapely for geometry).

Outlines follow pixel edges (mask pixel (r, c) is the square [c*ps, (c+1)*ps) x [r*ps, (r+1)*ps)),
holes are kept, everything is made valid, small regions and holes are dropped, and outlines are
simplified within ``tolerance`` level-0 px (shapely's Douglas-Peucker keeps every point of the result
within the tolerance of the original outline).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from shapely.geometry import Polygon, box, shape
from shapely.geometry.base import BaseGeometry

from .geometry import polygon_parts
from .reconstruct import Mask
from .tissue import TissueMask

DEFAULT_TOLERANCE_PX = 2.0  # removes the pixel staircase; ZEUS outlines are smooth on a ~100 px scale


@dataclass(frozen=True)
class PolygonParams:
    min_area: float = 0.0  # level-0 px^2 (the CLI converts um^2)
    min_hole_area: float = 0.0  # level-0 px^2
    tolerance: float | None = None  # level-0 px; None: DEFAULT_TOLERANCE_PX or half a mask pixel if larger


def raster_polygons(mask: np.ndarray, pixel_size: float, origin: tuple[float, float] = (0.0, 0.0)) -> list[Polygon]:
    """Polygons (with holes) of the True pixels of ``mask``, in the coordinates of ``pixel_size``/``origin``."""
    if not mask.any():
        return []
    transform = Affine(pixel_size, 0, origin[0], 0, pixel_size, origin[1])
    mask = np.ascontiguousarray(mask, dtype=bool)
    # the bool mask seen as 0/1 bytes (no copy) is both the values and the mask: no slide-sized temporaries
    return [shape(geom) for geom, value in rasterio.features.shapes(mask.view(np.uint8), mask=mask,
                                                                     transform=transform) if value == 1]


def clean_polygon(poly: Polygon, min_hole_area: float) -> Polygon:
    """Drop holes smaller than ``min_hole_area``."""
    holes = [h for h in poly.interiors if Polygon(h).area >= min_hole_area]
    return Polygon(poly.exterior, holes) if len(holes) != len(poly.interiors) else poly


def tissue_geometry(tissue: TissueMask) -> BaseGeometry:
    """The tissue mask as one (multi)polygon in level-0 px."""
    return shapely.union_all(raster_polygons(tissue.mask, tissue.downsample))


def mask_polygons(mask: Mask, params: PolygonParams = PolygonParams(),
                  clip: BaseGeometry | None = None) -> list[Polygon]:
    """Valid polygons of ``mask`` in level-0 px, clipped to the image (and ``clip``), filtered and simplified."""
    tolerance = max(mask.pixel_size / 2, DEFAULT_TOLERANCE_PX) if params.tolerance is None else params.tolerance
    region = box(0, 0, mask.width, mask.height)
    if clip is not None:
        region = region.intersection(clip)
    out: list[Polygon] = []
    for poly in raster_polygons(mask.mask, mask.pixel_size):
        geom = shapely.make_valid(poly).intersection(region)
        if tolerance > 0:
            geom = geom.simplify(tolerance, preserve_topology=True)
        for part in polygon_parts(shapely.make_valid(geom)):
            part = clean_polygon(part, params.min_hole_area)
            if part.area > 0 and part.area >= params.min_area and part.is_valid:
                out.append(part)
    out.sort(key=lambda p: -p.area)
    return out
