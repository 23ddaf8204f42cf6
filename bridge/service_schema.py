"""``zeus serve``'s request schema and the checks on a request's values, with the HTTP status of each refusal.

The shape of a ``POST /segment`` body is a pydantic model (:class:`SegmentBody`; strict types, no unknown
fields, finite numbers), which is also what ``/openapi.json`` publishes. What a shape cannot say is
checked here: a threshold's grammar and range, a region's coordinates (finite, within
``MAX_COORDINATE``, at most ``max_vertices`` positions) and its area. Every refusal is a
:class:`RequestError` with a 4xx status and one line: 400 for a malformed request, 422 for a well-formed
value that cannot be used.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import shapely
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry

from zeus_qupath.errors import ZeusError
from zeus_qupath.geometry import polygonal_or_empty
from zeus_qupath.params import Threshold

#: the version of this HTTP API (``GET /version`` answers it as ``api``): clients such as the QuPath extension
#: (bridge/extension) compare it with their own and say so on a mismatch; raise it on a change that breaks them
API_VERSION = 1
MAX_COORDINATE = 2.0**31  # level-0 px; no slide is larger
DEFAULT_MAX_REGION_VERTICES = 10_000
MAX_REPAIR_CROSSINGS = 64  # a hand-drawn outline that crosses itself does so a few times


class RequestError(Exception):
    """A request the service refuses: an HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.headers = headers or {}


_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
Coordinate = float  # a JSON number


class Rectangle(BaseModel):
    """A level-0 rectangle."""

    model_config = _STRICT
    x: Coordinate = Field(description="left edge, level-0 px")
    y: Coordinate = Field(description="top edge, level-0 px")
    width: Coordinate = Field(description="level-0 px, > 0")
    height: Coordinate = Field(description="level-0 px, > 0")


class Geometry(BaseModel):
    """A GeoJSON geometry in level-0 px, as QuPath's ``GsonTools`` writes a ROI (only (Multi)Polygons have area)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    type: str = Field(description="Polygon or MultiPolygon")
    coordinates: list[Any] = Field(description="GeoJSON coordinates: rings of [x, y] positions")


class Feature(BaseModel):
    """A GeoJSON Feature whose geometry is the region."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    type: Literal["Feature"]
    geometry: Geometry


class SegmentBody(BaseModel):
    """The body of ``POST /segment``. Only ``slide`` is required; the others default to the service's settings."""

    model_config = _STRICT
    slide: str = Field(description="absolute path of the slide file, inside one of the service's --root folders")
    region: Rectangle | Geometry | Feature | None = Field(
        None, description="segment only inside this area: a rectangle or a GeoJSON (Multi)Polygon, level-0 px")
    model: str | None = Field(None, description="a model preset (e.g. conch) or open_clip:NAME_OR_CONFIG_JSON; "
                                                "several joined by commas average their scores")
    pretrained: str | None = Field(None, description="weights: a tag, a checkpoint file or a folder under a --root")
    prompts: str | None = Field(None, description="a bundled prompt set's name (spindle_cell) or a prompt file "
                                                  "under a --root")
    threshold: str | float | None = Field(
        None, description='"zeus" (ZEUS\'s rule, the default), "argmax", "prob:P", or a number P in (0, 1)')
    positive_class: str | None = Field(None, description="the class to outline (default: the prompt file's)")
    adapter: str | None = Field(None, description="an adapter file zeus learn wrote, under a --root (default: the "
                                                  "service's --adapter); \"none\" scores zero-shot")
    sampling: Literal["exact", "adaptive"] | None = Field(
        None, description='which patches are embedded: "exact" (every patch of the request, as ZEUS) or "adaptive" '
                          "(a coarse lattice, then only the patches that could change the mask); default: the "
                          "service's --sampling")


class LearnBody(BaseModel):
    """The body of ``POST /learn`` (:mod:`.service_learn`). Only ``project`` is required."""

    model_config = _STRICT
    project: str = Field(description="absolute path of a QuPath project folder (or its project.qpproj) under a "
                                     "--root; the adapter is written into <project>/zeus/")
    images: list[str] | None = Field(None, description="the images to learn from (default: those an annotator "
                                                       "changed after ZEUS's import)")
    model: str | None = Field(None, description="one model (default: the service's)")
    pretrained: str | None = Field(None, description="weights: a tag, a checkpoint file or a folder under a --root")
    prompts: str | None = Field(None, description="a bundled prompt set's name or a prompt file under a --root")
    positive_class: str | None = Field(None, description="the class to outline (default: the prompt file's)")
    class_map: dict[str, str] | None = Field(None, description="annotator class -> prompt class (default: classes "
                                                               "the prompts lack are the negative class)")
    force: bool = Field(False, description="write the adapter even when cross-validation finds it no better")


class ErrorBody(BaseModel):
    """Every refusal: one line, no traceback."""

    error: str


FIELDS = tuple(SegmentBody.model_fields)
_USAGE = {
    "slide": "slide must be a string: the absolute path of the slide file",
    "region": "region must be a rectangle {x, y, width, height} or a GeoJSON Polygon geometry (level-0 px), "
              "with finite numbers",
    "threshold": 'threshold must be "zeus", "argmax", "prob:P" or a number P',
    "positive_class": "positive_class must be a class name",
    "model": "model must be a preset name or open_clip:NAME_OR_CONFIG_JSON",
    "pretrained": "pretrained must be a tag, a checkpoint file or a weights folder",
    "prompts": "prompts must be a prompt set's name or the path of a prompt file",
    "adapter": "adapter must be the path of an adapter file (zeus learn) or \"none\"",
    "sampling": 'sampling must be "exact" or "adaptive"',
}


def validate_model(data: Any, model: type[BaseModel], required: str, what: str, example: str,
                   usage: dict[str, str]) -> Any:
    """``data`` as an instance of ``model``, or a 400 that names the first bad field.

    ``required`` is the one field a request must have, ``what`` says what it holds and ``example`` is a value for it
    (both for the messages); ``usage`` maps a field to the line shown when its value is refused.
    """
    fields = tuple(model.model_fields)
    if not isinstance(data, dict):
        raise RequestError(400, f"the request must be a JSON object like {{\"{required}\": \"{example}\"}}")
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r}; known fields: {', '.join(fields)}")
    if required not in data:
        raise RequestError(400, f"missing field {required!r} ({what})")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        raise RequestError(400, usage.get(field, f"{field}: {err['msg']}")) from None
    except RecursionError:
        raise RequestError(400, "the request nests too deeply") from None


def validate_body(data: Any) -> SegmentBody:
    """The body as a :class:`SegmentBody`, or a 400 that names the first bad field."""
    return validate_model(data, SegmentBody, "slide", "the path of the slide file", "/path/to/slide.svs", _USAGE)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ring(value: Any, budget: list[int], max_vertices: int) -> list[tuple[float, float]]:
    usage = "region: a ring must be a list of [x, y] positions"
    if not isinstance(value, list):
        raise RequestError(400, usage)
    budget[0] += len(value)
    if budget[0] > max_vertices:
        raise RequestError(422, f"region has more than {max_vertices} vertices; simplify it or select a smaller area")
    out = []
    for pos in value:
        if not isinstance(pos, list) or not 2 <= len(pos) <= 3 or not all(_number(v) for v in pos):
            raise RequestError(400, usage)
        try:
            x, y = float(pos[0]), float(pos[1])
        except OverflowError:
            raise RequestError(422, f"region: coordinates must lie within +-{MAX_COORDINATE:.0f} px") from None
        if not (math.isfinite(x) and math.isfinite(y)) or max(abs(x), abs(y)) > MAX_COORDINATE:
            raise RequestError(422, f"region: coordinates must be finite and within +-{MAX_COORDINATE:.0f} px")
        out.append((x, y))
    if len(out) < 4:
        raise RequestError(422, "region: a ring needs at least 4 positions (the first repeated last)")
    return out


def _polygon(rings: Any, budget: list[int], max_vertices: int) -> Polygon:
    if not isinstance(rings, list) or not rings:
        raise RequestError(400, "region: a Polygon's coordinates must be a list of rings")
    parts = [_ring(r, budget, max_vertices) for r in rings]
    return Polygon(parts[0], parts[1:])


def crossings_over(geom: BaseGeometry, limit: int, chunk: int = 16) -> bool:
    """Whether the rings of ``geom`` cross (or touch) each other more than ``limit`` times.

    Repairing a self-intersecting outline costs time that grows with its crossings (a 300-vertex random
    polygon: about a minute), so a region is repaired only below a limit. Counted chunk by chunk with an
    R-tree of the ring segments, stopping as soon as the limit is passed: bounded work for any input.
    """
    rings = [shapely.get_coordinates(r) for r in shapely.get_rings(geom)]
    starts, ends, ring_of, pos, size = [], [], [], [], []
    for k, ring in enumerate(rings):
        n = len(ring) - 1
        starts.append(ring[:-1])
        ends.append(ring[1:])
        ring_of.append(np.full(n, k))
        pos.append(np.arange(n))
        size.append(np.full(n, n))
    if not starts:
        return False
    a, b = np.concatenate(starts), np.concatenate(ends)
    ring_id, position, ring_len = np.concatenate(ring_of), np.concatenate(pos), np.concatenate(size)
    segments = shapely.linestrings(np.stack([a, b], axis=1))
    tree = shapely.STRtree(segments)
    count = 0
    for start in range(0, len(segments), chunk):
        i, j = tree.query(segments[start:start + chunk], predicate="intersects")
        i = i + start
        gap = np.abs(position[i] - position[j])
        neighbours = (ring_id[i] == ring_id[j]) & ((gap <= 1) | (gap == ring_len[i] - 1))
        count += int(np.sum((i < j) & ~neighbours))
        if count > limit:
            return True
    return False


def parse_region(value: Rectangle | Geometry | Feature,
                 max_vertices: int = DEFAULT_MAX_REGION_VERTICES) -> BaseGeometry:
    """A request's region as a valid areal geometry (level-0 px): 400 malformed, 422 unusable."""
    if isinstance(value, Rectangle):
        x, y, w, h = value.x, value.y, value.width, value.height
        if max(abs(x), abs(y), abs(w), abs(h)) > MAX_COORDINATE:
            raise RequestError(422, f"region: x, y, width and height must lie within +-{MAX_COORDINATE:.0f} px")
        if w <= 0 or h <= 0:
            raise RequestError(422, "region: width and height must be positive")
        return box(x, y, x + w, y + h)
    geometry = value.geometry if isinstance(value, Feature) else value
    budget = [0]
    if geometry.type == "Polygon":
        geom: BaseGeometry = _polygon(geometry.coordinates, budget, max_vertices)
    elif geometry.type == "MultiPolygon":
        geom = MultiPolygon([_polygon(p, budget, max_vertices) for p in geometry.coordinates])
    else:
        raise RequestError(422, f"region: a {geometry.type!r} has no area; send a Polygon or MultiPolygon")
    if not geom.is_valid:
        if crossings_over(geom, MAX_REPAIR_CROSSINGS):
            raise RequestError(422, f"region crosses itself more than {MAX_REPAIR_CROSSINGS} times; "
                                    "send a valid (non-self-intersecting) outline")
        geom = polygonal_or_empty(geom)  # make_valid, then the areal part
    if geom.is_empty or geom.area <= 0 or not np.isfinite(geom.area):
        raise RequestError(422, "region has no area")
    return geom


def parse_threshold(value: str | float | None, default: Threshold) -> Threshold:
    """A request's threshold (``None``: the service's default)."""
    if value is None:
        return default
    if isinstance(value, str):
        try:
            return Threshold.parse(value)
        except ZeusError as exc:
            raise RequestError(422, str(exc).replace("--threshold", "threshold")) from None
        except (ValueError, OverflowError):
            raise RequestError(422, f"threshold {value[:40]!r} is not \"zeus\", \"argmax\" or \"prob:P\"") from None
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise RequestError(422, f"threshold must lie strictly between 0 and 1, got {value:g}")
    return Threshold("prob", float(value))
