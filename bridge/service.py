"""``zeus serve``: the local service that QuPath's Groovy scripts call to segment the open image.

The HTTP layer (routes, token, Host/Origin checks, JSON errors, OpenAPI) is :mod:`.service_app` on
FastAPI, served by uvicorn; the request schema and value checks are :mod:`.service_schema`; the folders
a request may name are :mod:`.sandbox`. This module holds the service's configuration and state and
turns a checked request into a call of the engine's
:class:`~zeus_qupath.on_demand.OnDemandSegmenter` (the same tissue, grid, embedding, scoring and
polygon steps as ``zeus segment``, and the same two-tier embedding cache), then runs the server.

Endpoints: ``GET /health`` (no token), ``GET /version``, ``POST /segment``, ``POST /learn`` (token; learning
is :mod:`.service_learn`), ``GET /openapi.json`` (no token: the API's description). See :mod:`.service_app`.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zeus_qupath import __version__
from zeus_qupath.adapter import Adapter, applied_identity
from zeus_qupath.embedding_cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, EmbeddingCache
from zeus_qupath.errors import ModelError, ZeusError
from zeus_qupath.models.pool import DEFAULT_MAX_MODELS, ModelPool
from zeus_qupath.models.specs import ModelSpec, parse_model_specs
from zeus_qupath.on_demand import OnDemandSegmenter, SegmentRequest, SegmentResult
from zeus_qupath.params import DEFAULT_MODEL, SegmentParams
from zeus_qupath.prompts import DEFAULT_PROMPT_SET, load_prompts
from zeus_qupath.runs.run import CACHE_DIR, versions
from zeus_qupath.sampling import SamplingRule

from .sandbox import Roots, bundled_prompt_names, bundled_prompts
from .service_learn import ProjectLearner
from .service_schema import DEFAULT_MAX_REGION_VERTICES, RequestError, parse_region, parse_threshold, validate_body

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
DEFAULT_MAX_PATCHES = 1_000_000
MIN_TOKEN_LENGTH = 16
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")


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
    prompts: str = DEFAULT_PROMPT_SET  # a bundled prompt set's name or a prompt file (trusted: set by the operator)
    positive_class: str | None = None  # default positive class (else the prompt file's)
    device: str = "auto"
    precision: str = "auto"
    params: SegmentParams = field(default_factory=SegmentParams)  # patch geometry, batch size, default threshold
    # and default sampling (params.sampling: exact or adaptive; a request's "sampling" overrides it)
    cache_dir: str | None = None  # the embedding cache folder `zeus segment --cache` fills (None: memory only)
    cache_slides: int = DEFAULT_MAX_ENTRIES
    cache_bytes: int = DEFAULT_MAX_BYTES
    max_models: int = DEFAULT_MAX_MODELS
    max_patches: int = DEFAULT_MAX_PATCHES  # patches one request may score
    max_region_vertices: int = DEFAULT_MAX_REGION_VERTICES
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides the loopback names ("*": any)
    allow_origins: tuple[str, ...] = ()  # browser origins allowed to call the service ("*": any)
    adapter: str | None = None  # zeus learn's adapter applied to requests that name none (trusted: the operator's)


def resolve_token(config: ServiceConfig) -> tuple[str, str]:
    """(token, where it came from: ``"config"``, ``"env"`` or ``"generated"``); a short token is refused."""
    if config.token:
        token, source, where = config.token, "config", "the configured token"
    else:
        env = os.environ.get(config.token_env, "").strip() if config.token_env else ""
        if not env:
            return secrets.token_urlsafe(32), "generated"
        token, source, where = env, "env", f"${config.token_env}"
    if len(token) < MIN_TOKEN_LENGTH:
        raise ZeusError(f"{where} has {len(token)} characters; a token needs at least {MIN_TOKEN_LENGTH} "
                        f"(unset {config.token_env} to get a generated one)")
    return token, source


def resolve_cache_dir(value: str | None) -> Path | None:
    """The embedding cache folder: ``value`` itself, or ``value/.cache`` when ``value`` is a ``zeus segment`` output."""
    if not value:
        return None
    path = Path(value).expanduser()
    if (path / "run.json").is_file() and (path / CACHE_DIR).is_dir():
        path = path / CACHE_DIR
    if path.exists() and not path.is_dir():
        raise ZeusError(f"--cache {value} is not a folder")
    return path


def _host_name(header: str) -> str:
    """The host part of a Host header (``[::1]:8765`` -> ``::1``, ``localhost:8765`` -> ``localhost``)."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class ZeusService:
    """The service's state and work, without HTTP: request checks, then the engine's on-demand segmenter."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        if config.max_request_bytes < 1 or config.max_patches < 1 or config.max_region_vertices < 4:
            raise ZeusError("the request size, patch and vertex limits must be positive")
        self.roots = Roots(config.roots)
        self.token, self.token_source = resolve_token(config)
        self.allowed_hosts = {h.lower().strip("[]") for h in (*LOOPBACK, *config.allowed_hosts)}
        if config.host not in WILDCARD:
            self.allowed_hosts.add(config.host.lower().strip("[]"))
        self.allow_origins = set(config.allow_origins)
        self.default_models = parse_model_specs(config.model.strip(), config.pretrained)
        self.default_threshold = config.params.threshold
        SamplingRule.parse(config.params.sampling)  # a ZeusError for a mode that is neither exact nor adaptive
        self.default_prompts = self._default_prompts(config.prompts)
        self.cache = EmbeddingCache(resolve_cache_dir(config.cache_dir), config.cache_slides, config.cache_bytes)
        self.models = ModelPool(config.device, config.precision, config.max_models)
        self.segmenter = OnDemandSegmenter(config.params, self.cache, self.models, config.max_patches)
        self.started = time.time()
        self.learner = ProjectLearner(self)  # POST /learn
        self.default_adapter = Adapter.load(config.adapter) if config.adapter else None
        # fail fast: the default models and prompts must work before the service answers anything
        prompts = load_prompts(self.default_prompts, config.positive_class)
        for spec in self.default_models:
            self.models.prototypes(self.models.get(spec), prompts)
        if self.default_adapter is not None:
            if len(self.default_models) != 1:
                raise ZeusError("--adapter applies to one model, not an ensemble")
            loaded = self.models.get(self.default_models[0])
            self.default_adapter.check(applied_identity(loaded.identity, loaded.precision, config.params, prompts),
                                       f"adapter {Path(config.adapter).name}")

    @staticmethod
    def _default_prompts(value: str) -> Path:
        bundled = bundled_prompts(value)
        if bundled is not None:
            return bundled
        path = Path(value).expanduser()
        if not path.is_file():
            raise ZeusError(f"prompt set {value!r} is neither a bundled set ({', '.join(bundled_prompt_names())}) "
                            "nor a file")
        return Path(os.path.realpath(path))

    # -- checks on every request ---------------------------------------------------------------------
    def check_host(self, host: str | None, origin: str | None) -> None:
        """Refuse a Host that is not this service's (DNS rebinding) and a browser Origin not allowed (403)."""
        if host is None:
            raise RequestError(400, "missing Host header")
        if "*" not in self.allowed_hosts and _host_name(host) not in self.allowed_hosts:
            raise RequestError(403, f"Host {host[:100]!r} is not this service's name; start zeus serve with "
                                    "--allowed-host NAME to answer under that name")
        if origin is not None and "*" not in self.allow_origins and origin not in self.allow_origins:
            raise RequestError(403, f"requests from web pages (Origin {origin[:100]!r}) are refused; start zeus serve "
                                    "with --allow-origin ORIGIN to allow one")

    def check_token(self, header: str | None) -> None:
        import hmac

        challenge = {"WWW-Authenticate": 'Bearer realm="zeus"'}
        if not header:
            raise RequestError(401, "missing token: send the header 'Authorization: Bearer <token>' "
                                    "(the token zeus serve printed, or $ZEUS_TOKEN)", challenge)
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode("utf-8", "replace"),
                                                                 self.token.encode("utf-8")):
            raise RequestError(401, "wrong token", challenge)

    # -- a segment request ---------------------------------------------------------------------------
    def _models(self, model: str | None, pretrained: str | None) -> tuple[ModelSpec, ...]:
        if model is None and pretrained is None:
            return self.default_models
        if model is None:
            if len(self.default_models) > 1:
                raise RequestError(422, "pretrained needs model when the service's default is an ensemble")
            model = self.default_models[0].spec
        try:
            specs = parse_model_specs(model, pretrained)
        except ModelError as exc:
            raise RequestError(422, str(exc).replace("--", "")) from None
        defaults = {m.spec: m.pretrained for m in self.default_models}
        out = []
        for m in specs:
            weights = m.pretrained if m.pretrained is not None or pretrained is not None else defaults.get(m.spec)
            if ModelSpec(m.spec, weights) in self.default_models:
                out.append(ModelSpec(m.spec, weights))  # the operator's own (trusted) files
            else:
                out.append(ModelSpec(self.roots.model(m.spec), self.roots.pretrained(weights)))
        return tuple(out)

    def parse_segment_request(self, body: Any) -> SegmentRequest:
        """Validate a ``POST /segment`` body (400 bad shape, 403 outside the folders, 404 missing, 422 unusable)."""
        req = validate_body(body)
        positive = req.positive_class
        if positive is not None and not positive.strip():
            raise RequestError(400, "positive_class must be a class name")
        region = parse_region(req.region, self.config.max_region_vertices) if req.region is not None else None
        threshold = parse_threshold(req.threshold, self.default_threshold)
        slide = self.roots.check(req.slide, "slide")
        prompts = self.roots.prompts(req.prompts, self.default_prompts)
        return SegmentRequest(slide=slide, models=self._models(req.model, req.pretrained), prompts=prompts,
                              positive_class=positive.strip() if positive else self.config.positive_class,
                              threshold=threshold, region=region, adapter=self._adapter(req.adapter),
                              sampling=req.sampling)

    def _adapter(self, value: str | None) -> Adapter | None:
        """A request's adapter: the default (None), zero-shot ("none"), or a file under the folders (422 if damaged)."""
        if value is None:
            return self.default_adapter
        if value.strip().lower() == "none":
            return None
        try:
            return Adapter.load(self.roots.check(value.strip(), "adapter"))
        except ZeusError as exc:
            raise RequestError(422, str(exc)) from None

    def segment(self, request: SegmentRequest) -> SegmentResult:
        return self.segmenter.segment(request)

    def version_info(self) -> dict[str, Any]:
        loaded = [{"model": m.spec.spec, "pretrained": Path(m.spec.pretrained).name if m.spec.pretrained else None,
                   "name": m.encoder.name, "embed_dim": m.encoder.embed_dim, "device": str(m.encoder.device),
                   "precision": m.precision} for m in self.models.loaded()]
        default = self.default_models[0]
        return {
            "zeus_qupath": __version__,
            "versions": versions(),
            "model": {"model": ",".join(m.spec for m in self.default_models),
                      "pretrained": Path(default.pretrained).name if default.pretrained else None,
                      **self._default_model_info()},
            "models_loaded": loaded,
            "prompts": {"default": self.default_prompts.stem, "bundled": bundled_prompt_names()},
            "threshold": str(self.default_threshold),
            "sampling": self.config.params.sampling,
            "adapter": self.default_adapter.summary() if self.default_adapter is not None else None,
            "slides": [{"slide_fingerprint": e.key.slide[:16], "width": e.width, "height": e.height,
                        "patches": len(e.grid), "embedded": e.embedded, "on_disk": e.on_disk}
                       for e in self.cache.entries()],
            "cache": asdict(self.cache.stats()),
            "limits": {"max_request_bytes": self.config.max_request_bytes, "max_patches": self.config.max_patches,
                       "max_region_vertices": self.config.max_region_vertices, "max_models": self.config.max_models},
            "roots": [str(r) for r in self.roots.folders],
            "uptime_s": round(time.time() - self.started, 1),
        }

    def _default_model_info(self) -> dict[str, Any]:
        """The default model's details while it is loaded (asking must not load it again)."""
        m = next((m for m in self.models.loaded() if m.spec == self.default_models[0]), None)
        if m is None:
            return {"loaded": False}
        enc = m.encoder
        return {"name": enc.name, "embed_dim": enc.embed_dim, "input_size": enc.preprocess.size,
                "device": str(enc.device), "precision": m.precision, "loaded": True}


# ------------------------------------------------------------------------------------------ the server


class ZeusServer:
    """uvicorn serving the app on a socket bound beforehand (so the port is known and a clash fails early)."""

    def __init__(self, service: ZeusService, sock: socket.socket) -> None:
        import uvicorn

        from .service_app import create_app

        self.service = service
        self.socket = sock
        config = uvicorn.Config(create_app(service), http="h11", ws="none", lifespan="off", log_config=None,
                                access_log=True, server_header=False, timeout_keep_alive=5, limit_concurrency=64)
        self._server = uvicorn.Server(config)
        self._done = threading.Event()

    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self.socket.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.server_address
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Answer requests until :meth:`shutdown` (or Ctrl-C when run in the main thread)."""
        self._done.clear()
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop :meth:`serve_forever` (from another thread) and wait for it to return."""
        self._server.should_exit = True
        self._done.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def make_server(config: ServiceConfig) -> ZeusServer:
    """Load the default model and prompts (fail fast with a ZeusError) and bind the socket (not yet serving)."""
    if not 0 <= config.port <= 65535:
        raise ZeusError(f"--port must be between 0 and 65535, got {config.port}")
    service = ZeusService(config)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ZeusError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    return ZeusServer(service, sock)


def serve(config: ServiceConfig, on_ready: Callable[[ZeusServer], None] | None = None) -> None:
    """Run ``zeus serve`` until interrupted (or ``server.shutdown()``): print the address and token, answer requests.

    ``on_ready(server)`` is called once the server listens (tests use it to stop the server).
    """
    if not logging.getLogger().handlers:  # requests and timings to stderr; other libraries' chatter stays quiet
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s zeus serve: %(message)s")
    for name in (__name__, "zeus_qupath.on_demand", "zeus_qupath.models.pool", "uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.INFO)
    server = make_server(config)
    service = server.service
    print(f"zeus serve: listening on {server.url} (model {config.model}, prompts {service.default_prompts.stem}); "
          f"API description: {server.url}/openapi.json", flush=True)
    print(f"zeus serve: slides may come from: {', '.join(str(r) for r in service.roots.folders)}", flush=True)
    folder = service.cache.stats().folder
    print(f"zeus serve: embedding cache: {folder} (shared with zeus segment --cache)" if folder else
          "zeus serve: embedding cache: memory only (pass --cache DIR, e.g. a zeus segment output folder, "
          "to reuse what zeus segment embedded)", flush=True)
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
        pass
    finally:
        server.server_close()
        print("zeus serve: stopped", flush=True)
