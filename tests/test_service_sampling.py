"""``zeus serve --sampling adaptive`` and a request's ``"sampling"``: fewer patches embedded, the exact mask.

A service started with ``--sampling adaptive`` (over real HTTP on 127.0.0.1, the tiny open_clip model,
synthetic slides of its own so that every cache entry starts empty) answers requests that name no
sampling adaptively. The reference is the exact request on the same region (every patch of the region
embedded); the polygons are compared by area (Dice of their unions). Patch counts come from the cache's
own embed counter and from an independent count of the grid patches whose area meets the region.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import shapely
from PIL import Image
from service_client import call as service_call
from service_client import running_service
from shapely.geometry import Polygon, box, shape

from zeus_qupath.bridge.service import ServiceConfig
from zeus_qupath.cli import main as zeus_main
from zeus_qupath.params import SegmentParams

TOKEN = "test-token-sampling-0123456789"


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("service-sampling")
    return {"root": root,
            "region": make_synthetic_slide(root / "region.tif", 2304, 1536, seed=2),
            "whole": make_synthetic_slide(root / "whole.tif", 1536, 1024, seed=3)}


@pytest.fixture(scope="module")
def server(tiny_model, slides):
    """``zeus serve --sampling adaptive``: requests that name no sampling are sampled adaptively."""
    params = SegmentParams(batch_size=64, workers=2, tissue="zeus", sampling="adaptive")
    config = ServiceConfig(host="127.0.0.1", port=0, token=TOKEN, roots=(str(slides["root"]),),
                           prompts="spindle_cell", model=f"open_clip:{tiny_model.config_path}",
                           pretrained=str(tiny_model.checkpoint_path), device="cpu", params=params)
    with running_service(config) as srv:
        yield srv


call = functools.partial(service_call, token=TOKEN)  # (status, decoded JSON, headers) of one request


def entry_of(srv, slide):
    (entry,) = [e for e in srv.service.cache.entries() if (e.width, e.height) == (slide.width, slide.height)]
    return entry


def union(collection):
    return shapely.union_all([shape(f["geometry"]) for f in collection["features"]])


def dice(a, b) -> float:
    return 2 * a.intersection(b).area / (a.area + b.area) if a.area + b.area else 1.0


def embedded_count(srv) -> int:
    return srv.service.cache.stats().embedded_patches


def test_adaptive_region_request_embeds_fewer_patches_and_gives_the_exact_mask(server, slides):
    slide = slides["region"]
    tumor = np.asarray(Image.open(slide.tumor_mask_path)) > 127  # the synthetic slide's known tumor
    rows, cols = np.nonzero(tumor)
    cx, cy = cols.mean() * slide.mask_downsample, rows.mean() * slide.mask_downsample
    region = Polygon([(cx - 500, cy - 400), (cx + 450, cy - 380), (cx + 300, cy + 420), (cx - 420, cy + 250)])
    body = {"slide": str(slide.path), "region": {"type": "Polygon",
                                                 "coordinates": [list(map(list, region.exterior.coords))]}}

    # the service's default (adaptive), on an empty cache entry
    before = embedded_count(server)
    status, adaptive, headers = call(server, "POST", "/segment", body)
    assert status == 200, adaptive
    entry = entry_of(server, slide)
    p = entry.grid.geometry.patch_size_l0
    in_region = {i for i, (x, y) in enumerate(entry.grid.coords) if box(x, y, x + p, y + p).intersection(region).area}
    sampling = json.loads(headers["X-Zeus-Sampling"])
    n_adaptive = int(headers["X-Zeus-Embedded"])
    assert sampling["mode"] == "adaptive" and sampling["embedded_now"] == n_adaptive
    assert int(headers["X-Zeus-Region-Patches"]) == len(in_region) == sampling["grid_patches"]
    assert 0 < n_adaptive < len(in_region)  # fewer than the exact request on a fresh cache embeds
    assert embedded_count(server) - before == n_adaptive
    touched = set(np.flatnonzero(entry.slots != -1).tolist())  # embedded, or read and dropped as white/black
    assert len(touched) == n_adaptive and touched <= in_region  # only the region's patches
    assert int(headers["X-Zeus-Patches"]) == sampling["scored"] == int(np.sum(entry.slots >= 0))

    # the exact request on the same region embeds only the rest (the memory tier kept the adaptive ones)
    status, exact, headers = call(server, "POST", "/segment", {**body, "sampling": "exact"})
    assert status == 200, exact
    assert json.loads(headers["X-Zeus-Sampling"]) == {"mode": "exact"}
    assert int(headers["X-Zeus-Embedded"]) == len(in_region) - n_adaptive
    assert embedded_count(server) - before == len(in_region)
    assert set(np.flatnonzero(entry.slots != -1).tolist()) == in_region

    # the masks: the adaptive polygons cover what the exact ones cover
    want, got = union(exact), union(adaptive)
    assert want.area > 0, "the region holds tumor, so the exact answer should too"
    assert region.buffer(0.02).covers(got)
    assert dice(got, want) >= 0.999

    # every patch of the region is cached now: an adaptive request has nothing to save and answers exactly
    status, again, headers = call(server, "POST", "/segment", body)
    assert status == 200 and headers["X-Zeus-Embedded"] == "0"
    assert json.loads(headers["X-Zeus-Sampling"])["mode"] == "exact"
    assert dice(union(again), want) == pytest.approx(1.0, abs=1e-12)


def test_adaptive_whole_slide_request_then_exact_embeds_the_rest(server, slides):
    slide = slides["whole"]
    before = embedded_count(server)
    status, adaptive, headers = call(server, "POST", "/segment", {"slide": str(slide.path), "sampling": "adaptive"})
    assert status == 200, adaptive
    entry = entry_of(server, slide)
    n_adaptive = int(headers["X-Zeus-Embedded"])
    assert int(headers["X-Zeus-Region-Patches"]) == len(entry.grid)
    assert 0 < n_adaptive < len(entry.grid) and not entry.complete
    status, exact, headers = call(server, "POST", "/segment", {"slide": str(slide.path), "sampling": "exact"})
    assert status == 200, exact
    assert int(headers["X-Zeus-Embedded"]) == len(entry.grid) - n_adaptive
    assert entry.complete and embedded_count(server) - before == len(entry.grid)
    want = union(exact)
    assert want.area > 0
    assert dice(union(adaptive), want) >= 0.999


@pytest.mark.parametrize("value", ["fast", "Adaptive", "", 1, True, ["exact"], {"mode": "exact"}])
def test_bad_sampling_is_a_one_line_4xx(server, slides, value):
    before = embedded_count(server)
    status, payload, _ = call(server, "POST", "/segment", {"slide": str(slides["whole"].path), "sampling": value})
    assert 400 <= status < 500 and set(payload) == {"error"}, (status, payload)
    assert payload["error"] == 'sampling must be "exact" or "adaptive"'
    assert embedded_count(server) == before


def test_version_and_openapi_name_sampling(server):
    status, version, _ = call(server, "GET", "/version")
    assert status == 200 and version["sampling"] == "adaptive" and "sampling" in version["capabilities"]
    status, doc, _ = call(server, "GET", "/openapi.json")
    schema = doc["paths"]["/segment"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    choices = {v for option in schema["properties"]["sampling"]["anyOf"] for v in option.get("enum", [])}
    assert choices == {"exact", "adaptive"}


def test_serve_sampling_option_sets_the_service_default(monkeypatch, tmp_path, capsys):
    """``zeus serve --sampling`` shares zeus segment's option: its value is the default of requests that name none."""
    import zeus_qupath.bridge.service as service

    seen = []
    monkeypatch.setattr(service, "serve", lambda config, on_ready=None: seen.append(config))
    assert zeus_main(["serve", "--root", str(tmp_path), "--sampling", "adaptive"]) == 0
    assert zeus_main(["serve", "--root", str(tmp_path)]) == 0
    assert [c.params.sampling for c in seen] == ["adaptive", "exact"]
    with pytest.raises(SystemExit) as exit_:
        zeus_main(["serve", "--root", str(tmp_path), "--sampling", "fast"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--sampling" in err and "fast" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------- the engine alone


def tumor_box(slide, half: float = 550.0):
    tumor = np.asarray(Image.open(slide.tumor_mask_path)) > 127
    rows, cols = np.nonzero(tumor)
    cx, cy = cols.mean() * slide.mask_downsample, rows.mean() * slide.mask_downsample
    return box(cx - half, cy - half * 0.8, cx + half, cy + half * 0.8)


def outline_union(result):
    return shapely.union_all(result.outline.polygons)


@pytest.mark.slow
def test_ensemble_embeds_the_chosen_patches_once_per_model(slides, tiny_model, tmp_path):
    """Two models (the tiny one and a perturbed copy): each model's entry embeds the same chosen patches."""
    import torch

    from zeus_qupath.embedding_cache import EmbeddingCache
    from zeus_qupath.models.pool import ModelPool
    from zeus_qupath.models.specs import ModelSpec
    from zeus_qupath.on_demand import OnDemandSegmenter, SegmentRequest
    from zeus_qupath.samples import prompt_path

    state = torch.load(tiny_model.checkpoint_path, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    other = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() and v.ndim >= 2 else v
             for k, v in state.items()}
    torch.save(other, tmp_path / "other.pt")
    config = f"open_clip:{tiny_model.config_path}"
    specs = (ModelSpec(config, str(tiny_model.checkpoint_path)), ModelSpec(config, str(tmp_path / "other.pt")))
    pool = ModelPool("cpu", max_models=2)
    slide = slides["region"]
    region = tumor_box(slide)

    def segment(sampling):
        engine = OnDemandSegmenter(SegmentParams(tissue="zeus"), EmbeddingCache(None), pool)
        result = engine.segment(SegmentRequest(slide.path, specs, prompt_path("spindle_cell"), region=region,
                                               sampling=sampling))
        return result, engine.cache.entries()

    adaptive, entries = segment("adaptive")
    exact, _ = segment("exact")
    assert len(entries) == 2
    touched = [set(np.flatnonzero(e.slots != -1).tolist()) for e in entries]
    assert touched[0] == touched[1] and adaptive.embedded == 2 * len(touched[0])  # one embedding per model
    assert adaptive.sampling["mode"] == "adaptive" and len(touched[0]) == adaptive.sampling["embedded"]
    assert len(touched[0]) < adaptive.covered == exact.covered and exact.embedded == 2 * exact.covered
    assert adaptive.outline.scores.meta["ensemble"]
    want = outline_union(exact)
    assert want.area > 0 and dice(outline_union(adaptive), want) >= 0.999


def test_adapter_requests_sample_with_the_adapter_scores(slides, tiny_model, tmp_path):
    """With zeus learn's adapter the rule bounds the adapter's scores: the exact adapted mask, fewer patches."""
    from zeus_qupath.adapter import Adapter, applied_identity
    from zeus_qupath.embedding_cache import EmbeddingCache
    from zeus_qupath.models.pool import ModelPool
    from zeus_qupath.models.specs import ModelSpec
    from zeus_qupath.on_demand import OnDemandSegmenter, SegmentRequest
    from zeus_qupath.prompts import load_prompts
    from zeus_qupath.samples import prompt_path

    spec = ModelSpec(f"open_clip:{tiny_model.config_path}", str(tiny_model.checkpoint_path))
    params = SegmentParams(tissue="zeus")
    pool = ModelPool("cpu")
    loaded = pool.get(spec)
    prompts = load_prompts(prompt_path("spindle_cell"))
    text = pool.prototypes(loaded, prompts).astype(np.float32)
    rng = np.random.default_rng(0)
    weights = (text + 0.3 * rng.normal(size=text.shape)).astype(np.float32)  # not the zero-shot prototypes
    header = {"identity": applied_identity(loaded.identity, loaded.precision, params, prompts),
              "method": {"kind": "ridge", "strength": 0.5}, "slides": [], "cv": {}}
    adapter = Adapter(weights, np.zeros(len(prompts.class_names), np.float32), header)
    slide = slides["region"]
    region = tumor_box(slide)

    def segment(sampling):
        engine = OnDemandSegmenter(params, EmbeddingCache(None), pool)
        return engine.segment(SegmentRequest(slide.path, (spec,), prompt_path("spindle_cell"), region=region,
                                             adapter=adapter, sampling=sampling))

    adaptive, exact = segment("adaptive"), segment("exact")
    assert adaptive.outline.scores.meta["adapter"]["sha256"] == adapter.sha256
    assert 0 < adaptive.embedded < exact.embedded == exact.covered
    want = outline_union(exact)
    assert want.area > 0 and dice(outline_union(adaptive), want) >= 0.999
