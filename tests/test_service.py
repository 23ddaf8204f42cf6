"""``zeus serve``: the FastAPI service the Groovy scripts call, tested over real HTTP on 127.0.0.1 (uvicorn).

The server runs in a thread on an ephemeral port with the tiny open_clip model; a Java client
(tests/jvm/ZeusClient.java, run with the JDK's single-file launcher) talks to it as QuPath's Groovy
script does. Embedding reuse is checked with the cache's embed counter, never with wall-clock time.
The service and ``zeus segment`` share one pipeline and one embedding cache: a slide the command line
segmented is answered without embedding and with the command line's own polygons.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import open_clip
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from service_client import call as service_call
from service_client import running_service
from shapely.geometry import Polygon, box, shape

from zeus_qupath.bridge.service import (
    MIN_TOKEN_LENGTH,
    ServiceConfig,
    make_server,
    resolve_token,
    serve,
)
from zeus_qupath.bridge.service_schema import RequestError, parse_region, parse_threshold, validate_body
from zeus_qupath.cli import main as zeus_main
from zeus_qupath.embedding_cache import EmbeddingCache
from zeus_qupath.errors import ZeusError
from zeus_qupath.models.pool import ModelPool
from zeus_qupath.models.specs import ModelSpec
from zeus_qupath.on_demand import OnDemandSegmenter, SegmentRequest
from zeus_qupath.params import SegmentParams, Threshold
from zeus_qupath.qupath_geojson import parse_qupath_geojson
from zeus_qupath.samples import prompt_path

TOKEN = "test-token-0123456789"
ROOT = Path(__file__).resolve().parents[1]
JAVA_CLIENT = ROOT / "tests" / "jvm" / "ZeusClient.java"


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An allowed root with small synthetic slides (each its own content), plus a folder outside the root."""
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    base = tmp_path_factory.mktemp("service")
    root = base / "root"
    outside = base / "outside"
    root.mkdir()
    outside.mkdir()
    slide = make_synthetic_slide(root / "small.tif", 2048, 1536, seed=1)
    region = make_synthetic_slide(root / "region.tif", 2304, 1536, seed=2)
    make_synthetic_slide(root / "twin.tif", 1536, 1024, seed=3)
    make_synthetic_slide(root / "fuzz.tif", 1024, 768, seed=4)
    (outside / "secret.tif").write_bytes(slide.path.read_bytes())
    (root / "escape.tif").symlink_to(outside / "secret.tif")
    (root / "alias.tif").symlink_to(root / "small.tif")
    (root / "not_a_slide.tif").write_text("this is not a TIFF\n")
    shutil.copy(prompt_path("cutaneous_metastasis"), root / "my_prompts.json")
    shutil.copy(prompt_path("cutaneous_metastasis"), outside / "other_prompts.json")
    return {"root": root, "outside": outside, "slide": slide, "region": region}


TISSUE = "zeus"  # the default rule: CLAM contours, per-contour lattices, white/black filters


def model_config(tiny_model) -> dict:
    return {"model": f"open_clip:{tiny_model.config_path}", "pretrained": str(tiny_model.checkpoint_path),
            "device": "cpu", "params": SegmentParams(batch_size=64, workers=2, tissue=TISSUE)}


@pytest.fixture(scope="module")
def server(tiny_model, folders):
    config = ServiceConfig(host="127.0.0.1", port=0, token=TOKEN, roots=(str(folders["root"]),),
                           prompts="spindle_cell", max_patches=2000, max_region_vertices=500,
                           **model_config(tiny_model))
    with running_service(config) as srv:
        yield srv


call = functools.partial(service_call, token=TOKEN)  # (status, decoded JSON, headers) of one request


def assert_one_line_error(payload, status):
    assert 400 <= status < 500, (status, payload)
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    msg = payload["error"]
    assert isinstance(msg, str) and msg and "\n" not in msg and "Traceback" not in msg, (status, msg)


def entries_of(srv, width: int, height: int):
    return [e for e in srv.service.cache.entries() if (e.width, e.height) == (width, height)]


def polygons_of(collection) -> list:
    return [shape(f["geometry"]) for f in collection["features"]]


def geometries(collection) -> list:
    """Each feature's geometry and measurements, as JSON carries them."""
    return [(f["geometry"], f["properties"]["measurements"]) for f in json.loads(json.dumps(collection))["features"]]


# --------------------------------------------------------------------------------------------- basics


def test_health_needs_no_token(server):
    status, payload, headers = call(server, "GET", "/health", token=None)
    assert status == 200 and payload == {"status": "ok"}
    assert headers["Content-Type"].startswith("application/json")
    assert server.server_address[0] == "127.0.0.1"


def test_version_needs_token_and_reports_model(server, tiny_model):
    status, payload, _ = call(server, "GET", "/version", token=None)
    assert status == 401
    assert_one_line_error(payload, status)
    status, payload, _ = call(server, "GET", "/version")
    assert status == 200
    assert payload["zeus_qupath"] and "torch" in payload["versions"]
    assert payload["model"]["model"] == f"open_clip:{tiny_model.config_path}"
    assert payload["model"]["embed_dim"] == 64
    assert "spindle_cell" in payload["prompts"]["bundled"]
    assert isinstance(payload["slides"], list)
    assert payload["limits"]["max_patches"] == 2000
    assert payload["api"] == 1 and payload["capabilities"][:2] == ["segment", "region"]  # the QuPath extension's check


def test_openapi_describes_the_api_for_script_authors(server):
    status, doc, _ = call(server, "GET", "/openapi.json", token=None)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/health", "/version", "/segment", "/learn"}
    learn = doc["paths"]["/learn"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert learn["required"] == ["project"] and learn["additionalProperties"] is False
    post = doc["paths"]["/segment"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["slide"] and body["additionalProperties"] is False
    assert set(body["properties"]) == {"slide", "region", "model", "pretrained", "prompts", "threshold",
                                       "positive_class", "adapter", "sampling"}
    assert {"401", "403", "404", "422"} <= set(post["responses"])
    assert post["security"] == [{"HTTPBearer": []}]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"Rectangle", "Geometry", "ErrorBody"} <= set(doc["components"]["schemas"])


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"])
def test_token_missing_or_wrong_is_401(server, folders, auth):
    headers = {"Authorization": auth} if auth else {}
    status, payload, resp_headers = call(server, "POST", "/segment", {"slide": str(folders["slide"].path)},
                                         token=None, headers=headers)
    assert status == 401
    assert_one_line_error(payload, status)
    assert resp_headers["WWW-Authenticate"].startswith("Bearer")


def test_paths_outside_the_roots_are_403(server, folders):
    root, outside = folders["root"], folders["outside"]
    for slide in (
        str(outside / "secret.tif"),  # plainly outside
        f"{root}/../outside/secret.tif",  # '..' escape
        str(root / "escape.tif"),  # symlink inside the root pointing outside
        str(outside / "missing.tif"),  # outside and absent: 403, existence is not revealed
        f"{root}/../root/small.tif",  # '..' is refused even when it lands inside
    ):
        status, payload, _ = call(server, "POST", "/segment", {"slide": slide})
        assert status == 403, slide
        assert_one_line_error(payload, status)
    small = str(root / "small.tif")
    for body in ({"prompts": str(outside / "other_prompts.json")}, {"pretrained": str(outside / "secret.tif")},
                 {"model": "open_clip:" + str(outside / "x.json")}):
        status, payload, _ = call(server, "POST", "/segment", {"slide": small, **body})
        assert status == 403, body
        assert_one_line_error(payload, status)


def test_missing_slide_is_404(server, folders):
    status, payload, _ = call(server, "POST", "/segment", {"slide": str(folders["root"] / "nope.svs")})
    assert status == 404
    assert_one_line_error(payload, status)
    status, payload, _ = call(server, "POST", "/segment", {"slide": str(folders["root"] / "small.tif"),
                                                            "prompts": "no_such_set"})
    assert status == 404 and "spindle_cell" in payload["error"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"slide": NaN}', b"\xff\xfe", b'"text"',
                                 b'{"slide": Infinity}', b"[" * 100_000 + b"]" * 100_000])
def test_bad_json_is_400(server, raw):
    status, payload, _ = call(server, "POST", "/segment", raw=raw)
    assert status == 400
    assert_one_line_error(payload, status)


@pytest.mark.parametrize("body", [
    {},  # no slide
    {"slide": 3},
    {"slide": "relative/path.tif"},
    {"slide": "/x.tif", "unknown": 1},
    {"slide": "/x.tif", "region": [1, 2, 3, 4]},
    {"slide": "/x.tif", "region": {"x": "a", "y": 0, "width": 1, "height": 1}},
    {"slide": "/x.tif", "region": {"x": True, "y": 0, "width": 1, "height": 1}},
    {"slide": "/x.tif", "region": {"type": "Polygon", "coordinates": "nope"}},
    {"slide": "/x.tif", "region": {"type": "Polygon", "coordinates": [[[0, 0], [1, "a"], [1, 1], [0, 0]]]}},
    {"slide": "/x.tif", "threshold": True},
    {"slide": "/x.tif", "threshold": 10**400},  # a JSON integer no float can hold
    {"slide": "/x.tif", "region": {"x": 10**400, "y": 0, "width": 1, "height": 1}},
    {"slide": "/x.tif", "model": 7},
])
def test_malformed_fields_are_400(server, body):
    status, payload, _ = call(server, "POST", "/segment", body)
    assert status == 400, body
    assert_one_line_error(payload, status)


def test_too_large_is_413_and_the_server_keeps_serving(server):
    limit = server.service.config.max_request_bytes
    raw = b'{"slide": "' + b"a" * limit + b'"}'
    status, payload, _ = call(server, "POST", "/segment", raw=raw)
    assert status == 413
    assert_one_line_error(payload, status)
    assert call(server, "GET", "/health", token=None)[0] == 200


def test_wrong_content_type_method_and_path(server, folders):
    body = json.dumps({"slide": str(folders["slide"].path)}).encode()
    status, payload, _ = call(server, "POST", "/segment", raw=body, content_type="text/plain")
    assert status == 415
    assert_one_line_error(payload, status)
    status, payload, headers = call(server, "GET", "/segment")
    assert status == 405 and headers["Allow"] == "POST"
    assert_one_line_error(payload, status)
    status, payload, _ = call(server, "POST", "/health", {"a": 1})
    assert status == 405
    status, payload, _ = call(server, "DELETE", "/segment")
    assert status == 405
    status, payload, _ = call(server, "GET", "/nothing")
    assert status == 404
    assert_one_line_error(payload, status)


def test_unusable_values_are_422(server, folders):
    root = folders["root"]
    small = str(root / "small.tif")
    for body in (
        {"slide": small, "threshold": "median"},
        {"slide": small, "threshold": 1.5},
        {"slide": small, "threshold": 1e308},
        {"slide": small, "threshold": "prob:1e400"},
        {"slide": small, "positive_class": "stroma"},
        {"slide": small, "region": {"x": 50000, "y": 50000, "width": 100, "height": 100}},
        {"slide": small, "region": {"x": 0, "y": 0, "width": 0, "height": 10}},
        {"slide": small, "region": {"x": 1e308, "y": 0, "width": 1e308, "height": 10}},
        {"slide": small, "region": {"type": "Polygon", "coordinates": [[[0, 0], [1e308, 0], [1e308, 1e308],
                                                                         [0, 0]]]}},
        {"slide": small, "region": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}},
        {"slide": str(root / "not_a_slide.tif")},
        {"slide": small, "model": "no-such-model"},
        {"slide": small, "model": "a,,b"},
    ):
        status, payload, _ = call(server, "POST", "/segment", body)
        assert status == 422, (body, payload)
        assert_one_line_error(payload, status)


def test_unexpected_errors_are_500_without_traceback(server, folders, monkeypatch, caplog):
    def boom(request):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(server.service, "segment", boom)
    with caplog.at_level("ERROR", logger="zeus_qupath.bridge.service"):
        status, payload, _ = call(server, "POST", "/segment", {"slide": str(folders["slide"].path)})
    assert status == 500
    assert set(payload) == {"error"} and "\n" not in payload["error"]
    assert "RuntimeError: boom" in payload["error"]
    assert "Traceback" in caplog.text  # the traceback goes to the server log only


# --------------------------------------------------------------------------------------------- segmenting


def cli_segment(tiny_model, slide: Path, out: Path, *extra: str) -> dict:
    """``zeus segment`` on one slide (in this process); its GeoJSON."""
    code = zeus_main(["segment", str(slide), "--prompts", str(prompt_path("spindle_cell")), "--model",
                      f"open_clip:{tiny_model.config_path}", "--pretrained", str(tiny_model.checkpoint_path),
                      "--device", "cpu", "--tissue", TISSUE, "--out", str(out), "--quiet", *extra])
    assert code == 0
    return json.loads((out / f"{slide.stem}.geojson").read_text())


def test_full_slide_answer_is_valid_qupath_geojson(server, folders):
    slide = folders["slide"]
    status, payload, headers = call(server, "POST", "/segment", {"slide": str(slide.path)})
    assert status == 200, payload
    (entry,) = entries_of(server, slide.width, slide.height)
    assert entry.complete and int(headers["X-Zeus-Patches"]) == entry.embedded > 0  # white/black patches dropped
    objects = parse_qupath_geojson(payload, source="service")
    assert objects and len(objects) == len(payload["features"])
    for obj in objects:
        assert obj.object_type == "annotation" and obj.class_name == "Tumor"
        assert obj.name == "ZEUS Tumor"
        assert obj.geometry.is_valid and obj.geometry.area > 0
        minx, miny, maxx, maxy = obj.geometry.bounds
        assert 0 <= minx and 0 <= miny and maxx <= slide.width and maxy <= slide.height
        assert obj.measurements["Patches"] > 0


def test_cli_then_service_answers_without_embedding(tiny_model, folders, tmp_path):
    """One cache: a slide `zeus segment` embedded is served with 0 patches embedded and the CLI's own polygons."""
    slide = folders["slide"]
    out = tmp_path / "results"
    expected = cli_segment(tiny_model, slide.path, out)
    assert expected["features"]
    config = ServiceConfig(port=0, token=TOKEN, roots=(str(folders["root"]),), cache_dir=str(out),
                           prompts="spindle_cell", **model_config(tiny_model))
    srv = make_server(config)  # --cache OUT: a zeus segment output folder means its .cache
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        assert srv.service.cache.stats().folder == str(out / ".cache")
        status, payload, headers = call(srv, "POST", "/segment", {"slide": str(slide.path)})
        assert status == 200, payload
        assert headers["X-Zeus-Embedded"] == "0"
        stats = srv.service.cache.stats()
        assert stats.embedded_patches == 0 and stats.disk_hits == 1 and stats.misses == 0
        assert geometries(payload) == geometries(expected)  # the same polygons and measurements, exactly
        # a region of it: still nothing to embed
        status, _, headers = call(srv, "POST", "/segment", {"slide": str(slide.path),
                                                            "region": {"x": 0, "y": 0, "width": 900, "height": 900}})
        assert status == 200 and headers["X-Zeus-Embedded"] == "0"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def test_service_that_embeds_itself_agrees_with_the_cli(server, tiny_model, folders, tmp_path):
    """Without a shared cache each side embeds on its own (other batches): the same polygons, to float precision."""
    slide = folders["slide"]
    expected = cli_segment(tiny_model, slide.path, tmp_path / "results", "--no-cache")
    status, payload, _ = call(server, "POST", "/segment", {"slide": str(slide.path)})
    assert status == 200
    got, want = shapely.union_all(polygons_of(payload)), shapely.union_all(polygons_of(expected))
    assert want.area > 0
    assert got.symmetric_difference(want).area <= 1e-6 * want.area
    assert len(payload["features"]) == len(expected["features"])


def test_other_prompts_and_thresholds_do_not_embed_again(server, folders):
    root = folders["root"]
    small = str(root / "small.tif")
    first = call(server, "POST", "/segment", {"slide": small})
    assert first[0] == 200
    embedded = server.service.cache.stats().embedded_patches
    answers = {}
    for body in (
        {"slide": small, "prompts": "cutaneous_metastasis"},
        {"slide": small, "prompts": str(root / "my_prompts.json"), "threshold": "argmax"},
        {"slide": small, "threshold": "prob:0.5"},
        {"slide": small, "threshold": 0.5},
        {"slide": str(root / "alias.tif")},  # a symlink to the same file: same cache entry
    ):
        status, payload, headers = call(server, "POST", "/segment", body)
        assert status == 200, (body, payload)
        assert headers["X-Zeus-Embedded"] == "0"
        assert parse_qupath_geojson(payload) is not None
        answers[json.dumps(body, sort_keys=True)] = payload
    assert server.service.cache.stats().embedded_patches == embedded  # nothing was embedded again
    by_threshold = answers[json.dumps({"slide": small, "threshold": "prob:0.5"}, sort_keys=True)]
    by_number = answers[json.dumps({"slide": small, "threshold": 0.5}, sort_keys=True)]
    assert geometries(by_threshold) == geometries(by_number)


def test_region_request_embeds_only_patches_in_the_region(server, folders, tiny_model):
    slide = folders["region"]  # its own slide: an empty cache entry
    path = slide.path
    # a region around the known tumor (the synthetic slide's ground truth), cut by a diagonal
    tumor = np.asarray(Image.open(slide.tumor_mask_path)) > 127
    rows, cols = np.nonzero(tumor)
    ds = slide.mask_downsample
    cx, cy = cols.mean() * ds, rows.mean() * ds
    region = Polygon([(cx - 500, cy - 400), (cx + 450, cy - 380), (cx + 300, cy + 420), (cx - 420, cy + 250)])
    geometry = {"type": "Polygon", "coordinates": [list(map(list, region.exterior.coords))]}
    before = server.service.cache.stats().embedded_patches
    status, payload, headers = call(server, "POST", "/segment", {"slide": str(path), "region": geometry})
    assert status == 200, payload

    (entry,) = entries_of(server, slide.width, slide.height)
    p = entry.grid.geometry.patch_size_l0
    embedded = np.flatnonzero(entry.slots != -1)  # embedded, or read and dropped as white/black
    coords = entry.grid.coords
    meets = np.array([box(x, y, x + p, y + p).intersection(region).area > 0 for x, y in coords])
    assert 0 < len(embedded) < len(entry.grid)
    assert set(embedded.tolist()) == set(np.flatnonzero(meets).tolist())  # exactly the patches in the region
    assert int(headers["X-Zeus-Embedded"]) == len(embedded)
    assert int(headers["X-Zeus-Patches"]) == int(np.sum(entry.slots >= 0))
    assert server.service.cache.stats().embedded_patches - before == len(embedded)

    polys = polygons_of(payload)
    assert polys, "the region holds tumor, so the answer should too"
    for poly in polys:
        assert poly.is_valid
        assert region.buffer(0.02).covers(poly)  # clipped to the region (coordinates at 0.01 px)

    # the engine's own region segmentation (a segmenter of its own, nothing shared) answers the same polygons
    engine = OnDemandSegmenter(SegmentParams(tissue=TISSUE), EmbeddingCache(None), ModelPool("cpu"))
    spec = ModelSpec(f"open_clip:{tiny_model.config_path}", str(tiny_model.checkpoint_path))
    result = engine.segment(SegmentRequest(path, (spec,), prompt_path("spindle_cell"), region=region))
    assert result.embedded == len(embedded)
    assert geometries(result.outline.feature_collection()) == geometries(payload)

    # a later full-slide request embeds only the patches the region did not need
    status, payload, headers = call(server, "POST", "/segment", {"slide": str(path), "region": None})
    assert status == 200
    assert int(headers["X-Zeus-Embedded"]) == len(entry.grid) - len(embedded)
    assert entry.complete


def test_rectangle_region(server, folders):
    small = str(folders["root"] / "small.tif")
    rect = {"x": 300, "y": 200, "width": 900, "height": 700}
    status, payload, headers = call(server, "POST", "/segment", {"slide": small, "region": rect})
    assert status == 200
    region = box(300, 200, 1200, 900)
    for poly in polygons_of(payload):
        assert region.buffer(0.02).covers(poly)
    slide = folders["slide"]
    (entry,) = entries_of(server, slide.width, slide.height)
    assert 0 < int(headers["X-Zeus-Patches"]) < len(entry.grid)


def test_concurrent_requests_embed_each_patch_once(server, folders):
    path = str(folders["root"] / "twin.tif")
    before = server.service.cache.stats().embedded_patches
    results = [None, None]

    def worker(i):
        results[i] = call(server, "POST", "/segment", {"slide": path, "prompts": ["spindle_cell",
                                                                                 "cutaneous_metastasis"][i]})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [r[0] for r in results] == [200, 200]
    (entry,) = entries_of(server, 1536, 1024)
    n = len(entry.grid)
    assert sorted(int(r[2]["X-Zeus-Embedded"]) for r in results) == [0, n]
    assert server.service.cache.stats().embedded_patches - before == n


@pytest.mark.jvm
def test_jvm_client_reads_the_feature_collection(server, folders, tmp_path):
    java = shutil.which("java")
    if java is None:
        pytest.skip("java not found on PATH (the JVM client test needs JDK 11+)")
    javac = shutil.which("javac")
    if javac:  # compile once, run twice; else the JDK's single-file launcher compiles on each run
        subprocess.run([javac, "-d", str(tmp_path), str(JAVA_CLIENT)], check=True, capture_output=True, timeout=180)
        command = [java, "-cp", str(tmp_path), "ZeusClient"]
    else:
        command = [java, str(JAVA_CLIENT)]
    slide = str(folders["root"] / "small.tif")
    status, expected, _ = call(server, "POST", "/segment", {"slide": slide})
    assert status == 200

    def client(token: str) -> dict[str, str]:
        env = {**os.environ, "ZEUS_TOKEN": token}
        run = subprocess.run([*command, server.url + "/segment", slide], env=env, capture_output=True, text=True,
                             timeout=180)
        assert run.returncode == 0, run.stderr
        return dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line)

    facts = client(TOKEN)
    assert facts["status"] == "200"
    assert facts["type"] == "FeatureCollection"
    assert int(facts["features"]) == len(expected["features"]) > 0
    assert facts["classes"] == "Tumor"
    n_vertices = sum(len(shapely.get_coordinates(g)) for g in polygons_of(expected))
    assert int(facts["vertices"]) == n_vertices

    facts = client("wrong")
    assert facts["status"] == "401" and facts["error"] == "wrong token"


# --------------------------------------------------------------------------------------------- hardening


@pytest.mark.parametrize("host", ["evil.example:8765", "attacker.test", "127.0.0.2:80", "localhost.evil.test"])
def test_foreign_host_header_is_403(server, host):
    """DNS rebinding: a web page's request reaches 127.0.0.1 under the page's host name; it is refused."""
    for path, token in (("/health", None), ("/version", TOKEN)):
        status, payload, _ = call(server, "GET", path, token=token, headers={"Host": host})
        assert status == 403, (host, path)
        assert_one_line_error(payload, status)
    for host_ok in ("localhost", f"127.0.0.1:{server.server_address[1]}", "LOCALHOST:1"):
        assert call(server, "GET", "/health", token=None, headers={"Host": host_ok})[0] == 200


def test_browser_origin_is_403_unless_allowed(server, tiny_model, folders):
    status, payload, _ = call(server, "GET", "/version", headers={"Origin": "http://evil.example"})
    assert status == 403 and "--allow-origin" in payload["error"]
    assert_one_line_error(payload, status)
    config = ServiceConfig(port=0, token=TOKEN, roots=(str(folders["root"]),), allow_origins=("http://lab.test:8080",),
                           allowed_hosts=("zeus.lab.test",), **model_config(tiny_model))
    srv = make_server(config)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        status, _, headers = call(srv, "GET", "/version", headers={"Origin": "http://lab.test:8080"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://lab.test:8080"
        assert call(srv, "GET", "/version", headers={"Origin": "http://other.test"})[0] == 403
        assert call(srv, "GET", "/health", token=None, headers={"Host": "zeus.lab.test:8765"})[0] == 200
        assert call(srv, "GET", "/health", token=None, headers={"Host": "evil.test"})[0] == 403
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def test_region_vertex_and_patch_limits_are_422(server, folders):
    small = str(folders["root"] / "small.tif")
    angles = np.linspace(0, 2 * np.pi, 600, endpoint=False)
    ring = [[1000 + 400 * np.cos(a) * (1 + (i % 2)), 700 + 400 * np.sin(3 * a)] for i, a in enumerate(angles)]
    status, payload, _ = call(server, "POST", "/segment", {"slide": small, "region": {
        "type": "Polygon", "coordinates": [[*ring, ring[0]]]}})
    assert status == 422 and "vertices" in payload["error"]
    assert_one_line_error(payload, status)
    # under the vertex limit, but crossing itself thousands of times: repairing it would take minutes
    scribble = np.random.default_rng(0).uniform(0, 2000, size=(300, 2)).tolist()
    status, payload, _ = call(server, "POST", "/segment", {"slide": small, "region": {
        "type": "Polygon", "coordinates": [[*scribble, scribble[0]]]}})
    assert status == 422 and "crosses itself" in payload["error"]
    limited = server.service.segmenter
    old = limited.max_patches
    limited.max_patches = 3
    try:
        status, payload, _ = call(server, "POST", "/segment", {"slide": small})
    finally:
        limited.max_patches = old
    assert status == 422 and "over the limit of 3" in payload["error"]


def test_a_config_file_in_a_root_cannot_replace_a_builtin_model(server, folders, tiny_model):
    """open_clip:ROOT/ViT-B-32.json is loaded for that request only; open_clip's ViT-B-32 stays what it was."""
    builtin = open_clip.get_model_config("ViT-B-32")
    assert builtin is not None and builtin["embed_dim"] == 512
    own = folders["root"] / "ViT-B-32.json"
    shutil.copy(tiny_model.config_path, own)
    weights = folders["root"] / "tiny-weights.pt"
    shutil.copy(tiny_model.checkpoint_path, weights)
    status, payload, _ = call(server, "POST", "/segment", {"slide": str(folders["root"] / "twin.tif"),
                                                            "model": f"open_clip:{own}", "pretrained": str(weights)})
    assert status == 200, payload
    assert open_clip.get_model_config("ViT-B-32") == builtin
    assert "ViT-B-32" in open_clip.list_models()
    loaded = {m.spec.spec: m for m in server.service.models.loaded()}
    assert loaded[f"open_clip:{own}"].encoder.embed_dim == 64


def test_model_pool_keeps_at_most_max_models(tiny_model, tmp_path):
    other = tmp_path / "other-tiny.json"
    shutil.copy(tiny_model.config_path, other)
    pool = ModelPool("cpu", max_models=1)
    a = ModelSpec(f"open_clip:{tiny_model.config_path}", str(tiny_model.checkpoint_path))
    b = ModelSpec(f"open_clip:{other}", str(tiny_model.checkpoint_path))
    first = pool.get(a)
    assert pool.get(a) is first and pool.loads == 1
    pool.get(b)
    assert [m.spec for m in pool.loaded()] == [b] and pool.unloads == 1
    assert pool.get(a) is not first and pool.loads == 3  # loaded again after it was dropped


def _numbers():
    return (st.integers(min_value=-(10**420), max_value=10**420) | st.floats(allow_nan=False, allow_infinity=False)
            | st.sampled_from([1e308, -1e308, 5e-324, 2.0**31, 0, -1, 0.5, 10**400]))


_JSON = st.recursive(st.none() | st.booleans() | _numbers() | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4),
                     max_leaves=12)


def _bodies(root: Path, outside: Path):
    slides = st.sampled_from([str(root / "fuzz.tif"), str(root / "not_a_slide.tif"), str(outside / "secret.tif"),
                              str(root / "nope.tif"), "relative.tif", "", f"{root}/../root/fuzz.tif"])
    position = st.lists(_numbers(), min_size=2, max_size=3)
    ring = st.lists(position, min_size=0, max_size=8)
    region = (
        st.fixed_dictionaries({"x": _numbers(), "y": _numbers(), "width": _numbers(), "height": _numbers()})
        | st.fixed_dictionaries({"type": st.sampled_from(["Polygon", "MultiPolygon", "LineString", "Point"]),
                                 "coordinates": st.lists(ring, max_size=2) | _JSON})
        | st.fixed_dictionaries({"type": st.just("Feature"), "geometry": _JSON})
        | _JSON)
    threshold = st.sampled_from(["zeus", "argmax", "prob:0.5", "prob:2", "prob:nan", "prob:1e400", "x"]) | _numbers()
    fields = {"slide": slides | _JSON, "region": region, "threshold": threshold | _JSON,
              "model": st.sampled_from(["no-such", "open_clip:" + str(root / "none.json"), "a,,b", ""]) | _JSON,
              "pretrained": st.sampled_from([str(outside / "secret.tif"), "tag"]) | _JSON,
              "prompts": st.sampled_from(["spindle_cell", "nope", str(root / "my_prompts.json")]) | _JSON,
              "positive_class": st.sampled_from(["tumor", "normal", "stroma", ""]) | _JSON}
    bodies = st.fixed_dictionaries({"slide": fields["slide"]}, optional={k: v for k, v in fields.items()
                                                                         if k != "slide"})
    return bodies | st.dictionaries(st.text(max_size=8), _JSON, max_size=3) | _JSON


def test_fuzz_the_request_schema_never_answers_5xx(server, folders):
    """Bodies drawn from the request schema (and beyond it): 200 or a one-line 4xx, never a server error."""
    seen: dict[int, int] = {}

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_bodies(folders["root"], folders["outside"]))
    def run(body):
        status, payload, _ = call(server, "POST", "/segment", body)
        seen[status] = seen.get(status, 0) + 1
        if status != 200:
            assert_one_line_error(payload, status)
        else:
            assert payload["type"] == "FeatureCollection"

    run()
    assert all(s == 200 or 400 <= s < 500 for s in seen), seen
    assert len(seen) >= 3, seen  # the generator reached several kinds of answer


# --------------------------------------------------------------------------------------------- units


def test_startup_fails_fast_with_one_line_errors(tmp_path, tiny_model):
    good = {"port": 0, "token": TOKEN, **model_config(tiny_model)}
    for kwargs in (
        {"roots": ()},
        {"roots": (str(tmp_path / "absent"),)},
        {"roots": (str(tmp_path),), "model": "open_clip:" + str(tmp_path / "missing.json")},
        {"roots": (str(tmp_path),), "prompts": "no_such_prompts"},
        {"roots": (str(tmp_path),), "token": "short"},
        {"roots": (str(tmp_path),), "port": 99999},
        {"roots": (str(tmp_path),), "cache_dir": str(tiny_model.config_path)},  # a file, not a folder
    ):
        with pytest.raises(ZeusError) as err:
            make_server(ServiceConfig(**{**good, **kwargs}))
        assert "\n" not in str(err.value) and str(err.value)


def test_serve_prints_address_and_generated_token(tiny_model, folders, monkeypatch, capsys):
    """``serve`` (what ``zeus serve`` runs): it prints its URL and a fresh token, then answers with that token."""
    monkeypatch.delenv("ZEUS_TOKEN", raising=False)
    ready = threading.Event()
    servers = []

    def on_ready(srv):
        servers.append(srv)
        ready.set()

    config = ServiceConfig(port=0, roots=(str(folders["root"]),), **model_config(tiny_model))
    thread = threading.Thread(target=serve, args=(config,), kwargs={"on_ready": on_ready}, daemon=True)
    thread.start()
    try:
        assert ready.wait(timeout=120)
        srv = servers[0]
        out = capsys.readouterr().out
        assert f"listening on {srv.url}" in out and srv.url.startswith("http://127.0.0.1:")
        assert "/openapi.json" in out and "memory only" in out
        token = next(line.split("token: ", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("zeus serve: token: "))
        assert token == srv.service.token and len(token) >= 32
        assert call(srv, "GET", "/health", token=None)[:2] == (200, {"status": "ok"})
        assert call(srv, "GET", "/version", token="nope")[0] == 401
        assert call(srv, "GET", "/version", token=token)[0] == 200
    finally:
        if servers:
            servers[0].shutdown()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_token_from_config_env_or_generated(monkeypatch):
    monkeypatch.delenv("ZEUS_TOKEN", raising=False)
    token, source = resolve_token(ServiceConfig())
    assert source == "generated" and len(token) >= 32
    assert resolve_token(ServiceConfig())[0] != token
    monkeypatch.setenv("ZEUS_TOKEN", "from-env-0123456789")
    assert resolve_token(ServiceConfig()) == ("from-env-0123456789", "env")
    assert resolve_token(ServiceConfig(token="given-0123456789ab")) == ("given-0123456789ab", "config")
    monkeypatch.setenv("OTHER_TOKEN", "other-0123456789abc")
    assert resolve_token(ServiceConfig(token_env="OTHER_TOKEN")) == ("other-0123456789abc", "env")
    monkeypatch.setenv("ZEUS_TOKEN", "x" * (MIN_TOKEN_LENGTH - 1))
    with pytest.raises(ZeusError, match=f"at least {MIN_TOKEN_LENGTH}"):
        resolve_token(ServiceConfig())


def test_parse_region_and_threshold():
    def region(value):
        return parse_region(validate_body({"slide": "/s", "region": value}).region)

    assert region({"x": 10, "y": 20, "width": 30, "height": 40}).equals(box(10, 20, 40, 60))
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    fixed = region(bowtie)  # crossing itself once, as drawn by hand: repaired
    assert fixed.is_valid and fixed.area == pytest.approx(50)
    feature = {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
        [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]], [[[10, 10], [12, 10], [12, 12], [10, 12], [10, 10]]]]},
        "properties": {}}
    assert region(feature).area == pytest.approx(20)
    with pytest.raises(RequestError) as err:
        region({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]})
    assert err.value.status == 422
    default = Threshold()
    assert parse_threshold(None, default) == default
    assert parse_threshold("argmax", default) == Threshold("argmax")
    assert parse_threshold("prob:0.3", default) == Threshold("prob", 0.3)
    assert parse_threshold(0.7, default) == Threshold("prob", 0.7)
