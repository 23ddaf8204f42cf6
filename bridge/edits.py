"""The keep-edits rule: which objects a new ZEUS result may replace, and which belong to the annotator.

This module is the single Python source of truth for the rule; ``groovy/import_zeus_annotations.groovy``
mirrors it (the block between ``// >>> ZEUS keep-edits rule`` and ``// <<< ZEUS keep-edits rule``), and
the tests run both on the same real QuPath objects and require the same answers.

What ZEUS wrote is the record. For one image it is every feature of ``zeus_annotations.geojson`` and of
its backups ``zeus_annotations.geojson.bak-<time>`` (``written_record``): ID, geometry, class, name.

*Untouched* (``is_untouched_zeus``): an annotation whose ID is one ZEUS wrote, whose class and name are
the ones written with that ID, which is not locked, and whose geometry equals the written geometry within
float32 precision (``same_geometry``: both normalised, same vertices in the same order, each coordinate
within one float32 ulp of the largest coordinate, as QuPath 0.6 stores float32 coordinates and may start
or orient rings differently). Measurements play no part: QuPath clears them whenever an ROI is set.
Only untouched objects may be replaced; everything else (edited, moved, reclassified, renamed, locked,
drawn by the annotator, detections, cells) is kept.

What the import put into an image (``ImportRecord``, ``zeus_imported.json`` in the entry's data folder,
written by the import script after it saved the image; by the paquo backend in Python): for every ZEUS
ID it added, ``imported``, and ``replaced`` once a later import removed it as untouched. An ``imported``
ID that is no longer in the image was *deleted* by the annotator.

A re-import (``merge_annotations``):

1. untouched ZEUS objects whose ID is not in the new result are removed (``replaced``);
2. a new feature whose ID is already in the image, or was deleted, is not added;
3. the *protected region* is every kept annotation with an area (the annotator's corrections and
   drawings) and the written geometry of every deleted ZEUS object; a new feature that overlaps it by
   more than ``OVERLAP_TOL_PX2`` is SKIPPED whole (not clipped: a clipped outline would no longer be the
   one ZEUS wrote, so it could never be recognised as untouched again);
4. everything else is added and recorded as ``imported``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry

from zeus_qupath.output_set import atomic_open
from zeus_qupath.qupath_geojson import (
    ZEUS_MARKER_MEASUREMENTS,
    ZEUS_NAME_PREFIX,
    QuPathObject,
    feature_to_object,
    read_qupath_geojson,
)

#: one float32 ulp relative to the largest coordinate (QuPath 0.6 stores ROI coordinates as float32)
FLOAT32_REL_TOL = 2.0**-23
#: overlap (px^2) with the protected region above which a new ZEUS object is not added
OVERLAP_TOL_PX2 = 1.0
RECORD_FILE = "zeus_imported.json"
RECORD_FORMAT = "zeus-imported/1"
IMPORTED = "imported"
REPLACED = "replaced"
BACKUP_INFIX = ".bak-"


def zeus_class_from_name(name: str | None) -> str | None:
    """The class a ZEUS name records (``"ZEUS Tumor"`` -> ``"Tumor"``); ``None`` without the marker."""
    marker = ZEUS_NAME_PREFIX + " "
    if name is None or not name.startswith(marker):
        return None
    return name[len(marker):]


def has_zeus_marker(name: str | None, measurements: Mapping[str, float]) -> bool:
    """True for an object that looks ZEUS-written (name or measurements); for counting, not for the rule."""
    return zeus_class_from_name(name) is not None or any(k in measurements for k in ZEUS_MARKER_MEASUREMENTS)


# --------------------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class WrittenObject:
    """One object as ZEUS wrote it (an entry of the record)."""

    id: str
    geometry: BaseGeometry
    class_name: str | None
    name: str | None


def written_objects(features: Iterable[Mapping[str, Any] | QuPathObject]) -> dict[str, WrittenObject]:
    """ID -> ``WrittenObject`` for GeoJSON features (or objects read from them); features without an ID skipped."""
    out: dict[str, WrittenObject] = {}
    for item in features:
        obj = item if isinstance(item, QuPathObject) else feature_to_object(dict(item))
        if obj is not None and obj.id:
            out[str(obj.id)] = WrittenObject(str(obj.id), obj.geometry, obj.class_name, obj.name)
    return out


def record_files(geojson_path: str | os.PathLike[str]) -> list[Path]:
    """The file and its ``.bak-<time>`` backups, oldest first and the file itself last (its entries win)."""
    path = Path(geojson_path)
    backups = sorted(path.parent.glob(path.name + BACKUP_INFIX + "*"), key=lambda p: p.name)
    return [*backups, *([path] if path.exists() else [])]


def written_record(geojson_path: str | os.PathLike[str]) -> dict[str, WrittenObject]:
    """Everything ZEUS wrote for one image: ``zeus_annotations.geojson`` and its backups.

    A file that cannot be read is left out (its objects then count as the annotator's, which keeps them).
    """
    record: dict[str, WrittenObject] = {}
    for path in record_files(geojson_path):
        try:
            record.update(written_objects(read_qupath_geojson(path)))
        except Exception:  # noqa: BLE001 - a damaged backup must not stop the import; see docstring
            continue
    return record


def _polygonal(geometry: BaseGeometry) -> BaseGeometry:
    """A MultiPolygon of one part as that Polygon (QuPath may store either)."""
    if isinstance(geometry, MultiPolygon) and len(geometry.geoms) == 1:
        return geometry.geoms[0]
    return geometry


def geometry_tolerance(a: BaseGeometry, b: BaseGeometry) -> float:
    """One float32 ulp of the largest coordinate of ``a`` and ``b`` (at least of 1.0)."""
    coords = [shapely.get_coordinates(a), shapely.get_coordinates(b)]
    largest = max([1.0, *(float(abs(c).max()) for c in coords if c.size)])
    return FLOAT32_REL_TOL * largest


def same_geometry(a: BaseGeometry | None, b: BaseGeometry | None) -> bool:
    """``a`` equals ``b`` vertex for vertex within float32 precision, whatever ring start and orientation."""
    if a is None or b is None or a.is_empty or b.is_empty:
        return False
    na, nb = shapely.normalize(_polygonal(a)), shapely.normalize(_polygonal(b))
    if shapely.get_num_coordinates(na) != shapely.get_num_coordinates(nb):
        return False
    return bool(shapely.equals_exact(na, nb, tolerance=geometry_tolerance(na, nb)))


def is_untouched_zeus(obj: QuPathObject, written: Mapping[str, WrittenObject]) -> bool:
    """True when ``obj`` is a ZEUS annotation exactly as ZEUS wrote it (so a new result may replace it)."""
    if obj.object_type != "annotation" or not obj.id or obj.is_locked:
        return False
    record = written.get(str(obj.id))
    if record is None:
        return False
    if obj.class_name != record.class_name or obj.name != record.name:
        return False
    return same_geometry(obj.geometry, record.geometry)


# --------------------------------------------------------------------------------------------- what was imported


@dataclass(frozen=True)
class ImportRecord:
    """What the import put into one image: ZEUS ID -> ``"imported"`` or ``"replaced"``."""

    status: Mapping[str, str] = field(default_factory=dict)

    def deleted(self, present_ids: Iterable[str | None]) -> set[str]:
        """IDs the import added that are gone from the image: the annotator deleted them."""
        present = {str(i) for i in present_ids if i}
        return {i for i, s in self.status.items() if s == IMPORTED and i not in present}

    def to_json(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT, "objects": dict(sorted(self.status.items()))}


def read_import_record(entry_dir: str | os.PathLike[str]) -> ImportRecord:
    """The record in ``<entry data folder>/zeus_imported.json``; empty when absent or unreadable."""
    path = Path(entry_dir) / RECORD_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        objects = data["objects"]
        return ImportRecord({str(k): str(v) for k, v in objects.items() if v in (IMPORTED, REPLACED)})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ImportRecord()


def write_import_record(entry_dir: str | os.PathLike[str], record: ImportRecord) -> None:
    """Write the record atomically (as the import script writes it)."""
    with atomic_open(Path(entry_dir) / RECORD_FILE, "w") as fh:
        json.dump(record.to_json(), fh, indent=2)


# --------------------------------------------------------------------------------------------- the merge


def _area_geometry(geometry: BaseGeometry | None) -> BaseGeometry | None:
    if geometry is None or geometry.is_empty or not isinstance(geometry, (Polygon, MultiPolygon)):
        return None
    if not geometry.is_valid:  # e.g. a self-crossing outline drawn by hand: keep every lobe
        geometry = shapely.make_valid(geometry, method="structure", keep_collapsed=False)  # = JTS GeometryFixer
    return geometry if geometry.area > 0 else None


def overlaps(geometry: BaseGeometry, protected: Iterable[BaseGeometry]) -> bool:
    """True when ``geometry`` shares more than ``OVERLAP_TOL_PX2`` with any protected geometry."""
    g = _area_geometry(geometry)
    if g is None:
        return False
    for p in protected:
        try:
            if g.intersection(p).area > OVERLAP_TOL_PX2:
                return True
        except shapely.errors.GEOSException:  # a broken outline: overlapping bounds count, to be safe
            if g.envelope.intersects(p.envelope):
                return True
    return False


@dataclass(frozen=True)
class MergeResult:
    """What a merge keeps, removes and adds, and the import record after it."""

    kept: list[QuPathObject] = field(default_factory=list)  # the annotator's objects (and edited ZEUS ones)
    removed: list[QuPathObject] = field(default_factory=list)  # untouched ZEUS objects being replaced
    added: list[dict[str, Any]] = field(default_factory=list)  # new ZEUS features to add
    skipped: list[dict[str, Any]] = field(default_factory=list)  # new features already in the image (same id)
    deleted: list[dict[str, Any]] = field(default_factory=list)  # new features the annotator deleted (same id)
    blocked: list[dict[str, Any]] = field(default_factory=list)  # new features over protected regions
    deleted_ids: frozenset[str] = frozenset()  # ZEUS IDs the annotator deleted from the image
    record: ImportRecord = field(default_factory=ImportRecord)  # the import record after this merge

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
        return len(self.skipped) + len(self.deleted) + len(self.blocked)

    def summary(self) -> str:
        return (f"kept {self.n_kept} annotator object(s), replaced {self.n_removed} untouched ZEUS object(s), "
                f"added {self.n_added}, skipped {len(self.skipped)} already present, "
                f"{len(self.deleted)} deleted by the annotator, {len(self.blocked)} over the annotator's regions")


def merge_annotations(
    existing: Iterable[QuPathObject],
    new_features: Iterable[Mapping[str, Any]],
    written: Mapping[str, WrittenObject],
    record: ImportRecord | None = None,
) -> MergeResult:
    """Apply the keep-edits rule to the objects of one image and a new ZEUS result (see the module docstring).

    ``existing``: every object now in the image. ``new_features``: the GeoJSON features of the new result.
    ``written``: ``written_record`` of the image (it should include the new result). ``record``: the
    image's ``ImportRecord`` (``read_import_record``).
    """
    record = record or ImportRecord()
    objects = list(existing)
    new = [dict(f) for f in new_features]
    new_ids = {str(f["id"]) for f in new if f.get("id")}
    present_ids = {str(o.id) for o in objects if o.id}
    deleted_ids = record.deleted(present_ids)

    kept: list[QuPathObject] = []
    removed: list[QuPathObject] = []
    for obj in objects:
        if is_untouched_zeus(obj, written) and str(obj.id) not in new_ids:
            removed.append(obj)
        else:
            kept.append(obj)
    kept_ids = {str(o.id) for o in kept if o.id}

    protected = [g for o in kept if o.object_type == "annotation" and not is_untouched_zeus(o, written)
                 for g in [_area_geometry(o.geometry)] if g is not None]
    protected += [g for i in sorted(deleted_ids) if i in written
                  for g in [_area_geometry(written[i].geometry)] if g is not None]

    status = dict(record.status)
    for obj in removed:
        status[str(obj.id)] = REPLACED
    added: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    deleted: list[dict[str, Any]] = []
    blocked: list[dict[str, Any]] = []
    for feature in new:
        fid = str(feature.get("id") or "")
        if fid and fid in kept_ids:
            skipped.append(feature)
        elif fid and fid in deleted_ids:
            deleted.append(feature)
        elif overlaps(_feature_geometry(feature), protected):
            blocked.append(feature)
        else:
            added.append(feature)
            if fid:
                status[fid] = IMPORTED
    return MergeResult(kept=kept, removed=removed, added=added, skipped=skipped, deleted=deleted, blocked=blocked,
                       deleted_ids=frozenset(deleted_ids), record=ImportRecord(status))


def _feature_geometry(feature: Mapping[str, Any]) -> BaseGeometry:
    try:
        return shape(feature["geometry"])
    except (KeyError, TypeError, ValueError, AttributeError, shapely.errors.GEOSException):
        return Polygon()
