"""An adapter in the service: per request (a file under a root, "none"), by default, refused when it does not fit."""

from __future__ import annotations

import numpy as np
import pytest

from zeus_qupath.adapter import Adapter, applied_identity
from zeus_qupath.bridge.service import ServiceConfig, ZeusService
from zeus_qupath.bridge.service_schema import RequestError
from zeus_qupath.embedding_cache import EmbeddingCache
from zeus_qupath.errors import ZeusError
from zeus_qupath.models.pool import ModelPool
from zeus_qupath.models.specs import ModelSpec
from zeus_qupath.on_demand import OnDemandSegmenter, SegmentRequest
from zeus_qupath.prompts import load_prompts
from zeus_qupath.samples import prompt_path
from zeus_qupath.segment import SegmentParams

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
