"""How much an annotator corrected ZEUS's result on one slide: :func:`compare_annotations`.

The Dice coefficient between ZEUS's original outline (union of the ZEUS objects of the positive class) and
the corrected one (union of every annotation of that class), the positive-class area the annotator added
and removed (um^2, or px^2 when the pixel size is unknown), and the number of objects created (no ZEUS
marker), edited (ZEUS marker, but not untouched by the keep-edits rule of ``bridge/edits.py``), deleted
(ZEUS objects of the original whose id is gone and that no edited object replaces) and untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import shapely
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from zeus_qupath.geometry import polygonal
from zeus_qupath.qupath_geojson import QuPathObject

from .edits import WrittenObject, has_zeus_marker, is_untouched_zeus, same_geometry, written_objects
from .label_masks import DEFAULT_POSITIVE_CLASS, area_annotations, class_key


@dataclass(frozen=True)
class CorrectionStats:
    """How an annotator changed ZEUS's result on one slide (areas in ``area_unit``)."""

    positive_class: str
    area_unit: str  # "um^2" or "px^2"
    created: int
    edited: int
    untouched: int
    corrected_area: float
    dice: float | None = None  # None without the original
    original_area: float | None = None
    added_area: float | None = None
    removed_area: float | None = None
    deleted: int | None = None


def _union(objects: Iterable[QuPathObject], key: str) -> BaseGeometry:
    parts = [polygonal(o.geometry) for o in objects
             if o.object_type == "annotation" and o.class_name and class_key(o.class_name) == key]
    return shapely.union_all([p for p in parts if p is not None]) if parts else Polygon()


def _untouched(obj: QuPathObject, written: Mapping[str, WrittenObject]) -> bool:
    """The keep-edits rule's "untouched" (``bridge.edits``); for objects without an ID (QuPath 0.2/0.3
    exports) the same test against any written object of the same class and name."""
    if obj.id:
        return is_untouched_zeus(obj, written)
    return obj.object_type == "annotation" and not obj.is_locked and any(
        w.class_name == obj.class_name and w.name == obj.name and same_geometry(obj.geometry, w.geometry)
        for w in written.values())


def compare_annotations(
    original: Sequence[QuPathObject] | None,
    corrected: Sequence[QuPathObject],
    positive_class: str = DEFAULT_POSITIVE_CLASS,
    mpp: float | None = None,
    written: Mapping[str, WrittenObject] | None = None,
) -> CorrectionStats:
    """Dice, added/removed area and object counts between ZEUS's annotations and the corrected ones.

    Areas are in um^2 when ``mpp`` is known, else px^2. Objects counted are annotations with an area
    (points and lines are ignored, as in the export). ``written``: everything ZEUS wrote for the image
    (``bridge.edits.written_record``; default: the objects of ``original``). A ZEUS object is one whose
    ID ZEUS wrote, or that carries ZEUS's name or measurements; it is untouched by the keep-edits rule
    of ``bridge.edits``, else edited; every other annotation was created by the annotator. With
    ``original`` ``None`` only the counts that need no original (created, edited, untouched) and the
    corrected area are given.
    """
    key = class_key(positive_class)
    scale, unit = (mpp * mpp, "um^2") if mpp else (1.0, "px^2")
    if written is None:
        written = written_objects(original or [])
    annotations = area_annotations(corrected)
    untouched = [o for o in annotations if _untouched(o, written)]
    marked = [o for o in annotations if (o.id and str(o.id) in written) or has_zeus_marker(o.name, o.measurements)]
    created = len(annotations) - len(marked)
    edited = [o for o in marked if not _untouched(o, written)]
    after = _union(annotations, key)
    if original is None:
        return CorrectionStats(positive_class, unit, created, len(edited), len(untouched), after.area * scale)

    zeus = area_annotations(original)
    before = _union(zeus, key)
    inter = before.intersection(after).area
    total = before.area + after.area
    dice = 1.0 if total == 0 else 2.0 * inter / total
    added = after.difference(before).area
    removed = before.difference(after).area

    ids_now = {o.id for o in annotations if o.id}
    original_ids = {o.id for o in zeus if o.id}
    # marked objects that do not carry an original id (QuPath 0.2/0.3 files have no ids; merged objects
    # get new ones) stand in for the original objects they overlap
    stand_ins = [polygonal(o.geometry) for o in marked if not o.id or o.id not in original_ids]
    stand_ins = [g for g in stand_ins if g is not None]
    deleted = 0
    for obj in zeus:
        if obj.id and obj.id in ids_now:
            continue
        geom = polygonal(obj.geometry)
        if geom is not None and any(geom.intersection(g).area > 0 for g in stand_ins):
            continue
        deleted += 1
    return CorrectionStats(
        positive_class=positive_class, area_unit=unit, created=created, edited=len(edited),
        untouched=len(untouched), corrected_area=after.area * scale, dice=dice,
        original_area=before.area * scale, added_area=added * scale, removed_area=removed * scale, deleted=deleted,
    )
