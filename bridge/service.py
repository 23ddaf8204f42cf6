"""``zeus serve``: the local HTTP service that QuPath's Groovy scripts call to segment the open image.

Endpoints (JSON in, JSON out; errors are ``{"error": "one line"}``, never a traceback):

- ``GET /health`` (no token): ``{"status": "ok"}``.
- ``GET /version`` (token): versions, the default model, loaded models, cached slides, cache counters.
- ``POST /segment`` (token): ``{"slide": path, "region": optional, "model": optional, "pretrained":
  optional, "prompts": optional, "threshold": optional, "positive_class": optional}`` answers a QuPath
  GeoJSON FeatureCollection of ZEUS annotations in level-0 px. ``region`` is a level-0 rectangle
  ``{"x", "y", "width", "height"}`` or a GeoJSON Polygon/MultiPolygon geometry (what QuPath's
  ``GsonTools`` writes for a ROI); with it only the patches whose area meets the region are embedded
  and the polygons are clipped to it. ``prompts`` is a bundled prompt set's name (``spindle_cell``)
  or the path of a prompt file under the service's folders. ``threshold`` is ``"zeus"`` (default),
  ``"argmax"``, ``"prob:P"`` or a number P in (0, 1). Response headers ``X-Zeus-Patches`` (patches
  scored), ``X-Zeus-Embedded`` (patches embedded for this request) and ``Server-Timing`` tell what it cost.

Every request but ``/health`` needs ``Authorization: Bearer <token>``. Slide, prompt and model files
named by a request must resolve (real path, symlinks followed) inside one of the configured folders.

Reuse: models load once per (spec, pretrained) and stay; text prototypes are cached per model and
prompt file; each slide's patch embeddings live in an :class:`~.embedding_cache.EmbeddingCache`, so
a second request on a slide (other prompts, another threshold, a region already seen) only scores
and draws polygons. Requests run concurrently (one thread each); calls into a model are serialised
by one lock.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box, shape
from shapely.geometry.base import BaseGeometry

from zeus_qupath import __version__
from zeus_qupath.annotations import build_annotations
from zeus_qupath.errors import ZeusError
from zeus_qupath.geojson import feature_collection
from zeus_qupath.grid import PatchGrid, make_grid
from zeus_qupath.models import DEFAULT_MODEL, Encoder, load_encoder
from zeus_qupath.polygons import tissue_geometry
from zeus_qupath.prompts import PromptSet, class_prototypes, load_prompts
from zeus_qupath.reader import RegionReader
from zeus_qupath.reconstruct import Threshold
from zeus_qupath.run import versions
from zeus_qupath.samples import PROMPTS_DIR
from zeus_qupath.scores import PatchScores
from zeus_qupath.scoring import cosine_scores
from zeus_qupath.segment import SegmentParams, patch_geometry, polygons_from_scores
from zeus_qupath.slide import Slide
from zeus_qupath.tissue import detect_tissue, full_tissue

from .embedding_cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, EmbeddingCache, SlideEmbeddings, SlideKey

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) at most this much of a refused body, so the client sees the answer
PROTOTYPE_CACHE_SIZE = 64
REQUEST_FIELDS = ("slide", "region", "model", "pretrained", "prompts", "threshold", "positive_class")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServiceConfig:
    """How ``zeus serve`` runs. ``roots`` are the folders whose files requests may name."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None  # None: the environment variable ``token_env``, else a new random token
    token_env: str = "ZEUS_TOKEN"
    roots: tuple[str, ...] = ()
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    prompts: str = "spindle_cell"  # a bundled prompt set's name or a prompt file (trusted: set by the operator)
    positive_class: str | None = None  # default positive class (else the prompt file's)
    device: str = "auto"
    precision: str = "auto"
    params: SegmentParams = field(default_factory=SegmentParams)  # patch geometry, batch size, default threshold
    cache_slides: int = DEFAULT_MAX_ENTRIES
    cache_bytes: int = DEFAULT_MAX_BYTES


class RequestError(Exception):
    """A request the service refuses: an HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class SegmentRequest:
    """A validated ``POST /segment`` body (paths are real paths inside the allowed folders)."""

    slide: Path
    region: BaseGeometry | None
    model: str
    pretrained: str | None
    prompts: Path
    threshold: Threshold
    positive_class: str | None


@dataclass
class SegmentResult:
    collection: dict[str, Any]
    patches: int  # patches scored for this answer
    embedded: int  # patches embedded for this request (0 when every feature was cached)
    seconds: dict[str, float]


def resolve_token(config: ServiceConfig) -> tuple[str, str]:
    """(token, where it came from: ``"config"``, ``"env"`` or ``"generated"``)."""
    if config.token:
        return config.token, "config"
    env = os.environ.get(config.token_env, "").strip() if config.token_env else ""
    if env:
        return env, "env"
    return secrets.token_urlsafe(32), "generated"


def _one_line(text: object) -> str:
    lines = [s.strip() for s in str(text).strip().splitlines() if s.strip()]
    return lines[0] if lines else ""


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Only the areal parts of ``geom`` (a Polygon, a MultiPolygon or an empty Polygon)."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    return shapely.union_all(parts) if parts else Polygon()


def parse_region(value: Any) -> BaseGeometry:
    """A request's ``region``: ``{"x", "y", "width", "height"}`` or a GeoJSON (Multi)Polygon (or a Feature of one)."""
    usage = "region must be a rectangle {x, y, width, height} or a GeoJSON Polygon geometry (level-0 px)"
    if not isinstance(value, dict):
        raise RequestError(400, usage)
    if value.get("type") == "Feature":
        value = value.get("geometry")
        if not isinstance(value, dict):
            raise RequestError(400, usage)
    if "type" in value:
        if value["type"] not in ("Polygon", "MultiPolygon"):
            raise RequestError(422, f"region: a {value['type']!r} has no area; send a Polygon or MultiPolygon")
        try:
            geom = shape(value)
            coords = shapely.get_coordinates(geom)
        except Exception:  # shapely raises many kinds for malformed coordinates
            raise RequestError(400, "region: malformed GeoJSON coordinates") from None
        if not np.all(np.isfinite(coords)):
            raise RequestError(400, "region: coordinates must be finite numbers")
    elif {"x", "y", "width", "height"} <= set(value):
        nums = [value[k] for k in ("x", "y", "width", "height")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in nums):
            raise RequestError(400, "region: x, y, width and height must be finite numbers")
        x, y, w, h = (float(v) for v in nums)
        if w <= 0 or h <= 0:
            raise RequestError(422, "region: width and height must be positive")
        geom = box(x, y, x + w, y + h)
    else:
        raise RequestError(400, usage)
    geom = _polygonal(shapely.make_valid(geom))
    if geom.is_empty or geom.area <= 0:
        raise RequestError(422, "region has no area")
    return geom


def parse_threshold(value: Any, default: Threshold) -> Threshold:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RequestError(400, "threshold must be \"zeus\", \"argmax\", \"prob:P\" or a number P")
    if isinstance(value, str):
        try:
            return Threshold.parse(value)
        except ZeusError as exc:
            raise RequestError(422, str(exc).replace("--threshold", "threshold")) from None
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise RequestError(422, f"threshold must lie strictly between 0 and 1, got {value}")
    return Threshold("prob", float(value))


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith("~") or Path(text).exists()


class ZeusService:
    """The service's state and work, without HTTP: request checks, model/prompt/embedding reuse, segmenting."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        if config.max_request_bytes < 1:
            raise ZeusError("the request size limit must be positive")
        self.roots = self._resolve_roots(config.roots)
        self.token, self.token_source = resolve_token(config)
        self.default_model = (config.model.strip(), config.pretrained)
        self.default_threshold = config.params.threshold
        self.default_prompts = self._default_prompts(config.prompts)
        self.cache = EmbeddingCache(config.cache_slides, config.cache_bytes)
        self.model_lock = threading.Lock()  # one model call at a time
        self._models: dict[tuple[str, str | None], Encoder] = {}
        self._model_loading: dict[tuple[str, str | None], threading.Lock] = {}
        self._models_lock = threading.Lock()
        self._prototypes: OrderedDict[tuple[Any, ...], tuple[PromptSet, np.ndarray]] = OrderedDict()
        self._prototypes_lock = threading.Lock()
        self.started = time.time()
        # fail fast: the default model and prompts must work before the service answers anything
        self.encoder(*self.default_model)
        self.prototypes(*self.default_model, self.default_prompts, config.positive_class)

    # -- startup ------------------------------------------------------------------------------------
    @staticmethod
    def _resolve_roots(roots: tuple[str, ...]) -> tuple[Path, ...]:
        if not roots:
            raise ZeusError("no slide folders given: pass --root DIR for each folder whose slides QuPath may send")
        out = []
        for root in roots:
            real = Path(os.path.realpath(Path(root).expanduser()))
            if not real.is_dir():
                raise ZeusError(f"--root {root} is not a folder")
            out.append(real)
        return tuple(dict.fromkeys(out))

    @staticmethod
    def _default_prompts(value: str) -> Path:
        bundled = ZeusService._bundled_prompts(value)
        if bundled is not None:
            return bundled
        path = Path(value).expanduser()
        if not path.is_file():
            available = ", ".join(ZeusService.bundled_prompt_names())
            raise ZeusError(f"prompt set {value!r} is neither a bundled set ({available}) nor a file")
        return Path(os.path.realpath(path))

    @staticmethod
    def bundled_prompt_names() -> list[str]:
        return sorted(p.stem for p in PROMPTS_DIR.glob("*.json"))

    @staticmethod
    def _bundled_prompts(name: str) -> Path | None:
        if "/" in name or "\\" in name:
            return None
        stem = name[:-5] if name.endswith(".json") else name
        path = PROMPTS_DIR / f"{stem}.json"
        return path if stem and path.is_file() else None

    # -- request checks -----------------------------------------------------------------------------
    def check_path(self, value: Any, what: str, *, directory: bool = False) -> Path:
        """The real path of ``value`` if it lies inside an allowed folder and exists (else 400/403/404)."""
        if not isinstance(value, str) or not value.strip():
            raise RequestError(400, f"{what} must be a non-empty string (a path)")
        if "\x00" in value:
            raise RequestError(400, f"{what} path contains a NUL character")
        path = Path(value)
        if not path.is_absolute():
            raise RequestError(400, f"{what} must be an absolute path, got {value!r}")
        if ".." in path.parts:
            raise RequestError(403, f"{what} path must not contain '..': {value}")
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(root) for root in self.roots):
            raise RequestError(403, f"{what} {value} is outside the folders this service may read "
                                    "(start zeus serve with --root FOLDER)")
        if not real.exists():
            raise RequestError(404, f"{what} not found: {value}")
        if directory and not real.is_dir():
            raise RequestError(404, f"{what} is not a folder: {value}")
        if not directory and not real.is_file() and not (what == "pretrained" and real.is_dir()):
            raise RequestError(404, f"{what} is not a file: {value}")
        return real

    def resolve_prompts(self, value: Any) -> Path:
        if value is None:
            return self.default_prompts
        if not isinstance(value, str) or not value.strip():
            raise RequestError(400, "prompts must be a prompt set's name or the path of a prompt file")
        name = value.strip()
        bundled = self._bundled_prompts(name)
        if bundled is not None:
            return bundled
        if not _looks_like_path(name):
            if name in (self.default_prompts.name, self.default_prompts.stem):
                return self.default_prompts
            available = ", ".join(self.bundled_prompt_names())
            raise RequestError(404, f"no prompt set {name!r}: use one of {available}, "
                                    "or the path of a prompt file under the service's folders")
        return self.check_path(name, "prompt file")

    def resolve_model(self, model: Any, pretrained: Any) -> tuple[str, str | None]:
        """(spec, pretrained) of a request; files it names must lie inside the allowed folders."""
        if model is None and pretrained is None:
            return self.default_model
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise RequestError(400, "model must be a preset name or open_clip:NAME_OR_CONFIG_JSON")
        if pretrained is not None and (not isinstance(pretrained, str) or not pretrained.strip()):
            raise RequestError(400, "pretrained must be a tag, a checkpoint file or a weights folder")
        spec = model.strip() if model is not None else self.default_model[0]
        if pretrained is None and spec == self.default_model[0]:
            pretrained = self.default_model[1]
        if (spec, pretrained) == self.default_model:
            return self.default_model
        if spec.startswith("open_clip:"):
            rest = spec[len("open_clip:"):]
            if rest.startswith("local-dir:"):
                spec = "open_clip:local-dir:" + str(self.check_path(rest[len("local-dir:"):], "model folder",
                                                                     directory=True))
            elif rest.endswith(".json") or _looks_like_path(rest):
                spec = "open_clip:" + str(self.check_path(rest, "model config"))
        if pretrained is not None and _looks_like_path(pretrained):
            pretrained = str(self.check_path(pretrained, "pretrained"))
        return spec, pretrained

    def parse_segment_request(self, body: Any) -> SegmentRequest:
        """Validate a ``POST /segment`` body (400 bad shape, 403 outside the folders, 404 missing, 422 unusable)."""
        if not isinstance(body, dict):
            raise RequestError(400, "the request must be a JSON object like {\"slide\": \"/path/to/slide.svs\"}")
        unknown = sorted(set(body) - set(REQUEST_FIELDS))
        if unknown:
            raise RequestError(400, f"unknown field {unknown[0]!r}; known fields: {', '.join(REQUEST_FIELDS)}")
        if "slide" not in body:
            raise RequestError(400, "missing field 'slide' (the path of the slide file)")
        positive = body.get("positive_class")
        if positive is not None and (not isinstance(positive, str) or not positive.strip()):
            raise RequestError(400, "positive_class must be a class name")
        region = parse_region(body["region"]) if body.get("region") is not None else None
        threshold = parse_threshold(body.get("threshold"), self.default_threshold)
        slide = self.check_path(body["slide"], "slide")
        prompts = self.resolve_prompts(body.get("prompts"))
        model, pretrained = self.resolve_model(body.get("model"), body.get("pretrained"))
        return SegmentRequest(
            slide=slide,
            region=region,
            model=model,
            pretrained=pretrained,
            prompts=prompts,
            threshold=threshold,
            positive_class=positive.strip() if positive else self.config.positive_class,
        )

    # -- reuse: models, prototypes, slide entries -----------------------------------------------------
    def encoder(self, model: str, pretrained: str | None) -> Encoder:
        """The encoder of (model, pretrained), loaded on first use and kept."""
        key = (model, pretrained)
        with self._models_lock:
            if key in self._models:
                return self._models[key]
            loading = self._model_loading.setdefault(key, threading.Lock())
        with loading:
            with self._models_lock:
                if key in self._models:
                    return self._models[key]
            t0 = time.perf_counter()
            enc = load_encoder(model, pretrained, self.config.device, self.config.precision)
            log.info("loaded model %s (%s, dim %d) on %s in %.1f s", model, enc.name, enc.embed_dim, enc.device,
                     time.perf_counter() - t0)
            with self._models_lock:
                self._models[key] = enc
            return enc

    def prototypes(self, model: str, pretrained: str | None, prompts_path: Path,
                   positive_class: str | None) -> tuple[PromptSet, np.ndarray]:
        """The prompt set and its (C, D) class prototypes for one model, cached per file version."""
        st = os.stat(prompts_path)
        key = (model, pretrained, str(prompts_path), st.st_size, st.st_mtime_ns, positive_class)
        with self._prototypes_lock:
            hit = self._prototypes.get(key)
            if hit is not None:
                self._prototypes.move_to_end(key)
                return hit
        prompts = load_prompts(prompts_path, positive_class)
        enc = self.encoder(model, pretrained)
        with self.model_lock:
            protos = class_prototypes(enc, prompts)
        with self._prototypes_lock:
            self._prototypes[key] = (prompts, protos)
            while len(self._prototypes) > PROTOTYPE_CACHE_SIZE:
                self._prototypes.popitem(last=False)
        return prompts, protos

    def slide_entry(self, slide: Path, model: str, pretrained: str | None, enc: Encoder) -> SlideEmbeddings:
        """The cache entry of this slide version, model and patch geometry (tissue and grid made once)."""
        params = self.config.params
        key = SlideKey.for_file(str(slide), model, pretrained, params.patch_size, params.stride,
                                params.target_mpp, params.mpp, params.detect_tissue)

        def create() -> SlideEmbeddings:
            with Slide(slide, mpp=params.mpp) as s:
                info = s.info
                geometry = patch_geometry(params, info.mpp)
                tissue = detect_tissue(s) if params.detect_tissue else full_tissue(info.width, info.height)
            grid = make_grid(info.width, info.height, geometry, tissue)
            return SlideEmbeddings(key, info.width, info.height, info.mpp, tissue, grid, enc.embed_dim,
                                   tissue_outline=tissue_geometry(tissue))

        return self.cache.get_or_create(key, create)

    @staticmethod
    def patches_in(entry: SlideEmbeddings, region: BaseGeometry | None) -> np.ndarray:
        """Grid positions of the patches whose area meets ``region`` (all of them without a region)."""
        n = len(entry.grid)
        if region is None or n == 0:
            return np.arange(n, dtype=np.int64)
        coords = entry.grid.coords
        p = entry.grid.geometry.patch_size_l0
        minx, miny, maxx, maxy = region.bounds
        near = np.flatnonzero((coords[:, 0] + p > minx) & (coords[:, 0] < maxx) &
                              (coords[:, 1] + p > miny) & (coords[:, 1] < maxy))
        if len(near) == 0:
            return near.astype(np.int64)
        x, y = coords[near, 0], coords[near, 1]
        boxes = shapely.box(x, y, x + p, y + p)
        shapely.prepare(region)
        meets = shapely.intersects(region, boxes) & ~shapely.touches(region, boxes)  # interiors overlap
        return near[meets].astype(np.int64)

    def ensure_embedded(self, entry: SlideEmbeddings, indices: np.ndarray, enc: Encoder, slide: Path) -> int:
        """Embed the patches among ``indices`` that the entry lacks; returns how many were embedded."""
        params = self.config.params
        with entry.lock:
            missing = entry.missing(indices)
            if len(missing) == 0:
                return 0
            g = entry.grid
            sub = PatchGrid(g.geometry, g.width, g.height, g.rows, g.cols, g.index[missing])
            reader = RegionReader(str(slide), sub, mpp=params.mpp, batch_size=params.batch_size,
                                  workers=params.workers)
            done = 0
            for batch in reader:
                with self.model_lock:
                    feats = enc.encode_images(batch.pixels)
                entry.store(missing[batch.indices], feats)
                done += len(batch.indices)
                self.cache.record_embedded(len(batch.indices))
            return done

    # -- the work -------------------------------------------------------------------------------------
    def segment(self, req: SegmentRequest) -> SegmentResult:
        """Answer one segment request (embedding only what the cache lacks)."""
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        enc = self.encoder(req.model, req.pretrained)
        prompts, protos = self.prototypes(req.model, req.pretrained, req.prompts, req.positive_class)
        entry = self.slide_entry(req.slide, req.model, req.pretrained, enc)
        seconds["prepare"] = time.perf_counter() - t0
        region = None
        if req.region is not None:
            region = _polygonal(req.region.intersection(box(0, 0, entry.width, entry.height)))
            if region.is_empty or region.area <= 0:
                raise RequestError(422, f"the region lies outside the image ({entry.width} x {entry.height} px)")
        indices = self.patches_in(entry, region)
        t1 = time.perf_counter()
        embedded = self.ensure_embedded(entry, indices, enc, req.slide)
        with entry.lock:
            features = entry.features(indices)
        seconds["embed"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        geometry = entry.grid.geometry
        scores = PatchScores(
            coords=entry.grid.coords[indices],
            scores=cosine_scores(features, protos) if len(indices) else np.zeros((0, len(prompts.classes)),
                                                                                  np.float32),
            classes=tuple(prompts.class_names),
            positive_class=prompts.positive_class,
            patch_size=geometry.patch_size_l0,
            stride=geometry.stride_l0,
            width=entry.width,
            height=entry.height,
            mpp=entry.mpp,
            meta={"logit_scale": enc.logit_scale, "model": req.model, "prompts_sha256": prompts.sha256},
        )
        polygons = self.polygons(scores, entry, region, req.threshold) if len(indices) else []
        collection = feature_collection(build_annotations(polygons, scores))
        seconds["polygons"] = time.perf_counter() - t2
        seconds["total"] = time.perf_counter() - t0
        log.info("segment %s%s: %d patches (%d embedded now), %d regions, %s, %.2f s", req.slide.name,
                 " (region)" if region is not None else "", len(indices), embedded, len(polygons),
                 prompts.source, seconds["total"])
        return SegmentResult(collection, len(indices), embedded, seconds)

    def polygons(self, scores: PatchScores, entry: SlideEmbeddings, region: BaseGeometry | None,
                 threshold: Threshold) -> list[Polygon]:
        """Result polygons (level-0 px), clipped to the tissue and to ``region``.

        With a region, the mask is computed on a window around it (the region's bounds grown by one patch,
        so that the blur at every pixel of the region sees exactly what it sees on the whole slide), so
        the cost follows the region's size, not the slide's.
        """
        params = self.config.params
        clip = entry.tissue_outline
        if region is None:
            return polygons_from_scores(scores, threshold, params, clip=clip)
        clip = region if clip is None else _polygonal(clip.intersection(region))
        if clip.is_empty:
            return []
        p, s = scores.patch_size, scores.stride
        minx, miny, maxx, maxy = region.bounds
        ox = max(0, math.floor((minx - p) / s) * s)
        oy = max(0, math.floor((miny - p) / s) * s)
        ex = min(scores.width, math.ceil(maxx + p))
        ey = min(scores.height, math.ceil(maxy + p))
        window = replace(scores, coords=scores.coords - np.array([ox, oy], dtype=np.int64), width=ex - ox,
                         height=ey - oy)
        polys = polygons_from_scores(window, threshold, params, clip=affinity.translate(clip, -ox, -oy))
        return [affinity.translate(poly, ox, oy) for poly in polys]

    def version_info(self) -> dict[str, Any]:
        enc = self.encoder(*self.default_model)
        with self._models_lock:
            loaded = [{"model": m, "pretrained": Path(p).name if p else None, "name": e.name,
                       "embed_dim": e.embed_dim, "device": str(e.device)} for (m, p), e in self._models.items()]
        return {
            "zeus_qupath": __version__,
            "versions": versions(),
            "model": {"model": self.default_model[0],
                      "pretrained": Path(self.default_model[1]).name if self.default_model[1] else None,
                      "name": enc.name, "embed_dim": enc.embed_dim, "input_size": enc.preprocess.size,
                      "device": str(enc.device)},
            "models_loaded": loaded,
            "prompts": {"default": self.default_prompts.stem, "bundled": self.bundled_prompt_names()},
            "threshold": str(self.default_threshold),
            "slides": [{"slide": e.key.realpath, "width": e.width, "height": e.height, "model": e.key.model,
                        "patches": len(e.grid), "embedded": e.embedded} for e in self.cache.entries()],
            "cache": asdict(self.cache.stats()),
            "roots": [str(r) for r in self.roots],
            "uptime_s": round(time.time() - self.started, 1),
        }


# ------------------------------------------------------------------------------------------------- HTTP

_ROUTES = {"/health": ("GET", False), "/version": ("GET", True), "/segment": ("POST", True)}


class _Handler(BaseHTTPRequestHandler):
    """One HTTP request: routes, token, size and type checks, JSON answers (errors included)."""

    server: ZeusHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = f"zeus-qupath/{__version__}"
    sys_version = ""
    timeout = 120  # seconds a client may stall while sending; processing time is not limited
    _body_done = False

    # -- methods ------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_POST  # all answered 405 by _dispatch

    # -- plumbing -----------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        log.info("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own errors (bad request line, unknown method, ...) as JSON too."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self.close_connection = True
        self._send_json(code, {"error": _one_line(message) or phrase})

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _discard_body(self) -> None:
        """Read and drop an unread request body, so the client gets the answer (or close the connection)."""
        if self._body_done:
            return
        self._body_done = True
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if self.headers.get("Transfer-Encoding") or length < 0 or length > DRAIN_LIMIT:
            self.close_connection = True
            return
        try:
            while length > 0:
                chunk = self.rfile.read(min(65536, length))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            self.close_connection = True

    def _check_token(self) -> None:
        header = self.headers.get("Authorization")
        challenge = {"WWW-Authenticate": 'Bearer realm="zeus"'}
        if not header:
            raise RequestError(401, "missing token: send the header 'Authorization: Bearer <token>' "
                                    "(the token zeus serve printed, or $ZEUS_TOKEN)", challenge)
        scheme, _, value = header.strip().partition(" ")
        token = self.server.service.token.encode("utf-8")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode("utf-8"), token):
            raise RequestError(401, "wrong token", challenge)

    def _read_json(self) -> Any:
        limit = self.server.service.config.max_request_bytes
        mime = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if mime != "application/json":
            raise RequestError(415, "send the request body as JSON with 'Content-Type: application/json'")
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "send the request body with a Content-Length (no chunked encoding)")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            raise RequestError(411, "send the request body with a Content-Length")
        try:
            length = int(raw_length)
        except ValueError:
            raise RequestError(400, "Content-Length must be a number") from None
        if length < 0:
            raise RequestError(400, "Content-Length must not be negative")
        if length > limit:
            self.close_connection = True
            raise RequestError(413, f"request body of {length} bytes is over the limit of {limit} bytes")
        raw = self.rfile.read(length)
        self._body_done = True
        if len(raw) != length:
            self.close_connection = True
            raise RequestError(400, "the request body ended before Content-Length bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, "the request body is not UTF-8") from None

        def no_constants(name: str) -> Any:
            raise ValueError(f"{name} is not allowed")

        try:
            return json.loads(text, parse_constant=no_constants)
        except json.JSONDecodeError as exc:
            raise RequestError(400, f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:
            raise RequestError(400, f"not valid JSON ({_one_line(exc)})") from None

    def _dispatch(self) -> None:
        self._body_done = False
        service = self.server.service
        method = self.command
        try:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            route = _ROUTES.get(path)
            if route is None:
                raise RequestError(404, f"no endpoint {path}: use GET /health, GET /version or POST /segment")
            allowed, needs_token = route
            if method != allowed:
                raise RequestError(405, f"{path} answers {allowed}, not {method}", {"Allow": allowed})
            if needs_token:
                self._check_token()
            if path == "/health":
                self._discard_body()
                self._send_json(200, {"status": "ok"})
            elif path == "/version":
                self._discard_body()
                self._send_json(200, service.version_info())
            else:
                request = service.parse_segment_request(self._read_json())
                result = service.segment(request)
                timing = ", ".join(f"{k};dur={v * 1000:.0f}" for k, v in result.seconds.items())
                self._send_json(200, result.collection, {
                    "X-Zeus-Patches": str(result.patches),
                    "X-Zeus-Embedded": str(result.embedded),
                    "Server-Timing": timing,
                })
        except RequestError as exc:
            self._fail(exc.status, exc.message, exc.headers)
        except ZeusError as exc:  # the slide, prompts or model cannot be used: the user's input, not a bug
            self._fail(422, _one_line(exc) or type(exc).__name__)
        except (BrokenPipeError, ConnectionResetError):
            log.info("%s: the client went away", self.address_string())
            self.close_connection = True
        except Exception as exc:  # a bug: one line to the client, the traceback to the service log
            log.exception("error while answering %s %s", method, self.path)
            self._fail(500, f"internal error: {type(exc).__name__}: {_one_line(exc)} (details in the service log)")

    def _fail(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._discard_body()
        try:
            self._send_json(status, {"error": _one_line(message)}, headers)
        except OSError:
            self.close_connection = True


class ZeusHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the :class:`ZeusService` its handlers use."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: ZeusService) -> None:
        self.service = service
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"


def make_server(config: ServiceConfig) -> ZeusHTTPServer:
    """Load the default model and prompts (fail fast with a ZeusError) and bind the server (not started)."""
    service = ZeusService(config)
    try:
        return ZeusHTTPServer((config.host, config.port), service)
    except OSError as exc:
        raise ZeusError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None


def serve(config: ServiceConfig, on_ready: Callable[[ZeusHTTPServer], None] | None = None) -> None:
    """Run ``zeus serve`` until interrupted (or ``server.shutdown()``): print the address and token, answer requests.

    ``on_ready(server)`` is called once the server listens (tests use it to stop the server).
    """
    if not logging.getLogger().handlers:  # requests and timings to stderr; other libraries' chatter stays quiet
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s zeus serve: %(message)s")
    log.setLevel(logging.INFO)
    server = make_server(config)
    service = server.service
    print(f"zeus serve: listening on {server.url} (model {config.model}, prompts {service.default_prompts.stem})",
          flush=True)
    print(f"zeus serve: slides may come from: {', '.join(str(r) for r in service.roots)}", flush=True)
    if config.host not in LOOPBACK:
        print(f"zeus serve: warning: listening on {config.host}, not only this computer; every request still "
              "needs the token", flush=True)
    if service.token_source == "generated":
        print(f"zeus serve: token: {service.token}", flush=True)
        print(f"zeus serve: (set TOKEN in the Groovy script to it, or start QuPath with {config.token_env} set to it;"
              f" set {config.token_env} before zeus serve to keep one token)", flush=True)
    else:
        where = f"${config.token_env}" if service.token_source == "env" else "the configuration"
        print(f"zeus serve: token: from {where}", flush=True)
    try:
        if on_ready is not None:
            on_ready(server)
        server.serve_forever()
    except KeyboardInterrupt:
        print("zeus serve: stopped", flush=True)
    finally:
        server.server_close()
