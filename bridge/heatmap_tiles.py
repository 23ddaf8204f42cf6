"""ZEUS's heatmap tiles on the project side: read a run's ``<stem>.tiles.geojson``, and tell ZEUS's tiles apart.

``zeus segment --tiles`` writes each patch's class scores as QuPath tile detections with ``ZEUS score:
<Class>`` measurements (``zeus_qupath.heatmap``, through ``zeus_qupath.qupath_geojson``). The project writers
keep them as ``data/<entryID>/zeus_tiles.geojson``, which the import script adds to the image (replacing the
image's earlier ZEUS tiles); the paquo backend adds them itself. A tile is ZEUS's when it is a tile object
with at least one ``ZEUS score: `` measurement: the rule the import script applies too. Nothing else in an
image (an annotator's objects, other tools' tiles) is ever taken for ZEUS's heatmap.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from zeus_qupath.errors import ProjectError
from zeus_qupath.qupath_geojson import TILE_MEASUREMENT_PREFIX, read_feature_collection

ZEUS_TILES = "zeus_tiles.geojson"  # data/<entryID>/ZEUS_TILES: read by import_zeus_annotations.groovy


def is_zeus_tile(object_type: str, measurement_names: Iterable[str]) -> bool:
    """Whether an object is one of ZEUS's heatmap tiles (a ``tile`` with a ``ZEUS score: `` measurement)."""
    return object_type == "tile" and any(str(n).startswith(TILE_MEASUREMENT_PREFIX) for n in measurement_names)


def read_zeus_tiles(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The features of a ``<stem>.tiles.geojson`` that ``zeus segment --tiles`` wrote, checked.

    Every feature must be a ZEUS tile (``objectType`` ``tile``, a polygon, finite ``ZEUS score: ``
    measurements), so that nothing else reaches an image as ZEUS's heatmap; otherwise one
    ``ProjectError`` line names the file and the first bad feature. The check is structural, without
    building geometries (a slide has tens of thousands of tiles).
    """
    p = Path(path)
    return check_tiles(read_feature_collection(p, "ZEUS heatmap tiles", ProjectError), str(p))


def check_tiles(features: Iterable[Any], source: str) -> list[dict[str, Any]]:
    """``features`` as a list, each checked to be a ZEUS heatmap tile (one ``ProjectError`` line otherwise)."""
    out = []
    for i, f in enumerate(features):
        why = _tile_problem(f)
        if why:
            raise ProjectError(f"{source}: feature {i} is not a ZEUS heatmap tile ({why})")
        out.append(f)
    return out


def _tile_problem(feature: Any) -> str | None:
    if not isinstance(feature, Mapping) or feature.get("type") != "Feature":
        return "not a GeoJSON Feature"
    geometry = feature.get("geometry")
    if not isinstance(geometry, Mapping) or geometry.get("type") != "Polygon" \
            or not isinstance(geometry.get("coordinates"), list) or not geometry["coordinates"]:
        return "no polygon"
    ring = geometry["coordinates"][0]
    if not isinstance(ring, list) or len(ring) < 4 or not all(
            isinstance(pt, list) and len(pt) >= 2 and all(_finite(c) for c in pt[:2]) for pt in ring):
        return "its outline is not a ring of finite coordinates"
    props = feature.get("properties")
    if not isinstance(props, Mapping) or props.get("objectType") != "tile":
        return "objectType is not 'tile'"
    measurements = props.get("measurements")
    if not isinstance(measurements, Mapping) or not is_zeus_tile("tile", measurements):
        return f"no '{TILE_MEASUREMENT_PREFIX}<Class>' measurement"
    if not all(_finite(v) for v in measurements.values()):
        return "a measurement is not a finite number"
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
