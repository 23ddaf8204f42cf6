"""The test service, shared by the service tests: started on a free port in a thread, and one request to it."""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from zeus_qupath.bridge.service import ServiceConfig, make_server


@contextlib.contextmanager
def running_service(config: ServiceConfig) -> Iterator[Any]:
    """``make_server(config)`` serving in a daemon thread until the block ends."""
    srv = make_server(config)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def call(srv: Any, method: str, path: str, body: Any = None, *, token: str | None, raw: bytes | None = None,
         content_type: str = "application/json", headers: dict | None = None,
         timeout: float = 600) -> tuple[int, Any, Any]:
    """(status, decoded JSON or None, headers) of one request; ``token`` None sends no Authorization header."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(srv.url + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        payload = err.read()
        return err.code, json.loads(payload) if payload else None, err.headers
