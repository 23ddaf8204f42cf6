"""Masks to polygons: pixel-edge geometry, holes, validity, filtering, simplification, GeoJSON."""

from __future__ import annotations

import json

import numpy as np
import shapely
from shapely.geometry import box, shape

from zeus_qupath.polygons import PolygonParams, mask_polygons, raster_polygons
from zeus_qupath.qupath_geojson import MEAS_AREA_PX, MEAS_VERTICES, QuPathObject, feature_collection, write_geojson
from zeus_qupath.reconstruct import Mask


def test_single_pixel_is_its_square_no_half_shift():
    m = np.zeros((4, 5), bool)
    m[1, 2] = True
    (poly,) = raster_polygons(m, 10.0)
    assert poly.equals(box(20, 10, 30, 20))


def test_hole_is_kept_and_small_holes_can_be_filled():
    m = np.zeros((10, 10), bool)
    m[2:8, 2:8] = True
    m[4:6, 4:6] = False
    mask = Mask(m, 4.0, 40, 40)
    (poly,) = mask_polygons(mask, PolygonParams(tolerance=0))
    assert len(poly.interiors) == 1
    assert poly.area == (24 * 24 - 8 * 8)
    assert shapely.Polygon(poly.interiors[0]).equals(box(16, 16, 24, 24))
    (filled,) = mask_polygons(mask, PolygonParams(min_hole_area=65, tolerance=0))
    assert len(filled.interiors) == 0 and filled.area == 24 * 24


def test_min_area_clip_and_validity():
    m = np.zeros((20, 20), bool)
    m[0:10, 0:10] = True  # 100 cells
    m[15, 15] = True  # a single cell
    m[12:20, 18:20] = True  # runs past the image's right edge (width 95)
    mask = Mask(m, 5.0, 95, 100)
    polys = mask_polygons(mask, PolygonParams(min_area=30, tolerance=0))
    assert all(p.is_valid for p in polys)
    assert len(polys) == 2  # the single 25 px^2 cell is dropped
    assert all(p.bounds[2] <= 95 and p.bounds[3] <= 100 and p.bounds[0] >= 0 for p in polys)
    clipped = mask_polygons(mask, PolygonParams(tolerance=0), clip=box(0, 0, 30, 30))
    assert shapely.union_all(clipped).equals(box(0, 0, 30, 30))


def test_simplification_stays_within_tolerance():
    yy, xx = np.mgrid[0:200, 0:200]
    m = (xx - 100) ** 2 + (yy - 100) ** 2 < 80**2  # a rasterised disc: staircase outline
    mask = Mask(m, 1.0, 200, 200)
    (raw,) = mask_polygons(mask, PolygonParams(tolerance=0))
    (simple,) = mask_polygons(mask, PolygonParams(tolerance=2.0))
    assert len(simple.exterior.coords) < len(raw.exterior.coords) / 3
    assert raw.hausdorff_distance(simple) <= 2.0 + 1e-9


def test_geojson_feature_is_quppath_ready(tmp_path):
    poly = box(0, 0, 10, 10).difference(box(3, 3, 6, 6))
    fc = feature_collection([QuPathObject(poly, class_name="tumor",
                                          measurements={"Mean tumor score": 0.3, "bad": float("nan")})])
    path = tmp_path / "a.geojson"
    write_geojson(path, fc)
    data = json.loads(path.read_text())
    (feat,) = data["features"]
    props = feat["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"]["name"] == "tumor" and len(props["classification"]["color"]) == 3
    assert "bad" not in props["measurements"]  # QuPath rejects NaN
    assert props["measurements"][MEAS_AREA_PX] == poly.area
    assert props["measurements"][MEAS_VERTICES] == 10  # 5 + 5 coordinates, closing points counted as in JTS
    assert shape(feat["geometry"]).equals(poly)
    assert len(feat["id"]) == 36 and props["name"].startswith("ZEUS")
