"""The extension's connection check says exactly what is wrong: the real ZeusClient (from the built jar, on the JDK)
against stand-in servers that answer as each failure does, and against the real service app (``zeus serve``)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qupath.extension import build_extension
from qupath.fixtures import skip_or_fail
from qupath.harness import QuPathUnavailable, find_java, qupath_root

pytestmark = pytest.mark.jvm

CHECKER = Path(__file__).resolve().parent / "jvm" / "ZeusCheck.java"
TOKEN = "check-token-0123456789abcdef"


def stand_in(health: tuple[int, dict], version: tuple[int, dict]) -> ThreadingHTTPServer:
    """A server answering GET /health and GET /version (token checked) as given."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path == "/health":
                status, body = health
            elif self.path == "/version" and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                status, body = 401, {"error": "wrong token"}
            elif self.path == "/version":
                status, body = version
            else:
                status, body = 404, {"error": "no endpoint"}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_check_names_each_failure(tmp_path):
    try:
        jar = build_extension(tmp_path)
        java = find_java(17) / "bin" / "java"
    except QuPathUnavailable as exc:
        skip_or_fail(str(exc))
    gson = next((qupath_root() / "0.4.4" / "lib").glob("gson-*.jar"))
    ok_version = {"zeus_qupath": "0.1.0", "api": 1, "capabilities": ["segment", "region"], "model": {"model": "keep"}}
    servers = {
        "ok": stand_in((200, {"status": "ok"}), (200, ok_version)),
        "learn": stand_in((200, {"status": "ok"}), (200, {**ok_version, "capabilities": ["segment", "learn"]})),
        "old": stand_in((200, {"status": "ok"}), (200, {"zeus_qupath": "0.0.9"})),
        "newer": stand_in((200, {"status": "ok"}), (200, {**ok_version, "zeus_qupath": "0.3.0", "api": 2})),
        "other": stand_in((404, {"detail": "Not Found"}), (404, {})),
    }
    url = {k: f"http://127.0.0.1:{s.server_address[1]}" for k, s in servers.items()}
    cases = [  # (url, token) -> what the check must say
        ((url["ok"], TOKEN), "true|Connected: zeus-qupath 0.1.0 (API 1)"),
        ((url["ok"] + "/segment", TOKEN), "true|Connected"),  # the Groovy script's URL works too
        ((url["ok"], "wrong-token-0123456789"), "false|The service refused the token (HTTP 401: wrong token)"),
        ((url["ok"], " "), "false|The service needs a token and none is set"),
        ((f"http://127.0.0.1:{free_port()}", TOKEN), "false|The ZEUS service is not running at"),
        ((url["other"], TOKEN), "false|Something answers at"),
        ((url["old"], TOKEN), "false|Version mismatch: the service is zeus-qupath 0.0.9, older than the version "
                              "handshake; this extension is zeus-qupath"),
        ((url["newer"], TOKEN), "false|Version mismatch: the service is zeus-qupath 0.3.0 (API 2); this extension"),
        (("ftp://127.0.0.1:1", TOKEN), "false|The service URL 'ftp://127.0.0.1:1' is not an http:// address"),
        (("", TOKEN), "false|No service URL is set"),
        ((url["learn"], TOKEN), "true|Connected: zeus-qupath 0.1.0 (API 1) at " + url["learn"]),
    ]
    args = [a for (pair, _) in cases for a in pair]
    env_free = {"PATH": "/usr/bin:/bin"}  # no ZEUS_TOKEN from the test's environment
    result = subprocess.run([str(java), "-cp", f"{jar}:{gson}", str(CHECKER), *args], capture_output=True, text=True,
                            env=env_free)
    for s in servers.values():
        s.shutdown()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(cases), result.stdout
    for (pair, expected), line in zip(cases, lines, strict=True):
        assert line.startswith(expected), (pair, line)
    assert "offers segment, learn" in lines[-1]
