"""The areal part of a shape: the one rule for dropping points and lines (shapely only, no OpenCV or rasterio).

Used wherever a geometry from outside (an annotator's annotation, a request's region, an intersection that
degenerated into a collection) must be an area: ``zeus export`` and ``zeus learn`` (``bridge``), region
requests (``outline``, ``on_demand``, the service) and ``zeus evaluate``.
"""

from __future__ import annotations

import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry


def polygon_parts(geometry: BaseGeometry) -> list[Polygon]:
    """The non-empty Polygons of ``geometry``: itself, a MultiPolygon's parts, those inside (nested) collections.

    Points and lines are dropped; nothing is repaired.
    """
    if geometry.is_empty:
        return []
    if isinstance(geometry, Polygon):
        return [geometry]
    return [p for part in getattr(geometry, "geoms", ()) for p in polygon_parts(part)]


def polygonal(geometry: BaseGeometry) -> BaseGeometry | None:
    """The valid polygonal part of ``geometry`` (repaired with ``make_valid`` first; points and lines dropped):
    a Polygon or a MultiPolygon, or ``None`` when there is none."""
    geom = geometry if geometry.is_valid else shapely.make_valid(geometry)
    polys = polygon_parts(geom)
    if not polys:
        return None
    out = polys[0] if len(polys) == 1 else MultiPolygon(polys)
    return out if out.is_valid else shapely.make_valid(out)


def polygonal_or_empty(geometry: BaseGeometry) -> BaseGeometry:
    """:func:`polygonal`, with an empty Polygon where it gives ``None`` (for clipping regions)."""
    geom = polygonal(geometry)
    return Polygon() if geom is None else geom
