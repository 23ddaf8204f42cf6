"""The keep-edits rule in Python (bridge/edits.py); the same rule on real QuPath objects: test_qupath_rule.py."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import shapely
from shapely.affinity import translate
from shapely.geometry import MultiPolygon, Polygon, box

from zeus_qupath.bridge.edits import (
    IMPORTED,
    RECORD_FILE,
    REPLACED,
    ImportRecord,
    has_zeus_marker,
    is_untouched_zeus,
    merge_annotations,
    read_import_record,
    same_geometry,
    write_import_record,
    written_objects,
    written_record,
    zeus_class_from_name,
)
from zeus_qupath.qupath_geojson import QuPathObject, annotation_feature, feature_to_object

TUMOR = Polygon([(0, 0), (400, 0), (400, 300), (0, 300)], [[(100, 100), (200, 100), (200, 200), (100, 200)]])
NORMAL = Polygon([(1000, 1000), (1500, 1000), (1250, 1400)])


def zeus_feature(geom=TUMOR, cls: str = "Tumor") -> dict:
    """A feature exactly as the ZEUS writer makes it, after a JSON round trip."""
    obj = QuPathObject(geom, class_name=cls, measurements={"Mean tumor score": 0.4})
    return json.loads(json.dumps(annotation_feature(obj)))


def as_object(feature: dict) -> QuPathObject:
    obj = feature_to_object(feature)
    assert obj is not None
    return obj


def float32(geom):
    """What QuPath 0.6 holds: every coordinate rounded to float32."""
    return shapely.transform(geom, lambda c: c.astype(np.float32).astype(np.float64))


def test_marker_name_parsing() -> None:
    assert zeus_class_from_name("ZEUS Tumor") == "Tumor"
    assert zeus_class_from_name("ZEUS Tumor: Positive") == "Tumor: Positive"
    assert zeus_class_from_name("ZEUSTumor") is None and zeus_class_from_name(None) is None
    assert has_zeus_marker("ZEUS Tumor", {}) and not has_zeus_marker("Tumor", {"Area um^2": 3.0})


# ------------------------------------------------------------------------------------ geometry equality


def test_same_geometry_ignores_ring_start_and_orientation() -> None:
    shifted_start = Polygon([(400, 0), (400, 300), (0, 300), (0, 0)], list(TUMOR.interiors))
    assert same_geometry(TUMOR, shifted_start)
    assert same_geometry(TUMOR, shapely.orient_polygons(TUMOR, exterior_cw=True))
    assert same_geometry(MultiPolygon([NORMAL]), NORMAL)  # one part stored either way


def test_same_geometry_within_float32_only() -> None:
    far = Polygon([(123456.789, 98765.4321), (124000.123, 98765.4321), (123999.123, 99999.987)])
    assert same_geometry(far, float32(far))
    ulp = np.spacing(np.float32(124000.0))  # 0.0078 px at this size
    assert not same_geometry(far, translate(far, 3 * ulp, 0))
    assert not same_geometry(TUMOR, translate(TUMOR, 0.01, 0))  # small coordinates: far tighter


def test_same_geometry_sees_vertex_hole_and_part_changes() -> None:
    assert not same_geometry(TUMOR, Polygon([(0, 0), (420, 0), (400, 300), (0, 300)], list(TUMOR.interiors)))
    extra = Polygon([(0, 0), (200, 0), (400, 0), (400, 300), (0, 300)], list(TUMOR.interiors))
    assert extra.area == TUMOR.area and not same_geometry(TUMOR, extra)  # same shape, one more vertex
    assert not same_geometry(TUMOR, Polygon(TUMOR.exterior))
    assert not same_geometry(MultiPolygon([NORMAL, box(0, 0, 10, 10)]), NORMAL)
    assert not same_geometry(TUMOR, None) and not same_geometry(Polygon(), Polygon())


# ------------------------------------------------------------------------------------ untouched


def test_untouched_needs_written_id_class_name_geometry() -> None:
    feature = zeus_feature()
    obj = as_object(feature)
    written = written_objects([feature])
    assert is_untouched_zeus(obj, written)
    assert is_untouched_zeus(replace(obj, geometry=float32(obj.geometry), measurements={}), written)
    assert not is_untouched_zeus(obj, {})  # an id ZEUS did not write: the annotator's
    assert not is_untouched_zeus(replace(obj, id=None), written)
    assert not is_untouched_zeus(replace(obj, class_name="Stroma"), written)
    assert not is_untouched_zeus(replace(obj, class_name=None), written)
    assert not is_untouched_zeus(replace(obj, name="checked by AB"), written)
    assert not is_untouched_zeus(replace(obj, is_locked=True), written)
    assert not is_untouched_zeus(replace(obj, object_type="detection"), written)
    assert not is_untouched_zeus(replace(obj, geometry=translate(obj.geometry, 40, -15)), written)
    assert not is_untouched_zeus(replace(obj, geometry=Polygon(TUMOR.exterior)), written)


def test_area_preserving_edit_is_seen() -> None:
    """The issue's case: two vertices moved 45 px, area and centroid nearly unchanged."""
    ring = [(1000 + 300 * np.cos(a), 1000 + 300 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 41)[:-1]]
    feature = zeus_feature(Polygon(ring))
    obj = as_object(feature)
    moved = list(shapely.get_coordinates(obj.geometry.exterior))[:-1]
    for i in (10, 30):
        moved[i] = (moved[i][0] + 45, moved[i][1])
    edited = Polygon(moved)
    assert abs(edited.area - obj.geometry.area) < 1.0
    assert edited.centroid.distance(obj.geometry.centroid) < 1.0
    written = written_objects([feature])
    assert not is_untouched_zeus(replace(obj, geometry=edited, measurements=obj.measurements), written)


# ------------------------------------------------------------------------------------ records


def test_written_record_reads_the_file_and_its_backups(tmp_path) -> None:
    old, new = zeus_feature(TUMOR), zeus_feature(NORMAL, "Normal")
    path = tmp_path / "zeus_annotations.geojson"
    (tmp_path / "zeus_annotations.geojson.bak-20260101-000000").write_text(
        json.dumps({"type": "FeatureCollection", "features": [old]}))
    (tmp_path / "zeus_annotations.geojson.bak-20260102-000000").write_text("{broken")  # left out
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [new]}))
    record = written_record(path)
    assert set(record) == {old["id"], new["id"]}
    assert record[old["id"]].class_name == "Tumor" and record[new["id"]].name == "ZEUS Normal"
    assert written_record(tmp_path / "missing.geojson") == {}


def test_import_record_round_trip_and_deleted(tmp_path) -> None:
    assert read_import_record(tmp_path) == ImportRecord()
    record = ImportRecord({"a": IMPORTED, "b": IMPORTED, "c": REPLACED})
    write_import_record(tmp_path, record)
    assert read_import_record(tmp_path) == record
    assert json.loads((tmp_path / RECORD_FILE).read_text())["format"] == "zeus-imported/1"
    assert record.deleted(["a", None, "x"]) == {"b"}  # replaced ids are not the annotator's deletions
    (tmp_path / RECORD_FILE).write_text("[1, 2]")
    assert read_import_record(tmp_path) == ImportRecord()


# ------------------------------------------------------------------------------------ merge


def test_merge_replaces_untouched_keeps_edits_and_protects_their_regions() -> None:
    f_tumor, f_normal, f_edit, f_gone = (zeus_feature(TUMOR), zeus_feature(NORMAL, "Normal"),
                                         zeus_feature(box(5000, 0, 5100, 90)), zeus_feature(box(8000, 0, 8200, 200)))
    written = written_objects([f_tumor, f_normal, f_edit, f_gone])
    tumor, normal = as_object(f_tumor), as_object(f_normal)
    edited = replace(as_object(f_edit), geometry=box(5000, 0, 5150, 90), measurements={})
    drawn = QuPathObject(geometry=box(9000, 9000, 9100, 9100), class_name="Tumor", id="drawn-1")
    cell = QuPathObject(geometry=box(1, 1, 3, 3), object_type="cell", id="cell-1")
    record = ImportRecord({i["id"]: IMPORTED for i in (f_tumor, f_normal, f_edit, f_gone)})

    new = [zeus_feature(box(5050, 10, 5300, 80)),  # over the edited object
           zeus_feature(box(8050, 50, 8100, 100)),  # where the annotator deleted one
           zeus_feature(box(9050, 9050, 9300, 9300)),  # over the drawn one
           zeus_feature(box(9100, 9000, 9200, 9100)),  # touches the drawn one along an edge only
           zeus_feature(box(20000, 0, 20100, 100)),  # free
           f_normal, f_gone]  # the same file again: one still there untouched, one the annotator deleted
    written = {**written, **written_objects(new)}
    result = merge_annotations([tumor, normal, edited, drawn, cell], new, written, record)

    assert result.removed == [tumor]
    assert result.kept == [normal, edited, drawn, cell]
    assert [f["id"] for f in result.added] == [new[3]["id"], new[4]["id"]]
    assert [f["id"] for f in result.blocked] == [new[0]["id"], new[1]["id"], new[2]["id"]]
    assert [f["id"] for f in result.skipped] == [f_normal["id"]]
    assert [f["id"] for f in result.deleted] == [f_gone["id"]]
    assert result.deleted_ids == {f_gone["id"]}
    assert result.record.status[f_tumor["id"]] == REPLACED
    assert result.record.status[f_gone["id"]] == IMPORTED  # stays known as deleted
    assert result.record.status[new[4]["id"]] == IMPORTED
    assert "added 2" in result.summary() and "1 deleted by the annotator" in result.summary()


def test_merge_twice_changes_nothing() -> None:
    features = [zeus_feature(TUMOR), zeus_feature(NORMAL, "Normal")]
    written = written_objects(features)
    first = merge_annotations([], features, written)
    image = [as_object(f) for f in first.added]
    second = merge_annotations(image, features, written, first.record)
    assert second.removed == [] and second.added == [] and len(second.skipped) == 2
    assert second.record == first.record


def test_merge_treats_an_invalid_drawn_outline_as_protected() -> None:
    bowtie = QuPathObject(geometry=Polygon([(0, 0), (100, 100), (100, 0), (0, 100)]), class_name="Tumor", id="b")
    new = [zeus_feature(box(10, 40, 30, 60))]
    result = merge_annotations([bowtie], new, written_objects(new))
    assert result.blocked == new and result.added == []


@pytest.mark.parametrize("geometry", [None, {"type": "Point", "coordinates": [1, 2]}])
def test_merge_adds_features_without_an_area_outside_the_overlap_check(geometry) -> None:
    feature = {"type": "Feature", "id": "p", "geometry": geometry, "properties": {"objectType": "annotation"}}
    drawn = QuPathObject(geometry=box(0, 0, 10, 10), class_name="Tumor", id="d")
    result = merge_annotations([drawn], [feature], {})
    assert [f["id"] for f in result.added] == ["p"]
