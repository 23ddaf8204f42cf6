"""The keep-edits rule: only untouched ZEUS annotations may be replaced; every edit is kept."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
from shapely.affinity import translate
from shapely.geometry import Polygon, mapping

from zeus_qupath.bridge.edits import (
    CENTROID_TOL_PX,
    area_matches,
    centroid_matches,
    has_zeus_marker,
    is_untouched_zeus,
    merge_annotations,
    zeus_class_from_name,
)
from zeus_qupath.bridge.qupath_geojson import QuPathObject, feature_to_object, parse_qupath_geojson
from zeus_qupath.geojson import (
    MEAS_AREA_PX,
    MEAS_CENTROID_X,
    MEAS_CENTROID_Y,
    MEAS_VERTICES,
    Annotation,
    annotation_feature,
)

TUMOR = Polygon([(0, 0), (400, 0), (400, 300), (0, 300)], [[(100, 100), (200, 100), (200, 200), (100, 200)]])
NORMAL = Polygon([(1000, 1000), (1500, 1000), (1250, 1400)])


def zeus_feature(geom: Polygon = TUMOR, cls: str = "Tumor") -> dict:
    """A feature exactly as the ZEUS writer makes it, after a JSON round trip (as QuPath would read it)."""
    return json.loads(json.dumps(annotation_feature(Annotation(geom, cls, {"Mean tumor score": 0.4}))))


def as_object(feature: dict) -> QuPathObject:
    obj = feature_to_object(feature)
    assert obj is not None
    return obj


def test_marker_name_parsing() -> None:
    assert zeus_class_from_name("ZEUS Tumor") == "Tumor"
    assert zeus_class_from_name("ZEUS Tumor: Positive") == "Tumor: Positive"
    assert zeus_class_from_name("ZEUSTumor") is None
    assert zeus_class_from_name("Tumor") is None
    assert zeus_class_from_name(None) is None


def test_area_tolerance() -> None:
    assert area_matches(100.0, 100.4)  # absolute 0.5 px^2 on small objects
    assert not area_matches(100.0, 100.6)
    assert area_matches(1e8 + 90.0, 1e8)  # relative 1e-6 on large ones
    assert not area_matches(1e8 + 110.0, 1e8)


def test_untouched_zeus_object_is_replaceable() -> None:
    obj = as_object(zeus_feature())
    assert obj.name == "ZEUS Tumor" and obj.measurements[MEAS_VERTICES] == 10.0
    assert is_untouched_zeus(obj)


def test_moved_vertex_is_kept() -> None:
    obj = as_object(zeus_feature())
    moved = Polygon([(0, 0), (420, 0), (400, 300), (0, 300)], list(TUMOR.interiors))  # one vertex 20 px right
    assert not is_untouched_zeus(replace(obj, geometry=moved))


def test_added_vertex_with_same_area_is_kept() -> None:
    obj = as_object(zeus_feature())
    extra = Polygon([(0, 0), (200, 0), (400, 0), (400, 300), (0, 300)], list(TUMOR.interiors))
    assert extra.area == TUMOR.area
    assert not is_untouched_zeus(replace(obj, geometry=extra))


def test_filled_hole_is_kept() -> None:
    obj = as_object(zeus_feature())
    assert not is_untouched_zeus(replace(obj, geometry=Polygon(TUMOR.exterior)))


def test_changed_class_is_kept() -> None:
    assert not is_untouched_zeus(replace(as_object(zeus_feature()), class_name="Stroma"))
    assert not is_untouched_zeus(replace(as_object(zeus_feature()), class_name=None))


def test_renamed_is_kept() -> None:
    assert not is_untouched_zeus(replace(as_object(zeus_feature()), name="checked by AB"))
    assert not is_untouched_zeus(replace(as_object(zeus_feature()), name=None))


@pytest.mark.parametrize("key", [MEAS_AREA_PX, MEAS_VERTICES])
def test_deleted_measurement_is_kept(key: str) -> None:
    obj = as_object(zeus_feature())
    measurements = dict(obj.measurements)
    del measurements[key]
    assert not is_untouched_zeus(replace(obj, measurements=measurements))


def test_annotator_drawn_object_is_kept() -> None:
    drawn = QuPathObject(geometry=TUMOR, class_name="Tumor", name=None, measurements={})
    assert not is_untouched_zeus(drawn)


def test_detection_with_marker_is_kept() -> None:
    assert not is_untouched_zeus(replace(as_object(zeus_feature()), object_type="detection"))


def test_merge_keeps_edits_replaces_untouched_and_adds_new() -> None:
    old_tumor = as_object(zeus_feature(TUMOR))
    old_normal = as_object(zeus_feature(NORMAL, "Normal"))
    edited = replace(as_object(zeus_feature(Polygon([(5000, 0), (5100, 0), (5100, 90)]))),
                     geometry=Polygon([(5000, 0), (5150, 0), (5100, 90)]))
    drawn = QuPathObject(geometry=Polygon([(9000, 9000), (9100, 9000), (9100, 9100)]), class_name="Tumor",
                         id="11111111-2222-3333-4444-555555555555")
    cell = QuPathObject(geometry=Polygon([(1, 1), (3, 1), (3, 3)]), object_type="cell")
    new = [zeus_feature(TUMOR), zeus_feature(NORMAL, "Normal")]

    result = merge_annotations([old_tumor, old_normal, edited, drawn, cell], new)

    assert result.removed == [old_tumor, old_normal]
    assert result.kept == [edited, drawn, cell]
    assert [f["id"] for f in result.added] == [f["id"] for f in new]
    assert result.skipped == []
    assert (result.n_kept, result.n_removed, result.n_added, result.n_skipped) == (3, 2, 2, 0)
    assert "kept 3" in result.summary()


def test_merge_twice_with_the_same_features_is_idempotent() -> None:
    features = [zeus_feature(TUMOR), zeus_feature(NORMAL, "Normal")]
    first = merge_annotations([], features)
    image = parse_qupath_geojson({"type": "FeatureCollection", "features": first.added})
    second = merge_annotations(image, copy.deepcopy(features))
    assert second.n_removed == 2 and second.n_added == 2 and second.n_kept == 0
    # the annotator edits one of them; importing the same file again must not add it back
    edited = replace(image[0], geometry=Polygon([(0, 0), (450, 0), (400, 300), (0, 300)]))
    third = merge_annotations([edited, image[1]], copy.deepcopy(features))
    assert third.kept == [edited]
    assert third.removed == [image[1]]
    assert [f["id"] for f in third.added] == [features[1]["id"]]
    assert [f["id"] for f in third.skipped] == [features[0]["id"]]


def test_merge_accepts_features_with_geometry_only_in_geojson_form() -> None:
    feature = {"type": "Feature", "geometry": mapping(NORMAL), "properties": {"objectType": "annotation"}}
    result = merge_annotations([], [feature])
    assert result.added == [feature] and result.added[0] is not feature  # copied, not aliased


# ------------------------------------------------------------------------------------ centroid check


def test_written_feature_carries_the_centroid_of_its_rounded_geometry() -> None:
    odd = Polygon([(10.123456, 20.987654), (410.55555, 20.1), (390.01999, 310.777), (12.3, 300.4444)])
    feature = zeus_feature(odd)
    obj = as_object(feature)
    assert all(round(c * 100) == c * 100 or abs(round(c * 100) - c * 100) < 1e-6
               for ring in feature["geometry"]["coordinates"] for xy in ring for c in xy)  # 0.01 px grid
    # the writer's centroid lies on the 0.01 px grid too (shapely keeps the precision); far inside 0.5 px
    assert obj.measurements[MEAS_CENTROID_X] == pytest.approx(obj.geometry.centroid.x, abs=0.006)
    assert obj.measurements[MEAS_CENTROID_Y] == pytest.approx(obj.geometry.centroid.y, abs=0.006)
    assert is_untouched_zeus(obj)


def test_object_moved_as_a_whole_is_kept() -> None:
    obj = as_object(zeus_feature())
    moved = translate(obj.geometry, 40, -15)
    assert moved.area == pytest.approx(obj.geometry.area) and len(moved.exterior.coords) == 5
    assert area_matches(moved.area, obj.measurements[MEAS_AREA_PX])  # the old checks cannot see it
    assert not is_untouched_zeus(replace(obj, geometry=moved))


def test_moving_a_hole_inside_the_outline_is_kept() -> None:
    obj = as_object(zeus_feature())
    moved_hole = Polygon(TUMOR.exterior, [[(200, 100), (300, 100), (300, 200), (200, 200)]])
    assert moved_hole.area == TUMOR.area
    assert not is_untouched_zeus(replace(obj, geometry=moved_hole))


def test_sub_tolerance_shift_is_still_untouched() -> None:
    obj = as_object(zeus_feature())
    assert is_untouched_zeus(replace(obj, geometry=translate(obj.geometry, 0.3, 0.3)))  # 0.42 px
    assert not is_untouched_zeus(replace(obj, geometry=translate(obj.geometry, 0.4, 0.4)))  # 0.57 px
    assert CENTROID_TOL_PX == 0.5


def test_output_written_before_centroids_falls_back_to_the_old_rule() -> None:
    obj = as_object(zeus_feature())
    old = {k: v for k, v in obj.measurements.items() if k not in (MEAS_CENTROID_X, MEAS_CENTROID_Y)}
    assert centroid_matches(obj.geometry, old)
    assert is_untouched_zeus(replace(obj, measurements=old))
    # without the centroid a whole-object move is invisible: the old rule treats it as untouched
    assert is_untouched_zeus(replace(obj, measurements=old, geometry=translate(obj.geometry, 40, 0)))
    # a vertex move is still seen
    assert not is_untouched_zeus(replace(obj, measurements=old, geometry=Polygon(
        [(0, 0), (420, 0), (400, 300), (0, 300)], list(TUMOR.interiors))))


@pytest.mark.parametrize("key", [MEAS_CENTROID_X, MEAS_CENTROID_Y])
def test_one_centroid_measurement_deleted_is_kept(key: str) -> None:
    obj = as_object(zeus_feature())
    measurements = {k: v for k, v in obj.measurements.items() if k != key}
    assert not is_untouched_zeus(replace(obj, measurements=measurements))


def test_nan_measurements_are_never_untouched() -> None:
    obj = as_object(zeus_feature())
    for key in (MEAS_AREA_PX, MEAS_VERTICES, MEAS_CENTROID_X):
        assert not is_untouched_zeus(replace(obj, measurements={**obj.measurements, key: float("nan")}))


def test_merge_keeps_an_object_moved_as_a_whole() -> None:
    feature = zeus_feature()
    moved = replace(as_object(feature), geometry=translate(TUMOR, 500, 500))
    result = merge_annotations([moved], [copy.deepcopy(feature)])
    assert result.kept == [moved] and result.removed == []
    assert [f["id"] for f in result.skipped] == [feature["id"]]  # same id: not added twice


def test_zeus_marker() -> None:
    obj = as_object(zeus_feature())
    assert has_zeus_marker(obj.name, obj.measurements)
    assert has_zeus_marker("checked by AB", obj.measurements)  # renamed, still carries the measurements
    assert has_zeus_marker("ZEUS Tumor", {})
    assert not has_zeus_marker(None, {"Area um^2": 3.0})
    assert not has_zeus_marker("Tumor", {})
