"""``zeus serve``: the HTTP service the Groovy scripts call, tested over real HTTP on 127.0.0.1.

The server runs in a thread on an ephemeral port with the tiny open_clip model; a Java client
(tests/jvm/ZeusClient.java, run with the JDK's single-file launcher) talks to it as QuPath's Groovy
script does. Embedding reuse is checked with the cache's embed counter, never with wall-clock time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import Polygon, box, shape

from zeus_qupath.bridge.embedding_cache import EmbeddingCache, SlideEmbeddings, SlideKey
from zeus_qupath.bridge.qupath_geojson import parse_qupath_geojson
from zeus_qupath.bridge.service import (
    ServiceConfig,
    make_server,
    parse_region,
    parse_threshold,
    resolve_token,
    serve,
)
from zeus_qupath.errors import ZeusError
from zeus_qupath.grid import PatchGeometry, make_grid
from zeus_qupath.reconstruct import Threshold
from zeus_qupath.samples import prompt_path
from zeus_qupath.scores import PatchScores
from zeus_qupath.scoring import cosine_scores
from zeus_qupath.segment import SegmentParams, polygons_from_scores, segment_slide
from zeus_qupath.tissue import TissueMask

TOKEN = "test-token-123"
ROOT = Path(__file__).resolve().parents[1]
JAVA_CLIENT = ROOT / "tests" / "jvm" / "ZeusClient.java"


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An allowed root with a small synthetic slide (and copies), plus a folder outside the root."""
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    base = tmp_path_factory.mktemp("service")
    root = base / "root"
    outside = base / "outside"
    root.mkdir()
    outside.mkdir()
    slide = make_synthetic_slide(root / "small.tif", 2048, 1536, seed=1)
    for name in ("region.tif", "twin.tif"):
        shutil.copy(slide.path, root / name)
    (outside / "secret.tif").write_bytes(slide.path.read_bytes())
    (root / "escape.tif").symlink_to(outside / "secret.tif")
    (root / "alias.tif").symlink_to(root / "small.tif")
    (root / "not_a_slide.tif").write_text("this is not a TIFF\n")
    shutil.copy(prompt_path("cutaneous_metastasis"), root / "my_prompts.json")
    shutil.copy(prompt_path("cutaneous_metastasis"), outside / "other_prompts.json")
    return {"root": root, "outside": outside, "slide": slide}


@pytest.fixture(scope="module")
def server(tiny_model, folders):
    config = ServiceConfig(
        host="127.0.0.1",
        port=0,
        token=TOKEN,
        roots=(str(folders["root"]),),
        model=f"open_clip:{tiny_model.config_path}",
        pretrained=str(tiny_model.checkpoint_path),
        prompts="spindle_cell",
        device="cpu",
        params=SegmentParams(batch_size=64, workers=2),
    )
    srv = make_server(config)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def call(srv, method: str, path: str, body=None, *, token: str | None = TOKEN, raw: bytes | None = None,
         content_type: str = "application/json", headers: dict | None = None):
    """(status, decoded JSON, headers) of one request to the test server."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(srv.url + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        payload = err.read()
        return err.code, json.loads(payload) if payload else None, err.headers


def assert_one_line_error(payload, status):
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    msg = payload["error"]
    assert isinstance(msg, str) and msg and "\n" not in msg and "Traceback" not in msg, (status, msg)


def entry_for(srv, path: Path):
    real = os.path.realpath(path)
    entries = [e for e in srv.service.cache.entries() if e.key.realpath == real]
    assert len(entries) == 1
    return entries[0]


def polygons_of(collection) -> list:
    return [shape(f["geometry"]) for f in collection["features"]]


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
    status, payload, _ = call(server, "POST", "/segment", {"slide": str(root / "small.tif"),
                                                            "prompts": str(outside / "other_prompts.json")})
    assert status == 403
    status, payload, _ = call(server, "POST", "/segment", {"slide": str(root / "small.tif"),
                                                            "pretrained": str(outside / "secret.tif")})
    assert status == 403


def test_missing_slide_is_404(server, folders):
    status, payload, _ = call(server, "POST", "/segment", {"slide": str(folders["root"] / "nope.svs")})
    assert status == 404
    assert_one_line_error(payload, status)
    status, payload, _ = call(server, "POST", "/segment", {"slide": str(folders["root"] / "small.tif"),
                                                            "prompts": "no_such_set"})
    assert status == 404 and "spindle_cell" in payload["error"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"slide": NaN}', b"\xff\xfe", b'"text"'])
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
    {"slide": "/x.tif", "region": {"type": "Polygon", "coordinates": "nope"}},
    {"slide": "/x.tif", "threshold": True},
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
        {"slide": small, "positive_class": "stroma"},
        {"slide": small, "region": {"x": 50000, "y": 50000, "width": 100, "height": 100}},
        {"slide": small, "region": {"x": 0, "y": 0, "width": 0, "height": 10}},
        {"slide": small, "region": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}},
        {"slide": str(root / "not_a_slide.tif")},
        {"slide": small, "model": "no-such-model"},
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
    assert_one_line_error(payload, status)
    assert "RuntimeError: boom" in payload["error"]
    assert "Traceback" in caplog.text  # the traceback goes to the server log only


# --------------------------------------------------------------------------------------------- segmenting


def test_full_slide_answer_is_valid_qupath_geojson(server, folders, tiny_encoder, tmp_path):
    slide = folders["slide"]
    status, payload, headers = call(server, "POST", "/segment", {"slide": str(slide.path)})
    assert status == 200
    entry = entry_for(server, slide.path)
    assert int(headers["X-Zeus-Patches"]) == len(entry.grid) == entry.embedded > 0
    objects = parse_qupath_geojson(payload, source="service")
    assert objects and len(objects) == len(payload["features"])
    for obj in objects:
        assert obj.object_type == "annotation" and obj.class_name == "Tumor"
        assert obj.name == "ZEUS Tumor"
        assert obj.geometry.is_valid and obj.geometry.area > 0
        minx, miny, maxx, maxy = obj.geometry.bounds
        assert 0 <= minx and 0 <= miny and maxx <= slide.width and maxy <= slide.height
        assert obj.measurements["Patches"] > 0
    # the service draws what `zeus segment` draws for the same slide, model and prompts
    spindle = prompt_path("spindle_cell")
    from zeus_qupath.prompts import class_prototypes, load_prompts

    prompts = load_prompts(spindle)
    report = segment_slide(slide.path, tiny_encoder, prompts, class_prototypes(tiny_encoder, prompts),
                           SegmentParams(), tmp_path)
    expected = shapely.union_all(polygons_of(json.loads(Path(report.outputs["geojson"]).read_text())))
    got = shapely.union_all(polygons_of(payload))
    assert got.symmetric_difference(expected).area <= 1e-3 * expected.area


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
    assert shapely.union_all(polygons_of(by_threshold)).equals(shapely.union_all(polygons_of(by_number)))


def test_region_request_embeds_only_patches_in_the_region(server, folders):
    slide = folders["slide"]
    path = folders["root"] / "region.tif"  # a copy: its own, empty cache entry
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

    entry = entry_for(server, path)
    p = entry.grid.geometry.patch_size_l0
    embedded = np.flatnonzero(entry.slots >= 0)
    coords = entry.grid.coords
    meets = np.array([box(x, y, x + p, y + p).intersection(region).area > 0 for x, y in coords])
    assert 0 < len(embedded) < len(entry.grid)
    assert set(embedded.tolist()) == set(np.flatnonzero(meets).tolist())  # exactly the patches in the region
    assert int(headers["X-Zeus-Embedded"]) == int(headers["X-Zeus-Patches"]) == len(embedded)
    assert server.service.cache.stats().embedded_patches - before == len(embedded)

    polys = polygons_of(payload)
    assert polys, "the region holds tumor, so the answer should too"
    for poly in polys:
        assert poly.is_valid
        assert region.buffer(0.02).covers(poly)  # clipped to the region (coordinates at 0.01 px)

    # the windowed mask equals the whole-slide rule over the same patches, clipped the same way
    service = server.service
    _, protos = service.prototypes(*service.default_model, service.default_prompts, None)
    scores = PatchScores(coords=coords[embedded], scores=cosine_scores(entry.features(embedded), protos),
                         classes=("normal", "tumor"), positive_class="tumor", patch_size=p,
                         stride=entry.grid.geometry.stride_l0, width=entry.width, height=entry.height,
                         mpp=entry.mpp, meta={})
    reference = polygons_from_scores(scores, Threshold(), SegmentParams(),
                                     clip=entry.tissue_outline.intersection(region))
    expected = shapely.union_all(reference)
    assert shapely.union_all(polys).symmetric_difference(expected).area <= 1e-3 * expected.area

    # a later full-slide request embeds only the patches the region did not need
    status, payload, headers = call(server, "POST", "/segment", {"slide": str(path), "region": None})
    assert status == 200
    assert int(headers["X-Zeus-Embedded"]) == len(entry.grid) - len(embedded)
    assert entry.embedded == len(entry.grid)


def test_rectangle_region(server, folders):
    small = str(folders["root"] / "small.tif")
    rect = {"x": 300, "y": 200, "width": 900, "height": 700}
    status, payload, headers = call(server, "POST", "/segment", {"slide": small, "region": rect})
    assert status == 200
    region = box(300, 200, 1200, 900)
    for poly in polygons_of(payload):
        assert region.buffer(0.02).covers(poly)
    assert 0 < int(headers["X-Zeus-Patches"]) < len(entry_for(server, folders["slide"].path).grid)


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
    n = len(entry_for(server, Path(path)).grid)
    assert sorted(int(r[2]["X-Zeus-Embedded"]) for r in results) == [0, n]
    assert server.service.cache.stats().embedded_patches - before == n


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


# --------------------------------------------------------------------------------------------- units


def test_startup_fails_fast_with_one_line_errors(tmp_path, tiny_model):
    good = {"port": 0, "token": TOKEN, "model": f"open_clip:{tiny_model.config_path}",
            "pretrained": str(tiny_model.checkpoint_path), "device": "cpu"}
    for kwargs in (
        {"roots": ()},
        {"roots": (str(tmp_path / "absent"),)},
        {"roots": (str(tmp_path),), "model": "open_clip:" + str(tmp_path / "missing.json")},
        {"roots": (str(tmp_path),), "prompts": "no_such_prompts"},
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

    config = ServiceConfig(port=0, roots=(str(folders["root"]),), model=f"open_clip:{tiny_model.config_path}",
                           pretrained=str(tiny_model.checkpoint_path), device="cpu")
    thread = threading.Thread(target=serve, args=(config,), kwargs={"on_ready": on_ready}, daemon=True)
    thread.start()
    try:
        assert ready.wait(timeout=120)
        srv = servers[0]
        out = capsys.readouterr().out
        assert f"listening on {srv.url}" in out and srv.url.startswith("http://127.0.0.1:")
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
    monkeypatch.setenv("ZEUS_TOKEN", "from-env")
    assert resolve_token(ServiceConfig()) == ("from-env", "env")
    assert resolve_token(ServiceConfig(token="given")) == ("given", "config")
    monkeypatch.setenv("OTHER_TOKEN", "other")
    assert resolve_token(ServiceConfig(token_env="OTHER_TOKEN")) == ("other", "env")


def test_parse_region_and_threshold():
    assert parse_region({"x": 10, "y": 20, "width": 30, "height": 40}).equals(box(10, 20, 40, 60))
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    fixed = parse_region(bowtie)
    assert fixed.is_valid and fixed.area == pytest.approx(50)
    feature = {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
        [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]], [[[10, 10], [12, 10], [12, 12], [10, 12], [10, 10]]]]},
        "properties": {}}
    assert parse_region(feature).area == pytest.approx(20)
    default = Threshold()
    assert parse_threshold(None, default) == default
    assert parse_threshold("argmax", default) == Threshold("argmax")
    assert parse_threshold("prob:0.3", default) == Threshold("prob", 0.3)
    assert parse_threshold(0.7, default) == Threshold("prob", 0.7)


def _entry(key: SlideKey, n_patches: int, dim: int = 8) -> SlideEmbeddings:
    tissue = TissueMask(mask=np.ones((1, 1), dtype=bool), downsample=4096.0)
    grid = make_grid(112 * (n_patches + 3), 448, PatchGeometry(448, 112), tissue)
    assert len(grid) == n_patches
    return SlideEmbeddings(key, 112 * (n_patches + 3), 448, None, tissue, grid, dim)


def _key(name: str, size: int = 1, mtime: int = 1) -> SlideKey:
    return SlideKey(f"/slides/{name}", size, mtime, "m", None, 448, 112, None, None, True)


def test_slide_embeddings_store_only_what_is_missing():
    entry = _entry(_key("a"), 10)
    assert entry.missing(np.arange(10)).tolist() == list(range(10))
    feats = np.arange(3 * 8, dtype=np.float32).reshape(3, 8)
    entry.store(np.array([7, 2, 5]), feats)
    assert entry.embedded == 3
    assert entry.missing(np.arange(10)).tolist() == [0, 1, 3, 4, 6, 8, 9]
    np.testing.assert_array_equal(entry.features(np.array([2, 5, 7])), feats[[1, 2, 0]])
    entry.store(np.array([5, 6]), np.ones((2, 8), dtype=np.float32))  # one old, one new
    assert entry.embedded == 4
    np.testing.assert_array_equal(entry.features(np.array([5, 6])), np.ones((2, 8)))
    with pytest.raises(KeyError):
        entry.features(np.array([0]))


def test_embedding_cache_is_an_lru_bounded_by_entries_and_bytes():
    cache = EmbeddingCache(max_entries=2)
    made = []

    def maker(key):
        def create():
            made.append(key.realpath)
            return _entry(key, 5)
        return create

    a, b, c = _key("a"), _key("b"), _key("c")
    ea = cache.get_or_create(a, maker(a))
    assert cache.get_or_create(a, maker(a)) is ea and made == ["/slides/a"]
    cache.get_or_create(b, maker(b))
    cache.get_or_create(a, maker(a))  # a is now the most recent
    cache.get_or_create(c, maker(c))  # evicts b
    assert sorted(e.key.realpath for e in cache.entries()) == ["/slides/a", "/slides/c"]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (2, 3, 1)
    # a new version of a file replaces the old one
    a2 = _key("a", size=2)
    cache.get_or_create(a2, maker(a2))
    assert [e.key for e in cache.entries() if e.key.realpath == "/slides/a"] == [a2]
    # the byte budget evicts the least recently used entries, but never the last one
    small = EmbeddingCache(max_entries=10, max_bytes=1)
    small.get_or_create(a, maker(a))
    small.get_or_create(b, maker(b))
    assert [e.key for e in small.entries()] == [b]
    small.record_embedded(5)
    assert small.stats().embedded_patches == 5 and small.stats().entries == 1
