"""The HTTP layer of ``zeus serve`` (FastAPI): routes, Host/Origin checks, token, body limits, JSON errors, OpenAPI.

- ``GET /health`` (no token): ``{"status": "ok"}``.
- ``GET /version`` (token): versions, the default model, loaded models, cached slides, cache counters, limits,
  ``api`` (:data:`~.service_schema.API_VERSION`) and ``capabilities`` (the QuPath extension's handshake).
- ``POST /segment`` (token): a :class:`~.service_schema.SegmentBody`; answers a QuPath GeoJSON
  FeatureCollection of ZEUS annotations in level-0 px, with the headers ``X-Zeus-Patches`` (patches
  scored), ``X-Zeus-Embedded`` (patches embedded for this request), ``X-Zeus-Region-Patches`` (grid patches
  the request covers: the region's, or the slide's), ``X-Zeus-Sampling`` (what the sampling rule did, compact
  JSON: ``{"mode": "exact"}``, or with ``adaptive`` the patches it read, scored and skipped and its rounds)
  and ``Server-Timing``.
- ``POST /learn`` (token): a :class:`~.service_schema.LearnBody` (a QuPath project under a ``--root``); learns an
  adapter from the project's corrections, writes it to ``<project>/zeus/adapter-<hash>.npz`` and answers its
  path and the cross-validation table (:mod:`.service_learn`).
- ``GET /openapi.json`` (no token): this API's OpenAPI description.

Every answer that is not a success is ``{"error": "one line"}`` with a 4xx status (500 only for a bug,
whose traceback goes to the service log). Every request must carry a Host header naming this service
(a loopback name, the address it listens on, or an ``--allowed-host``), so a web page cannot reach it
through DNS rebinding; a request with an ``Origin`` header (sent by browsers) is refused unless that
origin was allowed with ``--allow-origin``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from zeus_qupath import __version__
from zeus_qupath.errors import ZeusError

from .service import ZeusService
from .service_schema import API_VERSION, ErrorBody, LearnBody, RequestError, SegmentBody

log = logging.getLogger("zeus_qupath.bridge.service")

DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) at most this much of a refused body, so the client sees the answer
MAX_ERROR_CHARS = 300
ROUTES = {"/health": "GET", "/version": "GET", "/segment": "POST", "/learn": "POST", "/openapi.json": "GET"}

DESCRIPTION = """The local ZEUS service that `groovy/zeus_segment_current_image.groovy` calls from QuPath.

* **Token**: every request but `GET /health` and `GET /openapi.json` needs `Authorization: Bearer <token>`
  (the token `zeus serve` printed, or `$ZEUS_TOKEN`).
* **Files**: `slide`, `prompts`, `model` and `pretrained` files must lie under the folders the service was
  started with (`--root`); `..` and symlinks leading outside are refused (403).
* **Errors**: `{"error": "one line"}` with 400 (malformed), 401 (token), 403 (outside the folders, Host or
  Origin refused), 404 (missing), 405, 411/413/415 (body), 422 (a value that cannot be used, e.g. a
  region outside the image or over the limits), 503 (too many requests at once).
* **Answer of `POST /segment`**: a QuPath GeoJSON FeatureCollection (`objectType: annotation`, class
  `Tumor`, name `ZEUS Tumor`, measurements) in level-0 px, clipped to the tissue and to the region.
"""


def _one_line(text: object) -> str:
    lines = [s.strip() for s in str(text).strip().splitlines() if s.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": _one_line(message) or "error"}, status_code=status,
                        headers={"Cache-Control": "no-store", **(headers or {})})


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON: 415 not JSON, 413 over ``limit`` bytes, 400 unreadable (no NaN/Infinity)."""
    mime = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if mime != "application/json":
        raise RequestError(415, "send the request body as JSON with 'Content-Type: application/json'")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, "Content-Length must be a number")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            if size > DRAIN_LIMIT:
                break
            continue  # drain a moderately large body so that the client reads the answer
        chunks.append(chunk)
    if size > limit:
        raise RequestError(413, f"request body of {size}{'+' if size > DRAIN_LIMIT else ''} bytes is over the "
                                f"limit of {limit} bytes")
    try:
        text = b"".join(chunks).decode("utf-8")
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


def capabilities(app: FastAPI) -> list[str]:
    """What this service offers, for clients' menus: ``segment``, ``region``, ``learn`` with a /learn route, and
    ``sampling`` (a /segment body may name ``"sampling": "exact" | "adaptive"``)."""
    paths = {getattr(route, "path", "") for route in app.routes}
    return ["segment", "region"] + (["learn"] if "/learn" in paths else []) + ["sampling"]


def create_app(service: ZeusService) -> FastAPI:
    """The FastAPI application answering for ``service``."""
    app = FastAPI(title="zeus-qupath service", version=__version__, description=DESCRIPTION,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 422)}

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code == 404:
            message = f"no endpoint {path[:100]}: use GET /health, GET /version, POST /segment or POST /learn"
        elif exc.status_code == 405:
            allowed = ROUTES.get(path.rstrip("/") or "/", "GET")
            return error_response(405, f"{path} answers {allowed}, not {request.method}", {"Allow": allowed})
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return error_response(400, f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("error while answering %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {_one_line(exc)} (details in the "
                                   "service log)")

    if service.allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=sorted(service.allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["X-Zeus-Patches", "X-Zeus-Embedded", "X-Zeus-Region-Patches",
                                           "X-Zeus-Sampling", "Server-Timing"])

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Any:  # outermost: before CORS and routing
        try:
            service.check_host(request.headers.get("host"), request.headers.get("origin"))
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        return await call_next(request)

    def authorize(request: Request) -> None:
        service.check_token(request.headers.get("authorization"))

    @app.get("/health", summary="Is the service up? (no token)")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/version", summary="Versions, models, cache and limits", responses=errors,
             openapi_extra={"security": [{"HTTPBearer": []}]})
    def version(request: Request) -> dict[str, Any]:
        authorize(request)
        return {**service.version_info(), "api": API_VERSION, "capabilities": capabilities(app)}

    body_schema = SegmentBody.model_json_schema(ref_template="#/components/schemas/{model}")
    nested = body_schema.pop("$defs", {})

    @app.post(
        "/segment", summary="Segment a slide, or a region of it, into QuPath annotations", responses={
            **errors, 200: {"description": "a QuPath GeoJSON FeatureCollection (level-0 px)", "headers": {
                "X-Zeus-Patches": {"description": "patches scored", "schema": {"type": "integer"}},
                "X-Zeus-Embedded": {"description": "patches embedded for this request", "schema": {"type": "integer"}},
                "X-Zeus-Region-Patches": {"description": "grid patches the request covers (the region's, or the "
                                                         "slide's)", "schema": {"type": "integer"}},
                "X-Zeus-Sampling": {"description": "what the sampling rule did, as compact JSON: mode, and with "
                                                   "adaptive grid_patches, embedded (read), scored, skipped, rounds, "
                                                   "embedded_now", "schema": {"type": "string"}},
            }}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}},
                       "security": [{"HTTPBearer": []}]})
    async def segment(request: Request) -> JSONResponse:
        authorize(request)
        body = await read_json(request, service.config.max_request_bytes)
        try:
            parsed = service.parse_segment_request(body)
            result = await run_in_threadpool(service.segment, parsed)
        except RequestError:
            raise
        except ZeusError as exc:  # the slide, prompts or model cannot be used: the user's input, not a bug
            raise RequestError(422, _one_line(exc) or type(exc).__name__) from None
        timing = ", ".join(f"{k};dur={v * 1000:.0f}" for k, v in result.seconds.items())
        return JSONResponse(result.outline.feature_collection(), headers={
            "X-Zeus-Patches": str(result.patches), "X-Zeus-Embedded": str(result.embedded),
            "X-Zeus-Region-Patches": str(result.covered),
            "X-Zeus-Sampling": json.dumps(result.sampling, separators=(",", ":")),
            "Server-Timing": timing, "Cache-Control": "no-store"})

    learn_schema = LearnBody.model_json_schema(ref_template="#/components/schemas/{model}")

    @app.post(
        "/learn", summary="Learn an adapter from a QuPath project's corrections, written into the project",
        responses={**errors, 200: {"description": "written, adapter (its path in <project>/zeus/ or null), sha256, "
                                                  "cv (the cross-validation table), table, message, notes"}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": learn_schema}}},
                       "security": [{"HTTPBearer": []}]})
    async def learn(request: Request) -> JSONResponse:
        authorize(request)
        body = await read_json(request, service.config.max_request_bytes)
        try:
            parsed = service.learner.parse(body)
            result = await run_in_threadpool(service.learner.learn, parsed)
        except RequestError:
            raise
        except ZeusError as exc:  # nothing to learn from, bad corrections, a project it cannot write to
            raise RequestError(422, _one_line(exc) or type(exc).__name__) from None
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {}).update({"SegmentBody": body_schema, "LearnBody": learn_schema,
                                                         **nested})
            components.setdefault("securitySchemes", {})["HTTPBearer"] = {
                "type": "http", "scheme": "bearer", "description": "the token zeus serve printed (or $ZEUS_TOKEN)"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
