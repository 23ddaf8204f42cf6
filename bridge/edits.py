"""The keep-edits rule: which objects a new ZEUS result may replace, and which belong to the annotator.

This module is the single Python source of truth for the rule; ``groovy/import_zeus_annotations.groovy``
and ``groovy/zeus_segment_current_image.groovy`` mirror it line by line.

ZEUS writes every annotation with

- a name ``"ZEUS <class>"`` (``ZEUS_NAME_PREFIX``, a space, the class name),
- the measurements ``MEAS_AREA_PX`` (ROI area in level-0 px^2) and ``MEAS_VERTICES`` (vertex count,
  counted like JTS ``Geometry.getNumPoints()``: closing points included),
- since 0.1 also ``MEAS_CENTROID_X`` / ``MEAS_CENTROID_Y``: the centroid of the written geometry
  (level-0 px; the area-weighted centroid that JTS ``Geometry.getCentroid()`` and shapely compute).

An annotation is *untouched* when all of these still hold: the marker name and the area and vertex
measurements are present, its class equals the class in its name, its area is within
``max(1e-6 * area, 0.5 px^2)`` of the written area, its vertex count is the written one, and, when
the centroid measurements are present, its centroid lies within ``CENTROID_TOL_PX`` (0.5 px) of the
written one. Objects written before the centroid measurements existed (neither is present) are
judged by the other checks alone; an object with only one of the two is not untouched.
So an outline moved as a whole (same area, same vertex count) is the annotator's.
Only untouched objects may be replaced. Every other object (edited, moved, reclassified, renamed,
without the measurements, drawn by the annotator, any detection) is kept. A new feature whose id is
already in the image (the same import run twice after the annotator edited it) is not added again.

``has_zeus_marker`` tells objects ZEUS wrote (name or measurements) from objects drawn by hand;
``zeus export`` counts "edited" objects as those with the marker that are not untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shapely.geometry.base import BaseGeometry

from zeus_qupath.geojson import (
    MEAS_AREA_PX,
    MEAS_CENTROID_X,
    MEAS_CENTROID_Y,
    MEAS_VERTICES,
    ZEUS_NAME_PREFIX,
    vertex_count,
)

from .qupath_geojson import QuPathObject

AREA_REL_TOL = 1e-6
AREA_ABS_TOL_PX2 = 0.5
CENTROID_TOL_PX = 0.5
#: every measurement ZEUS writes as part of its marker (``zeus export`` removes them)
ZEUS_MARKER_MEASUREMENTS = (MEAS_AREA_PX, MEAS_VERTICES, MEAS_CENTROID_X, MEAS_CENTROID_Y)


def zeus_class_from_name(name: str | None) -> str | None:
    """The class a ZEUS name records (``"ZEUS Tumor"`` -> ``"Tumor"``); ``None`` without the marker."""
    marker = ZEUS_NAME_PREFIX + " "
    if name is None or not name.startswith(marker):
        return None
    return name[len(marker):]


def area_matches(area: float, written_area: float) -> bool:
    """True when ``area`` is within the rule's tolerance of the area ZEUS wrote."""
    return abs(area - written_area) <= max(AREA_REL_TOL * abs(written_area), AREA_ABS_TOL_PX2)


def centroid_matches(geometry: BaseGeometry, measurements: Mapping[str, float]) -> bool:
    """The centroid check: true without centroid measurements (older ZEUS output), else within 0.5 px."""
    has_x, has_y = MEAS_CENTROID_X in measurements, MEAS_CENTROID_Y in measurements
    if not has_x and not has_y:
        return True
    if not (has_x and has_y):
        return False
    centroid = geometry.centroid
    if centroid.is_empty:
        return False
    dist = math.hypot(centroid.x - float(measurements[MEAS_CENTROID_X]),
                      centroid.y - float(measurements[MEAS_CENTROID_Y]))
    return dist <= CENTROID_TOL_PX  # False for NaN


def has_zeus_marker(name: str | None, measurements: Mapping[str, float]) -> bool:
    """True for an object ZEUS wrote: its name has the marker or it carries a ZEUS measurement."""
    return zeus_class_from_name(name) is not None or any(k in measurements for k in ZEUS_MARKER_MEASUREMENTS)


def is_untouched_geometry(
    geometry: BaseGeometry,
    class_name: str | None,
    name: str | None,
    measurements: Mapping[str, float],
    object_type: str = "annotation",
) -> bool:
    """The rule on plain values (for callers that do not hold a ``QuPathObject``)."""
    if object_type != "annotation":
        return False
    zeus_class = zeus_class_from_name(name)
    if zeus_class is None or class_name != zeus_class:
        return False
    if MEAS_AREA_PX not in measurements or MEAS_VERTICES not in measurements:
        return False
    if not area_matches(float(geometry.area), float(measurements[MEAS_AREA_PX])):
        return False
    written_vertices = float(measurements[MEAS_VERTICES])
    if not math.isfinite(written_vertices) or vertex_count(geometry) != round(written_vertices):
        return False
    return centroid_matches(geometry, measurements)


def is_untouched_zeus(obj: QuPathObject) -> bool:
    """True when ``obj`` is a ZEUS annotation exactly as ZEUS wrote it (so it may be replaced)."""
    return is_untouched_geometry(obj.geometry, obj.class_name, obj.name, obj.measurements, obj.object_type)


@dataclass(frozen=True)
class MergeResult:
    """What a merge keeps, removes and adds."""

    kept: list[QuPathObject] = field(default_factory=list)  # the annotator's objects (and edited ZEUS ones)
    removed: list[QuPathObject] = field(default_factory=list)  # untouched ZEUS objects being replaced
    added: list[dict[str, Any]] = field(default_factory=list)  # new ZEUS features to add
    skipped: list[dict[str, Any]] = field(default_factory=list)  # new features already present (same id)

    @property
    def n_kept(self) -> int:
        return len(self.kept)

    @property
    def n_removed(self) -> int:
        return len(self.removed)

    @property
    def n_added(self) -> int:
        return len(self.added)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        return (f"kept {self.n_kept} annotator object(s), replaced {self.n_removed} untouched ZEUS object(s), "
                f"added {self.n_added}, skipped {self.n_skipped} already present")


def merge_annotations(existing: Iterable[QuPathObject], new_features: Iterable[Mapping[str, Any]]) -> MergeResult:
    """Apply the keep-edits rule to the objects of one image and a new ZEUS result.

    ``existing``: every object now in the image. ``new_features``: GeoJSON features written by ZEUS
    (``zeus_qupath.geojson.annotation_feature``). Untouched ZEUS objects are removed, everything
    else is kept, and each new feature is added unless an object with its id is kept.
    """
    kept: list[QuPathObject] = []
    removed: list[QuPathObject] = []
    for obj in existing:
        (removed if is_untouched_zeus(obj) else kept).append(obj)
    kept_ids = {o.id for o in kept if o.id}
    added: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for feature in new_features:
        fid = feature.get("id")
        (skipped if fid and str(fid) in kept_ids else added).append(dict(feature))
    return MergeResult(kept=kept, removed=removed, added=added, skipped=skipped)
