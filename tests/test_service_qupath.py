"""groovy/zeus_segment_current_image.groovy against a live ``zeus serve``, in real QuPath (0.4.4 to 0.7.0).

The script runs through the real-QuPath harness (*Run for project* on a project written by the project
writer; the slide is opened by the harness's test-only image server), sends its request to the service
over HTTP, and merges the answer with the keep-edits rule. Checked against the service's own answer
(the independent reference): the annotations QuPath saved are the service's polygons; a second run after
an annotator's edit replaces the untouched ones and keeps the edited one.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import shapely
from service_client import running_service
from shapely import affinity
from shapely.geometry import shape

from zeus_qupath.bridge.project_files import FilesProject
from zeus_qupath.bridge.service import ServiceConfig
from zeus_qupath.params import SegmentParams

from qupath.fixtures import qupath_or_skip
from qupath.harness import VERSIONS, QuPath, route_images_to_test_server

pytestmark = [pytest.mark.jvm, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "groovy" / "zeus_segment_current_image.groovy"
TOKEN = "qupath-test-token-0123456789"
W, H = 2048, 1536


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    return make_synthetic_slide(tmp_path_factory.mktemp("slides") / "case.tif", W, H, seed=5).path


@pytest.fixture(scope="module")
def server(tiny_model, slide):
    config = ServiceConfig(port=0, token=TOKEN, roots=(str(slide.parent),), model=f"open_clip:{tiny_model.config_path}",
                           pretrained=str(tiny_model.checkpoint_path), device="cpu",
                           params=SegmentParams(tissue="coarse"))
    with running_service(config) as srv:
        yield srv


@pytest.fixture(scope="module", params=VERSIONS)
def qupath(request, tmp_path_factory) -> QuPath:
    return qupath_or_skip(request.param, tmp_path_factory)


def script_for(server, tmp: Path) -> Path:
    """The script with its SERVICE_URL and TOKEN parameters set, as a user edits them."""
    text = SCRIPT.read_text(encoding="utf-8")
    for old, new in ((" SERVICE_URL = 'http://127.0.0.1:8765/segment'", f" SERVICE_URL = '{server.url}/segment'"),
                     (" TOKEN = ''", f" TOKEN = '{TOKEN}'")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp / "zeus_segment_current_image.groovy"
    path.write_text(text, encoding="utf-8")
    return path


def service_answer(server, slide: Path) -> dict:
    req = urllib.request.Request(server.url + "/segment", data=json.dumps({"slide": str(slide)}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def test_script_segments_the_open_image_and_keeps_edits(qupath: QuPath, server, slide: Path, tmp_path: Path):
    project = tmp_path / "project"
    with FilesProject(project) as proj:
        proj.add_or_update_image(slide, [], width=W, height=H, mpp=0.5, levels=[(W, H)])
    route_images_to_test_server(project)  # STAND-IN: the slide is opened by the test-only image server
    script = script_for(server, tmp_path)
    expected = [shape(f["geometry"]) for f in service_answer(server, slide)["features"]]
    assert expected, "the synthetic slide holds tumor"

    (run,) = qupath.run_for_project(project, script, save=False)  # the script saves by itself (SAVE)
    assert run.error is None, run.error
    assert f"Added {len(expected)} ZEUS annotation(s), replaced 0" in run.output, run.output
    entry = qupath.load_project(project).entry("case.tif")
    got = [o for o in entry.annotations if o.name == "ZEUS Tumor"]
    assert len(got) == len(expected) and all(o.class_name == "Tumor" for o in got)
    union, want = shapely.union_all([o.geometry for o in got]), shapely.union_all(expected)
    assert union.symmetric_difference(want).area <= 1e-4 * want.area  # QuPath 0.6 stores float32
    assert (entry.entry_path / "zeus_service.geojson").is_file()
    record = json.loads((entry.entry_path / "zeus_imported.json").read_text())
    assert sorted(record["objects"]) == sorted(o.id for o in got)

    # the annotator moves one ZEUS annotation; the next run replaces only the untouched ones
    moved = got[0]
    qupath.edit(project, [{"image": "case.tif", "op": "translate", "id": moved.id, "dx": 40, "dy": 0}])
    (run,) = qupath.run_for_project(project, script, save=False)
    assert run.error is None, run.error
    assert f"replaced {len(expected) - 1} untouched one(s)" in run.output, run.output
    entry = qupath.load_project(project).entry("case.tif")
    after = {o.id: o for o in entry.annotations}
    assert moved.id in after  # the edited object is kept ...
    shifted = affinity.translate(moved.geometry, 40, 0)
    assert after[moved.id].geometry.symmetric_difference(shifted).area <= 1e-3 * shifted.area  # ... as edited
    assert not ({o.id for o in got} - {moved.id}) & set(after)  # the untouched ones were replaced
    assert len(after) == len(expected)  # the new object over the edited one was not added
    assert list(entry.entry_path.glob("zeus_service.geojson.bak-*"))  # the previous answer kept as a backup


@pytest.fixture(scope="module")
def qupath_latest(tmp_path_factory) -> QuPath:
    return qupath_or_skip(VERSIONS[-1], tmp_path_factory)


def test_a_zeus_outline_as_the_region_does_not_block_its_own_answer(qupath_latest: QuPath, server, slide: Path,
                                                                    tmp_path: Path):
    """The extension's *Segment selected annotation(s)* on a ZEUS outline (ANSWER_FILE, REGION_ID): the answer
    inside it is added and the outline stays with its import record (it was once read as deleted by the annotator,
    so its own area blocked every new outline)."""
    import uuid

    project = tmp_path / "project"
    with FilesProject(project) as proj:
        proj.add_or_update_image(slide, [], width=W, height=H, mpp=0.5, levels=[(W, H)])
    route_images_to_test_server(project)  # STAND-IN: the slide is opened by the test-only image server
    (run,) = qupath_latest.run_for_project(project, script_for(server, tmp_path), save=False)
    assert run.error is None, run.error
    entry = qupath_latest.load_project(project).entry("case.tif")
    region = max((o for o in entry.annotations if o.name == "ZEUS Tumor"), key=lambda o: o.geometry.area)

    answer = service_answer(server, slide)
    inner = region.geometry.representative_point().buffer(6, cap_style="square")
    assert region.geometry.contains(inner)
    feature = dict(answer["features"][0], id=str(uuid.uuid4()), geometry=shapely.geometry.mapping(inner))
    answer_file = tmp_path / "answer.json"
    answer_file.write_text(json.dumps(dict(answer, features=[feature])), encoding="utf-8")
    text = script_for(server, tmp_path).read_text(encoding="utf-8")
    for old, new in (("String ANSWER_FILE = ''", f"String ANSWER_FILE = '{answer_file}'"),
                     ("String REGION_ID = ''", f"String REGION_ID = '{region.id}'")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    script = tmp_path / "with_answer.groovy"
    script.write_text(text, encoding="utf-8")

    (run,) = qupath_latest.run_for_project(project, script, save=False)
    assert run.error is None, run.error
    assert "Added 1 ZEUS annotation(s)" in run.output, run.output
    entry = qupath_latest.load_project(project).entry("case.tif")
    after = {o.id: o for o in entry.annotations}
    assert region.id in after and after[region.id].geometry.symmetric_difference(region.geometry).area < 1e-3
    assert feature["id"] in after
    assert after[feature["id"]].geometry.symmetric_difference(inner).area <= 1e-3 * inner.area
    record = json.loads((entry.entry_path / "zeus_imported.json").read_text())
    assert region.id in record["objects"] and feature["id"] in record["objects"]
