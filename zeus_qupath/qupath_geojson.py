"""QuPath GeoJSON, the one object model: read every version from 0.2 to 0.7, write the 0.4+ layout, mark ZEUS's.

One object model, ``QuPathObject``, for what ZEUS writes and what it reads back from QuPath.

Reading (``read_qupath_geojson``, ``parse_qupath_geojson``): QuPath's GeoJSON changed over the years;
the reader accepts all of these spellings:

- v0.2: ``id: "PathAnnotationObject"`` (the object type hidden in the id), ``classification.colorRGB``
  (a signed ARGB int), measurements as a list of ``{"name", "value"}``; files are often a bare
  list of features or a single ``Feature``.
- v0.3: ``properties.object_type``.
- v0.4 to 0.7: ``properties.objectType``, UUID ids, measurements as a map (``"NaN"`` as a string),
  ``classification.color`` ``[r, g, b]``, derived classes as ``classification.names``,
  ``name``, ``color``, ``isLocked`` and ``nucleusGeometry`` for cells.

Coordinates are level-0 pixels in every version. Coordinates must be finite and within
``MAX_COORDINATE`` px, nesting is bounded. Geometry that is not valid is repaired with
``shapely.make_valid``; polygon objects keep only the polygonal parts of the repair.

Writing (``object_to_feature``, ``objects_to_feature_collection``): the QuPath 0.4+ layout, every
classification with a colour, no NaN. ZEUS's annotations (``annotation_feature``, ``feature_collection``)
go through the same writer after being *marked*: QuPath's coordinate precision (2 decimals), a name
starting with ``ZEUS_NAME_PREFIX`` and measurements with the ROI area (level-0 px^2), vertex count and
centroid it had when written. QuPath keeps custom measurements when an annotator edits an outline, so
an edited object no longer matches; the keep-edits rule (``bridge/edits.py`` and the Groovy import
script) relies on this marker. ZEUS's heatmap tiles (``tile_feature``) carry ``ZEUS score: <Class>``
measurements (``TILE_MEASUREMENT_PREFIX``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import MultiPolygon, Polygon, mapping, shape
from shapely.geometry.base import BaseGeometry

from .errors import GeoJSONError, ZeusError
from .json_input import MAX_DEPTH, max_depth, parse_json, read_json
from .output_set import atomic_open

# --------------------------------------------------------------------------------------------- ZEUS's marker

ZEUS_NAME_PREFIX = "ZEUS"
MEAS_AREA_PX = "ZEUS area px^2"
MEAS_VERTICES = "ZEUS vertex count"
MEAS_CENTROID_X = "ZEUS centroid x"
MEAS_CENTROID_Y = "ZEUS centroid y"
#: every measurement ZEUS writes as part of its marker (``zeus export`` removes them)
ZEUS_MARKER_MEASUREMENTS = (MEAS_AREA_PX, MEAS_VERTICES, MEAS_CENTROID_X, MEAS_CENTROID_Y)
#: a heatmap tile's class score measurement is ``TILE_MEASUREMENT_PREFIX + <Class>``
TILE_MEASUREMENT_PREFIX = "ZEUS score: "
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


log = logging.getLogger(__name__)

#: v0.2 stored the Java class name in ``id``; these map it to the 0.4+ ``objectType``.
LEGACY_TYPE_IDS: dict[str, str] = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}
_TYPE_ALIASES: dict[str, str] = {
    "annotation": "annotation",
    "detection": "detection",
    "cell": "cell",
    "tile": "tile",
    "tmacore": "tmaCore",
    "tma_core": "tmaCore",
    "root": "root",
    "unknown": "annotation",  # QuPath itself creates an annotation for an untyped feature
}
_POLYGONAL = ("Polygon", "MultiPolygon")
MAX_COORDINATE = float(1 << 31)  # level-0 px; no slide reader opens anything larger
# properties that QuPathObject holds in normalised form; everything else is carried through as is
_NORMALISED_KEYS = {"objectType", "object_type", "type", "name", "color", "classification", "isLocked",
                    "measurements"}

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class QuPathObject:
    """One QuPath object, as read from GeoJSON or to be written (geometry in level-0 pixels)."""

    geometry: BaseGeometry
    object_type: str = "annotation"  # "annotation", "detection", "cell", "tile", "tmaCore", "root"
    class_name: str | None = None  # derived classes joined as QuPath prints them: "Tumor: Positive"
    color: RGB | None = None  # colour of the classification
    name: str | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    id: str | None = None  # UUID (QuPath >= 0.4); None for v0.2/v0.3 files
    properties: dict[str, Any] = field(default_factory=dict)  # raw properties as read
    object_color: RGB | None = None  # the object's own colour ("color" property), rarely set
    is_locked: bool = False
    nucleus_geometry: BaseGeometry | None = None  # cells only


# --------------------------------------------------------------------------------------------- reading


def read_qupath_geojson(path: str | os.PathLike[str]) -> list[QuPathObject]:
    """Read a QuPath GeoJSON file (any version 0.2 to 0.7) into ``QuPathObject`` values.

    Raises ``GeoJSONError`` (one line naming the file) for malformed JSON or structure.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise GeoJSONError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GeoJSONError(f"{p}: cannot read ({exc})") from None
    data = parse_json(text, str(p), GeoJSONError)
    return parse_qupath_geojson(data, source=str(p))


def parse_qupath_geojson(data: Any, source: str = "<geojson>") -> list[QuPathObject]:
    """Turn decoded QuPath GeoJSON (FeatureCollection, list of features or one Feature) into objects.

    Refuses (one-line ``GeoJSONError``) nesting deeper than JSON input allows, coordinates that are not
    finite numbers or lie beyond ``MAX_COORDINATE`` px, and malformed coordinate arrays.
    """
    if max_depth(data) > MAX_DEPTH:
        raise GeoJSONError(f"{source}: JSON nested too deeply (more than {MAX_DEPTH} levels)")
    features = _features_of(data, source)
    objects: list[QuPathObject] = []
    for index, feature in enumerate(features):
        obj = feature_to_object(feature, source=f"{source}: feature {index}")
        if obj is not None:
            objects.append(obj)
    return objects


def _features_of(data: Any, source: str) -> list[Any]:
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        raise GeoJSONError(f"{source}: expected a GeoJSON object or a list of features, got {type(data).__name__}")
    kind = data.get("type")
    if kind == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise GeoJSONError(f"{source}: FeatureCollection without a 'features' list")
        return features
    if kind == "Feature" or ("geometry" in data and "properties" in data):
        return [data]
    raise GeoJSONError(f"{source}: expected a FeatureCollection, a Feature or a list of features (type={kind!r})")


def feature_to_object(feature: Any, source: str = "<feature>") -> QuPathObject | None:
    """Convert one GeoJSON feature; ``None`` when nothing of its geometry survives repair."""
    if not isinstance(feature, dict):
        raise GeoJSONError(f"{source}: a feature must be a JSON object, got {type(feature).__name__}")
    props = feature.get("properties") or {}
    if not isinstance(props, dict):
        raise GeoJSONError(f"{source}: 'properties' must be an object")

    raw_id = feature.get("id")
    object_id: str | None = None
    object_type = "annotation"
    if isinstance(raw_id, str) and raw_id in LEGACY_TYPE_IDS:
        object_type = LEGACY_TYPE_IDS[raw_id]
    elif raw_id is not None:
        object_id = str(raw_id)
    for key in ("objectType", "object_type", "type"):
        if isinstance(props.get(key), str):
            object_type = _TYPE_ALIASES.get(props[key].lower(), props[key])
            break

    geometry = _geometry(feature.get("geometry"), source)
    if geometry is None:
        log.warning("%s: geometry is empty after repair; object skipped", source)
        return None
    nucleus = None
    if feature.get("nucleusGeometry") is not None:
        nucleus = _geometry(feature["nucleusGeometry"], f"{source} nucleusGeometry")

    class_name, class_rgb = _classification(props.get("classification"), source)
    if class_name is not None and class_rgb is None:
        class_rgb = tuple(class_color(class_name))  # type: ignore[assignment]
    name = props.get("name")
    return QuPathObject(
        geometry=geometry,
        object_type=object_type,
        class_name=class_name,
        color=class_rgb,
        name=str(name) if name is not None else None,
        measurements=_measurements(props.get("measurements"), source),
        id=object_id,
        properties=dict(props),
        object_color=_color(props.get("color")),
        is_locked=bool(props.get("isLocked", False)),
        nucleus_geometry=nucleus,
    )


def _geometry(geojson_geometry: Any, source: str) -> BaseGeometry | None:
    if not isinstance(geojson_geometry, dict) or "type" not in geojson_geometry:
        raise GeoJSONError(f"{source}: missing or malformed 'geometry'")
    check_geometry(geojson_geometry, source)
    try:
        geom = shapely.force_2d(shape(geojson_geometry))
    except Exception as exc:  # shapely raises several types for bad coordinates
        raise GeoJSONError(f"{source}: invalid {geojson_geometry.get('type')} geometry ({exc})") from None
    if geom.is_empty:
        return None
    return repair_geometry(geom)


# nesting of "coordinates" per geometry type: a position is depth 0
_COORDINATE_DEPTH = {"Point": 0, "MultiPoint": 1, "LineString": 1, "MultiLineString": 2, "Polygon": 2,
                     "MultiPolygon": 3}
MAX_COLLECTION_DEPTH = 8


def check_geometry(geometry: Any, source: str, _level: int = 0) -> None:
    """Refuse a GeoJSON geometry whose coordinates are not finite numbers within ``MAX_COORDINATE`` px.

    Checked before shapely sees it: shapely accepts NaN and infinite coordinates, and QuPath's pixel space
    ends long before 1e12 (where rasterising loses every pixel to floating-point error).
    """
    if not isinstance(geometry, dict):
        raise GeoJSONError(f"{source}: a geometry must be a JSON object")
    kind = geometry.get("type")
    if kind == "GeometryCollection":
        parts = geometry.get("geometries")
        if not isinstance(parts, list):
            raise GeoJSONError(f"{source}: GeometryCollection without a 'geometries' list")
        if _level >= MAX_COLLECTION_DEPTH:
            raise GeoJSONError(f"{source}: GeometryCollections nested more than {MAX_COLLECTION_DEPTH} deep")
        for part in parts:
            check_geometry(part, source, _level + 1)
        return
    if kind not in _COORDINATE_DEPTH:
        raise GeoJSONError(f"{source}: unknown geometry type {kind!r}")
    stack: list[tuple[Any, int]] = [(geometry.get("coordinates"), _COORDINATE_DEPTH[kind])]
    while stack:
        value, depth = stack.pop()
        if not isinstance(value, list):
            raise GeoJSONError(f"{source}: {kind} coordinates must be nested lists of [x, y] positions")
        if depth:
            stack.extend((v, depth - 1) for v in value)
            continue
        if len(value) not in (2, 3) or not all(isinstance(c, (int, float)) and not isinstance(c, bool)
                                               for c in value):
            raise GeoJSONError(f"{source}: a position must be [x, y] numbers, got {str(value)[:60]}")
        if not all(math.isfinite(c) and abs(c) <= MAX_COORDINATE for c in value):
            raise GeoJSONError(f"{source}: coordinate {str(value)[:60]} is not a finite pixel position within "
                               f"+-{MAX_COORDINATE:.0e} px")


def repair_geometry(geom: BaseGeometry) -> BaseGeometry | None:
    """``geom`` if valid, else ``make_valid(geom)``; polygons stay polygonal. ``None`` if nothing is left."""
    if geom.is_valid:
        return geom
    fixed = shapely.make_valid(geom)
    if geom.geom_type in _POLYGONAL:
        parts = [p for p in shapely.get_parts(fixed) if p.geom_type in _POLYGONAL and not p.is_empty]
        polys: list[Polygon] = []
        for part in parts:
            polys.extend(part.geoms if isinstance(part, MultiPolygon) else [part])
        if not polys:
            return None
        fixed = polys[0] if len(polys) == 1 else MultiPolygon(polys)
    return None if fixed.is_empty else fixed


def _color(value: Any) -> RGB | None:
    """QuPath colours: ``[r, g, b]`` / ``[r, g, b, a]`` (0.4+) or a packed signed ARGB int (0.2/0.3)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        v = value & 0xFFFFFFFF
        return ((v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF)
    if isinstance(value, (list, tuple)) and len(value) in (3, 4) and all(isinstance(c, (int, float)) for c in value):
        return (int(value[0]), int(value[1]), int(value[2]))
    return None


def _classification(value: Any, source: str) -> tuple[str | None, RGB | None]:
    if value is None:
        return None, None
    if isinstance(value, str):  # QuPath accepts a bare class name
        return value, None
    if not isinstance(value, dict):
        raise GeoJSONError(f"{source}: 'classification' must be an object or a string")
    if not value:  # QuPath's NULL_CLASS
        return None, None
    rgb = _color(value.get("color", value.get("colorRGB")))
    if isinstance(value.get("names"), list) and value["names"]:
        return ": ".join(str(n) for n in value["names"]), rgb
    name = value.get("name")
    if name is None:
        return None, rgb
    parent = value.get("parentClass")  # pre-0.4 default Gson layout of a derived class
    if isinstance(parent, dict):
        parent_name, _ = _classification(parent, source)
        if parent_name:
            return f"{parent_name}: {name}", rgb
    return str(name), rgb


_SPECIAL_FLOATS = {"nan": math.nan, "infinity": math.inf, "inf": math.inf, "-infinity": -math.inf, "-inf": -math.inf}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        special = _SPECIAL_FLOATS.get(value.strip().lower())
        if special is not None:
            return special
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _measurements(value: Any, source: str) -> dict[str, float]:
    out: dict[str, float] = {}
    if value is None:
        return out
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list):  # v0.2/v0.3: [{"name": ..., "value": ...}]
        pairs = []
        for entry in value:
            if not isinstance(entry, dict) or "name" not in entry:
                raise GeoJSONError(f"{source}: measurement list entries need 'name' and 'value'")
            pairs.append((entry["name"], entry.get("value")))
        items = pairs
    else:
        raise GeoJSONError(f"{source}: 'measurements' must be an object or a list")
    for key, raw in items:
        number = _number(raw)
        if number is not None:
            out[str(key)] = number
    return out


# --------------------------------------------------------------------------------------------- writing


def object_to_feature(obj: QuPathObject) -> dict[str, Any]:
    """One feature in the QuPath 0.4+ layout (classification always with a colour, no NaN)."""
    props: dict[str, Any] = {k: v for k, v in obj.properties.items() if k not in _NORMALISED_KEYS}
    out_props: dict[str, Any] = {"objectType": obj.object_type}
    if obj.name is not None:
        out_props["name"] = obj.name
    if obj.object_color is not None:
        out_props["color"] = list(obj.object_color)
    if obj.class_name is not None:
        color = list(obj.color) if obj.color is not None else class_color(obj.class_name)
        names = obj.class_name.split(": ")
        key = ("name", names[0]) if len(names) == 1 else ("names", names)
        out_props["classification"] = {key[0]: key[1], "color": color}
    if obj.is_locked:
        out_props["isLocked"] = True
    measurements = {k: float(v) for k, v in obj.measurements.items() if math.isfinite(float(v))}
    if measurements:
        out_props["measurements"] = measurements
    out_props.update(props)
    feature: dict[str, Any] = {
        "type": "Feature",
        "id": obj.id if obj.id else str(uuid.uuid4()),
        "geometry": mapping(obj.geometry),
    }
    if obj.nucleus_geometry is not None and obj.object_type == "cell":
        feature["nucleusGeometry"] = mapping(obj.nucleus_geometry)
    feature["properties"] = out_props
    return feature


def objects_to_feature_collection(objs: Iterable[QuPathObject]) -> dict[str, Any]:
    """A FeatureCollection in the QuPath 0.4+ layout, readable by QuPath 0.4 to 0.7."""
    return {"type": "FeatureCollection", "features": [object_to_feature(o) for o in objs]}


def class_colors(objs: Iterable[QuPathObject]) -> Mapping[str, RGB]:
    """Class name -> colour of the first object of each class that has one."""
    out: dict[str, RGB] = {}
    for obj in objs:
        if obj.class_name is not None and obj.color is not None:
            out.setdefault(obj.class_name, obj.color)
    return out


def mark_zeus(obj: QuPathObject) -> QuPathObject:
    """``obj`` as ZEUS writes it: QuPath's coordinate precision, a ``ZEUS <Class>`` name, the marker measurements.

    ``obj`` must be a classified Polygon or MultiPolygon; its own measurements that are not finite are dropped
    (QuPath rejects NaN/inf).
    """
    geom = obj.geometry
    if not isinstance(geom, (Polygon, MultiPolygon)):
        raise ValueError(f"annotation geometry must be Polygon or MultiPolygon, not {geom.geom_type}")
    if obj.class_name is None:
        raise ValueError("a ZEUS annotation needs a class")
    geom = shapely.set_precision(geom, COORDINATE_PRECISION)
    measurements = {
        **{str(k): float(v) for k, v in obj.measurements.items() if math.isfinite(float(v))},
        MEAS_AREA_PX: float(geom.area),
        MEAS_VERTICES: float(vertex_count(geom)),
        MEAS_CENTROID_X: float(geom.centroid.x),
        MEAS_CENTROID_Y: float(geom.centroid.y),
    }
    return replace(obj, geometry=geom, measurements=measurements,
                   name=obj.name or f"{ZEUS_NAME_PREFIX} {obj.class_name}")


def annotation_feature(obj: QuPathObject) -> dict[str, Any]:
    """One QuPath GeoJSON ``Feature`` for a ZEUS annotation, marked as written by ZEUS (``mark_zeus``)."""
    return object_to_feature(mark_zeus(obj))


def feature_collection(objs: Iterable[QuPathObject]) -> dict[str, Any]:
    """A QuPath-readable ``FeatureCollection`` of ZEUS annotations (each marked, ``annotation_feature``)."""
    return {"type": "FeatureCollection", "features": [annotation_feature(o) for o in objs]}


def tile_feature(box: tuple[float, float, float, float], measurements: Mapping[str, float]) -> dict[str, Any]:
    """One QuPath ``tile`` detection: the rectangle ``box`` = (x0, y0, x1, y1) with ``measurements``.

    No id (QuPath gives one on import) and no shapely round trip: a slide has tens of thousands of tiles.
    """
    x0, y0, x1, y1 = box
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
        "properties": {"objectType": "tile", "measurements": dict(measurements)},
    }


def write_geojson(path: str | os.PathLike[str], collection: Mapping[str, Any]) -> None:
    """Write a FeatureCollection atomically (temp file + rename)."""
    with atomic_open(path, "w") as fh:
        json.dump(collection, fh, allow_nan=False)


# --------------------------------------------------------------------------------------------- raw features


def read_feature_collection(path: str | os.PathLike[str], what: str,
                            error: type[ZeusError] = GeoJSONError) -> list[Any]:
    """The features of a GeoJSON ``FeatureCollection`` file, as decoded JSON (no geometry built).

    For files of many simple features (heatmap tiles) that the caller checks structurally; one ``error`` line
    naming ``what`` and the file for anything that is not readable, bounded JSON of a FeatureCollection.
    """
    p = Path(path)
    data = read_json(p, what, error)
    features = data.get("features") if isinstance(data, Mapping) and data.get("type") == "FeatureCollection" else None
    if not isinstance(features, list):
        raise error(f"{p}: not a GeoJSON FeatureCollection of {what}")
    return features
