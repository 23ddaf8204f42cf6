"""The areal part of a shape (zeus_qupath.geometry): what each caller gets for empty shapes, points, lines and
collections, against hand-computed areas."""

from __future__ import annotations

from shapely.geometry import GeometryCollection, LineString, MultiPolygon, Point, Polygon, box

from zeus_qupath.geometry import polygon_parts, polygonal, polygonal_or_empty


def test_polygon_parts_drops_points_and_lines_and_walks_nested_collections() -> None:
    assert polygon_parts(Point(1, 1)) == []
    assert polygon_parts(LineString([(0, 0), (5, 5)])) == []
    assert polygon_parts(Polygon()) == []
    nested = GeometryCollection([Point(0, 0), box(0, 0, 1, 1), MultiPolygon([box(5, 5, 6, 6), box(8, 8, 10, 10)]),
                                 GeometryCollection([LineString([(0, 0), (1, 0)]), box(20, 20, 23, 23)])])
    assert sorted(p.area for p in polygon_parts(nested)) == [1.0, 1.0, 4.0, 9.0]


def test_polygonal_repairs_and_is_none_without_an_area() -> None:
    bowtie = Polygon([(0, 0), (2, 2), (2, 0), (0, 2)])  # two triangles of area 1 meeting at (1, 1)
    fixed = polygonal(bowtie)
    assert fixed is not None and fixed.is_valid and fixed.area == 2.0
    assert polygonal(LineString([(0, 0), (3, 0)])) is None
    assert polygonal(GeometryCollection([Point(0, 0), LineString([(0, 0), (1, 1)])])) is None
    assert polygonal(Polygon()) is None
    square = box(0, 0, 4, 4)
    assert polygonal(square) is square  # a valid polygon is returned as is
    mixed = polygonal(GeometryCollection([square, LineString([(10, 10), (20, 20)])]))
    assert mixed is not None and mixed.equals(square)
    # two squares sharing an edge: not a valid MultiPolygon, so they come back as one valid polygon of area 2
    joined = polygonal(GeometryCollection([box(0, 0, 1, 1), box(1, 0, 2, 1)]))
    assert joined is not None and joined.is_valid and joined.area == 2.0


def test_polygonal_or_empty_gives_an_empty_polygon_for_clipping() -> None:
    empty = polygonal_or_empty(box(0, 0, 1, 1).intersection(box(1, 0, 2, 1)))  # a shared edge: a line
    assert empty.geom_type == "Polygon" and empty.is_empty
    clipped = polygonal_or_empty(box(0, 0, 10, 10).intersection(box(5, 5, 20, 20)))
    assert clipped.area == 25.0
