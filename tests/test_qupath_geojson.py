"""QuPath GeoJSON reader/writer on real exports of QuPath 0.2 to 0.5 and on hand-written fixtures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon

from zeus_qupath.errors import GeoJSONError
from zeus_qupath.qupath_geojson import (
    QuPathObject,
    feature_collection,
    feature_to_object,
    objects_to_feature_collection,
    parse_qupath_geojson,
    read_qupath_geojson,
    vertex_count,
)

TESTDATA = Path(__file__).resolve().parent / "data" / "geojson"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "geojson"

needs_testdata = pytest.mark.skipif(
    not TESTDATA.is_dir(), reason=f"real QuPath exports not found at {TESTDATA} (tests/data)"
)


def first_xy(obj: QuPathObject) -> tuple[float, float]:
    x, y = shapely.get_coordinates(obj.geometry)[0]
    return float(x), float(y)


# ---------------------------------------------------------------------------------- real exports

# file -> [(object_type, geom_type, vertex count, area, first coordinate, name, class, class colour)]
WSIDICOM_SINGLE = {
    "qupath-brush.json": ("Polygon", 188, 10071.92, (26388.0, 15410.0), "brush"),
    "qupath-ellipse.json": ("Polygon", 101, 45350.45, (26356.0, 15357.0), "ellipse"),
    "qupath-line.json": ("LineString", 2, 0.0, (26096.35, 15240.5), "line"),
    "qupath-multipoint.json": ("MultiPoint", 3, 0.0, (26833.53, 15424.94), "multipoint"),
    "qupath-point.json": ("Point", 1, 0.0, (26833.53, 15424.94), "point"),
    "qupath-polygon.json": ("Polygon", 47, 94491.5, (26353.0, 15345.0), "polygon"),
    "qupath-polyline.json": ("LineString", 49, 0.0, (26213.3, 15373.96), "polyline"),
    "qupath-rectangle.json": ("Polygon", 5, 36960.0, (26268.0, 15298.0), "rectangle"),
    "qupath-wand.json": ("Polygon", 140, 2651.5, (26935.0, 15359.0), "wand"),
}


@needs_testdata
@pytest.mark.parametrize("name", sorted(WSIDICOM_SINGLE))
def test_qupath02_single_features(name: str) -> None:
    geom_type, n_vertices, area, first, obj_name = WSIDICOM_SINGLE[name]
    objs = read_qupath_geojson(TESTDATA / "qupath-0.2-wsidicom" / name)
    assert len(objs) == 1
    obj = objs[0]
    assert obj.object_type == "annotation"  # from id "PathAnnotationObject"
    assert obj.id is None  # the v0.2 id is a type, not an object id
    assert obj.geometry.geom_type == geom_type
    assert obj.geometry.is_valid
    assert vertex_count(obj.geometry) == n_vertices
    assert obj.geometry.area == pytest.approx(area, abs=0.01)
    assert first_xy(obj) == pytest.approx(first)
    assert obj.name == obj_name
    assert obj.class_name is None and obj.color is None
    assert obj.measurements == {}
    assert obj.is_locked is False


@needs_testdata
def test_qupath02_classified_list_of_features() -> None:
    path = TESTDATA / "qupath-0.2-wsidicom" / "qupath-polygon-cell-classified.json"
    objs = read_qupath_geojson(path)
    assert [o.name for o in objs] == ["Erythrocytes 2", "Erythrocytes 1", "Neutrophils 1", "Neutrophils 2"]
    assert [o.class_name for o in objs] == ["Cell", "Cell", "Nucleus", "Nucleus"]
    assert all(o.object_type == "annotation" and o.geometry.geom_type == "Polygon" for o in objs)
    assert [vertex_count(o.geometry) for o in objs] == [101] * 4
    assert [round(o.geometry.area, 2) for o in objs] == [103.6, 153.79, 109.86, 75.34]
    # the signed colorRGB decodes to the same RGB that the file also stores as the object's colour
    raw = json.loads(path.read_text())
    for obj, feature in zip(objs, raw, strict=True):
        assert obj.color == tuple(feature["properties"]["color"])
        assert obj.object_color == obj.color
    assert objs[0].color == (127, 220, 58) and objs[2].color == (184, 115, 67)


@needs_testdata
def test_qupath02_cell_with_measurement_list() -> None:
    objs = read_qupath_geojson(TESTDATA / "luna" / "region_annotation_results.geojson")
    assert len(objs) == 1
    cell = objs[0]
    assert cell.object_type == "cell"  # from id "PathCellObject"
    assert cell.class_name == "Other" and cell.color == (0, 128, 128)  # colorRGB -16744320
    assert len(cell.measurements) == 54
    assert cell.measurements["Detection probability"] == pytest.approx(0.5110340118408203)
    assert cell.measurements["Nucleus: Area µm^2"] == pytest.approx(371.4884948730469)
    assert first_xy(cell) == (61781.95, 929.31)
    assert vertex_count(cell.geometry) == 25
    assert cell.nucleus_geometry is not None and cell.nucleus_geometry.area == pytest.approx(1479.45, abs=0.01)
    assert cell.geometry.contains(cell.nucleus_geometry.representative_point())


@needs_testdata
def test_qupath04_cells_with_measurement_map() -> None:
    objs = read_qupath_geojson(TESTDATA / "luna" / "test_cell_detections.geojson")
    assert [o.id for o in objs] == ["5868af7c-9aaf-4646-b618-e0a3cf74b94f", "e38fc918-edeb-462e-9d80-ed48ad582746"]
    assert all(o.object_type == "cell" and o.class_name == "Other" and o.color == (0, 128, 128) for o in objs)
    assert objs[0].geometry.bounds == (512.0, 512.0, 1024.0, 1024.0)
    assert objs[0].geometry.area == 512 * 512
    assert objs[1].geometry.area == 512 * 512 / 2
    assert all(len(o.measurements) == 54 for o in objs)
    assert objs[0].measurements["Detection probability"] == pytest.approx(0.5292551517486572)
    assert all(o.nucleus_geometry is not None for o in objs)


@needs_testdata
def test_qupath05_named_annotations_with_colour_and_no_class() -> None:
    objs = read_qupath_geojson(TESTDATA / "dlup" / "qupath05.geojson")
    assert [o.name for o in objs] == ["UT", "I", "I"]
    assert [o.id for o in objs] == [
        "6423a977-ffff-48db-affc-cd11632010f0",
        "f350cce8-f792-44ad-8ec2-dd9e0cc78c4c",
        "a9d3d08f-35cd-46d4-93d6-08d71feefaa6",
    ]
    assert all(o.object_type == "annotation" and o.class_name is None for o in objs)
    assert all(o.object_color == (255, 0, 0) for o in objs)
    assert [vertex_count(o.geometry) for o in objs] == [164, 116, 119]
    assert [o.geometry.area for o in objs] == [51687.5, 71159.0, 46151.5]
    assert first_xy(objs[0]) == (8909.0, 6277.0)


@needs_testdata
def test_every_real_export_reads_and_round_trips() -> None:
    files = sorted(p for p in TESTDATA.rglob("*") if p.is_file())
    assert len(files) == 13
    for path in files:
        objs = read_qupath_geojson(path)
        assert objs, path
        collection = objects_to_feature_collection(objs)
        text = json.dumps(collection, allow_nan=False)  # no NaN reaches QuPath
        again = parse_qupath_geojson(json.loads(text), source=str(path))
        assert len(again) == len(objs)
        for a, b in zip(objs, again, strict=True):
            assert a.geometry.equals(b.geometry)
            assert (a.object_type, a.class_name, a.color, a.name, a.object_color) == (
                b.object_type, b.class_name, b.color, b.name, b.object_color)
            assert a.measurements == b.measurements
            assert (a.nucleus_geometry is None) == (b.nucleus_geometry is None)


# ---------------------------------------------------------------------------------- fixtures


def test_v03_object_type_spelling() -> None:
    objs = read_qupath_geojson(FIXTURES / "v03_object_type.geojson")
    assert [o.object_type for o in objs] == ["annotation", "detection", "cell"]
    annotation, detection, cell = objs
    assert annotation.class_name == "Tumor" and annotation.color == (200, 0, 0)
    assert annotation.name == "Tumor region 1"
    assert annotation.measurements["Num Detections"] == 2.0
    assert math.isnan(annotation.measurements["Mean score"])  # "NaN" string kept as NaN when reading
    assert annotation.geometry.bounds == (1000.0, 2000.0, 1400.0, 2300.0)
    assert detection.class_name == "Tumor: Positive"  # derived class written with parentClass
    assert detection.color == (250, 62, 62)
    assert cell.nucleus_geometry is not None and cell.nucleus_geometry.area == 100.0
    written = objects_to_feature_collection(objs)["features"]
    assert [f["properties"]["objectType"] for f in written] == ["annotation", "detection", "cell"]
    assert "object_type" not in written[0]["properties"]
    assert written[0]["properties"]["measurements"] == {"Num Detections": 2.0}  # NaN dropped on writing
    assert written[1]["properties"]["classification"] == {"names": ["Tumor", "Positive"], "color": [250, 62, 62]}
    assert written[2]["nucleusGeometry"]["type"] == "Polygon"


def test_polygon_with_hole() -> None:
    (obj,) = read_qupath_geojson(FIXTURES / "polygon_with_hole.geojson")
    assert isinstance(obj.geometry, Polygon)
    assert len(obj.geometry.interiors) == 1
    assert obj.geometry.area == 3000 * 2000 - 1000 * 1000
    assert vertex_count(obj.geometry) == 10  # JTS counting: both rings with their closing points
    assert not obj.geometry.contains(shapely.Point(1500, 1000))  # inside the hole
    assert obj.geometry.contains(shapely.Point(500, 1000))
    feature = objects_to_feature_collection([obj])["features"][0]
    assert len(feature["geometry"]["coordinates"]) == 2
    assert feature["id"] == "0b6f4a52-8d3e-4b61-9a43-0f1d5f3c2a10"
    assert feature["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}


def test_multipolygon_derived_class_locked_and_special_numbers() -> None:
    (obj,) = read_qupath_geojson(FIXTURES / "multipolygon.geojson")
    assert isinstance(obj.geometry, MultiPolygon) and len(obj.geometry.geoms) == 2
    assert obj.geometry.area == pytest.approx(500 * 400 + 0.5 * 200 * 300)
    assert first_xy(obj) == (100.5, 100.25)
    assert obj.class_name == "Tumor: Positive" and obj.color == (250, 62, 62)  # alpha ignored
    assert obj.object_color == (10, 20, 30)
    assert obj.is_locked is True
    assert obj.measurements["Score"] == 0.5
    assert math.isnan(obj.measurements["Missing"]) and obj.measurements["Huge"] == math.inf
    assert "Broken" not in obj.measurements
    props = objects_to_feature_collection([obj])["features"][0]["properties"]
    assert props["isLocked"] is True
    assert props["measurements"] == {"Score": 0.5}
    assert props["metadata"] == {"source": "hand-written fixture"}  # unknown properties carried through
    assert props["color"] == [10, 20, 30]


def test_invalid_polygon_is_repaired_to_polygons() -> None:
    (obj,) = read_qupath_geojson(FIXTURES / "self_intersecting.geojson")  # a bow tie, single Feature
    assert obj.geometry.is_valid
    assert obj.geometry.geom_type == "MultiPolygon"
    assert obj.geometry.area == pytest.approx(5000.0)  # two triangles, 100 x 50 / 2 each
    assert obj.class_name == "Stroma" and obj.color is not None  # bare-string classification gets a colour
    feature = objects_to_feature_collection([obj])["features"][0]
    assert feature["properties"]["classification"]["color"] == list(obj.color)


def test_degenerate_polygon_is_dropped() -> None:
    data = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [20, 0], [0, 0]]]},
            "properties": {"objectType": "annotation"}}
    assert feature_to_object(data) is None
    assert parse_qupath_geojson([data]) == []


def test_malformed_file_raises_one_line_error_naming_the_file() -> None:
    path = FIXTURES / "malformed.geojson"
    with pytest.raises(GeoJSONError) as info:
        read_qupath_geojson(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"type": "Topology"}, "expected a FeatureCollection"),
        ({"type": "FeatureCollection", "features": {}}, "'features' list"),
        ([{"type": "Feature", "properties": {}}], "feature 0: missing or malformed 'geometry'"),
        ([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": "x"}, "properties": {}}], "feature 0"),
        ([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},
           "properties": {"measurements": 3}}], "'measurements'"),
        (42, "got int"),
    ],
)
def test_malformed_structures(data: object, fragment: str) -> None:
    with pytest.raises(GeoJSONError, match="demo.geojson") as info:
        parse_qupath_geojson(data, source="demo.geojson")
    assert fragment in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GeoJSONError, match="file not found"):
        read_qupath_geojson(tmp_path / "nope.geojson")


def test_writer_output_is_read_back_by_the_reader() -> None:
    square = Polygon([(0, 0), (10, 0), (10, 10), (0, 10)])
    collection = feature_collection([QuPathObject(square, class_name="Tumor", measurements={"Mean tumor score": 0.25})])
    (obj,) = parse_qupath_geojson(json.loads(json.dumps(collection)))
    assert obj.name == "ZEUS Tumor" and obj.class_name == "Tumor" and obj.color == (200, 0, 0)
    assert obj.geometry.equals(square)
    assert obj.id == collection["features"][0]["id"]
