"""QuPath GeoJSON: turn shapely geometries into QuPath annotation features (QuPath >= 0.4 layout).

Every feature written by ZEUS carries a marker that the keep-edits rule (``bridge/edits.py`` and
the Groovy import script) relies on: a name starting with ``ZEUS_NAME_PREFIX`` and measurements
with the ROI area (level-0 px^2), vertex count and centroid it had when written. QuPath keeps
custom measurements when an annotator edits an outline, so an edited object no longer matches.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import shapely
from shapely.geometry import MultiPolygon, Polygon, mapping
from shapely.geometry.base import BaseGeometry

from .atomic import atomic_open

ZEUS_NAME_PREFIX = "ZEUS"
MEAS_AREA_PX = "ZEUS area px^2"
MEAS_VERTICES = "ZEUS vertex count"
MEAS_CENTROID_X = "ZEUS centroid x"
MEAS_CENTROID_Y = "ZEUS centroid y"
COORDINATE_PRECISION = 0.01  # QuPath writes GeoJSON with 2 decimals; so do we, so a re-export matches
DEFAULT_COLORS: dict[str, tuple[int, int, int]] = {
    "tumor": (200, 0, 0),
    "normal": (0, 150, 0),
    "stroma": (150, 200, 150),
    "background": (255, 255, 255),
}


def class_color(name: str) -> list[int]:
    """A stable RGB colour for a class name (QuPath fails to import a classification without one)."""
    key = name.lower()
    if key in DEFAULT_COLORS:
        return list(DEFAULT_COLORS[key])
    h = zlib.crc32(key.encode("utf-8"))
    return [64 + h % 160, 64 + (h // 160) % 160, 64 + (h // 25600) % 160]


def qupath_class_name(name: str) -> str:
    """The class name as QuPath users expect it (``tumor`` -> ``Tumor``, matching QuPath's built-in class)."""
    return name[:1].upper() + name[1:]


def vertex_count(geom: BaseGeometry) -> int:
    """Vertex count as JTS ``Geometry.getNumPoints()`` reports it (closing points included)."""
    return int(shapely.get_num_coordinates(geom))


@dataclass(frozen=True)
class Annotation:
    """One region to be written as a QuPath annotation (geometry in level-0 pixels)."""

    geometry: BaseGeometry
    class_name: str
    measurements: Mapping[str, float] = field(default_factory=dict)
    name: str | None = None


def _clean_measurements(values: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        v = float(value)
        if math.isfinite(v):  # QuPath rejects NaN/inf in measurements
            out[str(key)] = v
    return out


def annotation_feature(ann: Annotation, colors: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """One QuPath GeoJSON ``Feature`` for ``ann``, marked as written by ZEUS."""
    geom = ann.geometry
    if not isinstance(geom, (Polygon, MultiPolygon)):
        raise ValueError(f"annotation geometry must be Polygon or MultiPolygon, not {geom.geom_type}")
    color = list(colors[ann.class_name]) if colors and ann.class_name in colors else class_color(ann.class_name)
    geom = shapely.set_precision(geom, COORDINATE_PRECISION)
    measurements = {
        **_clean_measurements(ann.measurements),
        MEAS_AREA_PX: float(geom.area),
        MEAS_VERTICES: float(vertex_count(geom)),
        MEAS_CENTROID_X: float(geom.centroid.x),
        MEAS_CENTROID_Y: float(geom.centroid.y),
    }
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": mapping(geom),
        "properties": {
            "objectType": "annotation",
            "name": ann.name or f"{ZEUS_NAME_PREFIX} {ann.class_name}",
            "classification": {"name": ann.class_name, "color": color},
            "measurements": measurements,
        },
    }


def feature_collection(
    annotations: Iterable[Annotation], colors: Mapping[str, Sequence[int]] | None = None
) -> dict[str, Any]:
    """A QuPath-readable ``FeatureCollection`` of ZEUS annotations."""
    return {"type": "FeatureCollection", "features": [annotation_feature(a, colors) for a in annotations]}


def write_geojson(path: str | os.PathLike[str], collection: Mapping[str, Any]) -> None:
    """Write a FeatureCollection atomically (temp file + rename)."""
    with atomic_open(path, "w") as fh:
        json.dump(collection, fh, allow_nan=False)
