"""An adapter in the service: per request (a file under a root, "none"), by default, refused when it does not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from service_client import call as service_call
from service_client import running_service

from zeus_qupath.adapter import Adapter, applied_identity
from zeus_qupath.bridge.service import ServiceConfig, ZeusService
from zeus_qupath.bridge.service_schema import RequestError
from zeus_qupath.embedding_cache import EmbeddingCache
from zeus_qupath.errors import ZeusError
from zeus_qupath.models.pool import ModelPool
from zeus_qupath.models.specs import ModelSpec
from zeus_qupath.on_demand import OnDemandSegmenter, SegmentRequest
from zeus_qupath.params import SegmentParams
from zeus_qupath.prompts import load_prompts
from zeus_qupath.samples import prompt_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("adapter-service")
    slide = make_synthetic_slide(root / "s.tif", 2048, 1536, seed=5).path
    spec = ModelSpec(f"open_clip:{tiny_model.config_path}", str(tiny_model.checkpoint_path))
    params = SegmentParams()
    pool = ModelPool("cpu")
    loaded = pool.get(spec)
    prompts = load_prompts(prompt_path("spindle_cell"))
    text = pool.prototypes(loaded, prompts)
    ident = applied_identity(loaded.identity, loaded.precision, params, prompts)
    header = {"identity": ident, "method": {"kind": "ridge", "strength": 0.0}, "slides": [], "cv": {}}
    pos = prompts.class_names.index(prompts.positive_class)
    bias = np.zeros(len(prompts.class_names), np.float32)
    bias[pos] = 10.0  # every patch positive: the outline covers the tissue
    everything = Adapter(text.astype(np.float32), bias, header)
    everything.save(root / "all.npz")
    other = Adapter(text.astype(np.float32), bias, {**header, "identity": {**ident, "model_digest": "another"}})
    other.save(root / "other.npz")
    return {"root": root, "slide": slide, "spec": spec, "params": params, "pool": pool, "everything": everything}


def test_an_adapter_changes_the_request_scores_and_reuses_the_embeddings(setup):
    engine = OnDemandSegmenter(setup["params"], EmbeddingCache(None), setup["pool"])
    req = SegmentRequest(setup["slide"], (setup["spec"],), prompt_path("spindle_cell"))
    zero = engine.segment(req)
    adapted = engine.segment(SegmentRequest(setup["slide"], (setup["spec"],), prompt_path("spindle_cell"),
                                            adapter=setup["everything"]))
    assert zero.embedded > 0 and adapted.embedded == 0  # the request's slide re-scored, nothing embedded
    s = adapted.outline.scores
    assert s.meta["adapter"]["sha256"] == setup["everything"].sha256
    assert np.all(s.scores[:, s.positive_index] > np.delete(s.scores, s.positive_index, axis=1).max(axis=1))
    area = sum(p.area for p in adapted.outline.polygons)
    assert area >= sum(p.area for p in zero.outline.polygons) and area > 0


def test_service_requests_name_an_adapter_or_none(setup):
    root = setup["root"]
    service = ZeusService(ServiceConfig(roots=(str(root),), model=setup["spec"].spec,
                                        pretrained=setup["spec"].pretrained, prompts=str(prompt_path("spindle_cell")),
                                        device="cpu", token="t" * 32, adapter=str(root / "all.npz")))
    assert service.version_info()["adapter"]["sha256"] == setup["everything"].sha256
    assert service.parse_segment_request({"slide": str(setup["slide"])}).adapter is not None  # the default
    assert service.parse_segment_request({"slide": str(setup["slide"]), "adapter": "none"}).adapter is None
    req = service.parse_segment_request({"slide": str(setup["slide"]), "adapter": str(root / "other.npz")})
    with pytest.raises(ZeusError, match="learned with another model"):
        service.segment(req)  # checked before anything is embedded
    (root / "broken.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(RequestError) as exc:
        service.parse_segment_request({"slide": str(setup["slide"]), "adapter": str(root / "broken.npz")})
    assert exc.value.status == 422 and "adapter broken.npz" in str(exc.value)
    with pytest.raises(RequestError) as exc:
        service.parse_segment_request({"slide": str(setup["slide"]), "adapter": "/etc/passwd"})
    assert exc.value.status == 403


def test_a_service_refuses_a_default_adapter_that_does_not_fit(setup):
    root = setup["root"]
    with pytest.raises(ZeusError, match="learned with another model"):
        ZeusService(ServiceConfig(roots=(str(root),), model=setup["spec"].spec, pretrained=setup["spec"].pretrained,
                                  prompts=str(prompt_path("spindle_cell")), device="cpu", token="t" * 32,
                                  adapter=str(root / "other.npz")))


# -- POST /learn: a project's corrections learned by the service, the adapter written into the project ----------


def truth_objects(syn) -> list:
    """The slide's true tumor outline as annotator-drawn Tumor annotations (level-0 px)."""
    import rasterio.features
    from affine import Affine
    from PIL import Image
    from shapely.geometry import shape

    from zeus_qupath.qupath_geojson import QuPathObject

    mask = np.asarray(Image.open(syn.tumor_mask_path)) > 127
    return [QuPathObject(shape(g), class_name="Tumor", color=(200, 0, 0))
            for g, v in rasterio.features.shapes(mask.astype(np.uint8), mask=mask,
                                                 transform=Affine.scale(syn.mask_downsample)) if v == 1]


def _http(srv, method: str, path: str, body=None):
    """(status, decoded JSON) of one request to the learn service."""
    return service_call(srv, method, path, body, token="t" * 32)[:2]


@pytest.fixture(scope="module")
def learn_project(tmp_path_factory, tiny_model, spindle_prompts):
    """Two slides segmented into a project (files backend); the first corrected to its true tumor outline, exported
    as export_training_data.groovy does (<project>/export/<imageName>.geojson); a service over the folder."""
    import json

    from zeus_qupath.cli import main
    from zeus_qupath.qupath_geojson import objects_to_feature_collection
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("learn-route")
    slides = [make_synthetic_slide(root / f"s{i}.tif", 2560, 1792, seed=80 + i, tumor_fraction=0.35) for i in range(2)]
    model = ["--model", f"open_clip:{tiny_model.config_path}", "--pretrained", str(tiny_model.checkpoint_path),
             "--prompts", str(spindle_prompts), "--device", "cpu"]
    project, cache = root / "project", root / "cache"
    assert main(["segment", *(str(s.path) for s in slides), *model, "--quiet", "--out", str(root / "zeus"),
                 "--cache", str(cache), "--project", str(project), "--backend", "files"]) == 0
    names = [e["imageName"] for e in json.loads((project / "project.qpproj").read_text())["images"]]
    first = next(n for n in names if n.startswith("s0"))
    (project / "export").mkdir()
    (project / "export" / f"{first}.geojson").write_text(
        json.dumps(objects_to_feature_collection(truth_objects(slides[0]))))
    (root / "not_a_project").mkdir()
    config = ServiceConfig(host="127.0.0.1", port=0, token="t" * 32, roots=(str(root),),
                           model=f"open_clip:{tiny_model.config_path}", pretrained=str(tiny_model.checkpoint_path),
                           prompts=str(spindle_prompts), device="cpu", cache_dir=str(cache))
    with running_service(config) as srv:
        yield {"root": root, "project": project, "slides": slides, "model": model, "cache": cache, "first": first,
               "server": srv}


def test_learn_route_writes_the_adapter_into_the_project(learn_project, tmp_path):
    from zeus_qupath.cli import main

    srv, project = learn_project["server"], learn_project["project"]
    status, version = _http(srv, "GET", "/version")
    assert status == 200 and "learn" in version["capabilities"]  # what the extension's Learn item waits for
    # the extension sends project.getPath(): the project.qpproj file
    status, answer = _http(srv, "POST", "/learn", {"project": str(project / "project.qpproj"), "force": True})
    assert status == 200, answer
    path = Path(answer["adapter"])
    assert answer["written"] and path.parent == project / "zeus" and path.name == f"adapter-{answer['sha256'][:16]}.npz"
    assert answer["images"] == ["s0"]  # only the corrected image; the untouched one is not used
    assert [r["slide"] for r in answer["cv"]["slides"]] == ["s0 (half 1)", "s0 (half 2)"]
    assert any("0 embedded now, cache hit" in n for n in answer["notes"])  # zeus segment's embeddings reused
    assert not list((project / "zeus").glob(".adapter-learning-*"))
    adapter = Adapter.load(path)
    assert adapter.sha256 == answer["sha256"] and [s["name"] for s in adapter.header["slides"]] == [answer["images"][0]]
    # the same learning on the command line gives the same bytes (one pipeline, deterministic)
    cli = tmp_path / "cli.npz"
    assert main(["learn", str(project), "--cache", str(learn_project["cache"]), "--force", "--out", str(cli),
                 *learn_project["model"]]) == 0
    assert cli.read_bytes() == path.read_bytes()
    # and the service applies it to the other slide
    status, fc = _http(srv, "POST", "/segment", {"slide": str(learn_project["slides"][1].path), "adapter": str(path)})
    assert status == 200 and fc["type"] == "FeatureCollection"


@pytest.mark.parametrize(("body", "status", "words"), [
    ({}, 400, "missing field 'project'"),
    ({"project": 5}, 400, "project must be the absolute path"),
    ({"project": "/p", "colour": 1}, 400, "unknown field 'colour'"),
    ({"project": "relative/path"}, 400, "absolute path"),
    ({"project": "/etc"}, 403, "outside the folders"),
    ({"project": "ROOT/absent"}, 404, "not found"),
    ({"project": "ROOT/not_a_project"}, 422, "not a QuPath project"),
    ({"project": "ROOT/project", "images": ["nobody"]}, 422, "no corrected image named 'nobody'"),
    ({"project": "ROOT/project", "images": []}, 400, "non-empty list"),
    ({"project": "ROOT/project", "model": "keep,conch"}, 422, "one model"),
])
def test_learn_route_refusals_are_one_line_4xx(learn_project, body, status, words):
    root = str(learn_project["root"])
    body = {k: (v.replace("ROOT", root) if isinstance(v, str) else v) for k, v in body.items()}
    got, answer = _http(learn_project["server"], "POST", "/learn", body)
    assert got == status and list(answer) == ["error"] and "\n" not in answer["error"], answer
    assert words in answer["error"]


def test_learn_route_does_not_write_an_adapter_no_better_than_zero_shot(learn_project, monkeypatch):
    monkeypatch.setattr("zeus_qupath.learn.MIN_GAIN", 1.0)  # no adapter can beat zero-shot's Dice by 1.0
    folder = learn_project["project"] / "zeus"
    before = sorted(folder.glob("*")) if folder.exists() else []
    status, answer = _http(learn_project["server"], "POST", "/learn", {"project": str(learn_project["project"])})
    assert status == 200 and answer["written"] is False and answer["adapter"] is None and answer["sha256"] is None
    assert "not better than zero-shot" in answer["message"] and answer["cv"]["better"] is False
    assert (sorted(folder.glob("*")) if folder.exists() else []) == before  # nothing written, no leftover
