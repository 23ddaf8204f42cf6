"""What zeus writes, read by real QuPath (qupath-core 0.4.4, 0.5.1, 0.6.0, 0.7.0): PathIO, ProjectIO, images.

``zeus segment --project`` runs once (tiny model) on the two real test slides and a synthetic one; QuPath's
own readers must then give back, for every object, the ID, name, class, colour, measurements and geometry
that were written, and load the project with its entries, URIs, metadata and classes. The test-only image
server stand-in (tests/qupath/java) must serve the slides' own pixels (reference: tiffslide).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import shape

from zeus_qupath.bridge.project_files import ZEUS_GEOJSON
from zeus_qupath.bridge.uris import path_to_file_uri
from zeus_qupath.cli import main
from zeus_qupath.qupath_geojson import QuPathObject

from conftest import shared_file
from qupath.fixtures import qupath_or_skip
from qupath.harness import VERSIONS, QuPath, route_images_to_test_server

pytestmark = [pytest.mark.jvm, pytest.mark.slow]


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, tiny_model, spindle_prompts) -> dict:
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("qupath-io")
    synthetic = make_synthetic_slide(root / "synthetic.tif", 2048, 1536, seed=7, tumor_fraction=0.4).path
    slides = [shared_file("wsi", "CMU-1-Small-Region.svs"), shared_file("wsi", "OS-1-detail.ome.tif"), synthetic]
    out, project = root / "out", root / "project"
    args = ["segment", *map(str, slides), "--model", f"open_clip:{tiny_model.config_path}",
            "--pretrained", str(tiny_model.checkpoint_path), "--prompts", str(spindle_prompts), "--device", "cpu",
            "--quiet", "--out", str(out), "--project", str(project), "--backend", "files"]
    assert main(args) == 0
    return {"out": out, "project": project, "slides": slides}


@pytest.fixture(scope="module", params=VERSIONS)
def qupath(request, tmp_path_factory) -> QuPath:
    return qupath_or_skip(request.param, tmp_path_factory)


def assert_as_written(objects: list[QuPathObject], path: Path) -> None:
    """QuPath's objects are the file's features: ids, names, classes, colours, measurements, geometry."""
    features = json.loads(path.read_text(encoding="utf-8"))["features"]
    assert [o.id for o in objects] == [f["id"] for f in features]
    for obj, f in zip(objects, features, strict=True):
        props = f["properties"]
        assert obj.object_type == props["objectType"] == "annotation"
        assert obj.name == props["name"]
        assert obj.class_name == props["classification"]["name"]
        assert list(obj.color) == props["classification"]["color"]
        assert obj.measurements.keys() == props["measurements"].keys()
        for key, value in props["measurements"].items():  # QuPath keeps them as float32
            assert obj.measurements[key] == pytest.approx(value, rel=2**-23, abs=1e-30), key
        written = shape(f["geometry"])
        assert shapely.get_num_coordinates(obj.geometry) == shapely.get_num_coordinates(written)
        assert obj.geometry.symmetric_difference(written).area <= 1e-4 * written.area
        assert obj.geometry.is_valid


def test_segment_output_read_by_pathio(qupath: QuPath, segmented: dict) -> None:
    files = sorted(segmented["out"].glob("*.geojson"))
    assert len(files) == 3
    n = 0
    for path in files:
        objects = qupath.read_geojson(path)
        assert_as_written(objects, path)
        n += len(objects)
    assert n > 0


def test_project_loaded_by_projectio(qupath: QuPath, segmented: dict) -> None:
    project = segmented["project"]
    view = qupath.load_project(project)
    qpproj = json.loads((project / "project.qpproj").read_text(encoding="utf-8"))
    assert [e.name for e in view.entries] == [Path(s).name for s in segmented["slides"]]
    assert view.classes["Tumor"] == (200 << 16) | (0 << 8) | 0
    for entry, written in zip(view.entries, qpproj["images"], strict=True):
        assert entry.id == str(written["entryID"])
        assert entry.metadata == written["metadata"] and entry.metadata["zeus.status"] == "pre-segmented"
        assert entry.uris == [written["serverBuilder"]["uri"]]
        slide = next(s for s in segmented["slides"] if Path(s).name == entry.name)
        assert entry.uris[0] == path_to_file_uri(slide)
        assert not entry.has_image_data  # QuPath writes data.qpdata; the files backend never does
        zeus_file = entry.entry_path / ZEUS_GEOJSON
        assert zeus_file.parent == project / "data" / entry.id
        assert_as_written(qupath.read_geojson(zeus_file), zeus_file)
        stem_output = segmented["out"] / (Path(entry.name).name.split(".")[0] + ".geojson")
        assert json.loads(zeus_file.read_text())["features"] == json.loads(stem_output.read_text())["features"]


SERVER_CHECK = """
import qupath.lib.images.writers.ImageWriterTools
import qupath.lib.regions.RegionRequest
import static qupath.lib.scripting.QP.*
def server = getCurrentImageData().getServer()
def name = getProjectEntry().getImageName()
def cal = server.getPixelCalibration()
println "SERVER ${name}|${server.getWidth()}|${server.getHeight()}|${cal.getPixelWidthMicrons()}"
def request = RegionRequest.createInstance(server.getPath(), 1.0, 200, 300, 400, 256)
ImageWriterTools.writeImageRegion(server, request, new File(args_dir, name + '.png').getPath())
"""


def test_stand_in_server_serves_the_slides_pixels(qupath: QuPath, segmented: dict, tmp_path: Path) -> None:
    import tiffslide

    project = tmp_path / "project"
    import shutil

    shutil.copytree(segmented["project"], project)
    assert route_images_to_test_server(project) == 3  # STAND-IN for Bio-Formats on this machine
    script = tmp_path / "server_check.groovy"
    script.write_text(SERVER_CHECK.replace("args_dir", f"new File('{tmp_path.as_posix()}')"), encoding="utf-8")
    runs = qupath.run_for_project(project, script, save=False)
    assert [r.error for r in runs] == [None, None, None], runs
    qpproj = json.loads((project / "project.qpproj").read_text(encoding="utf-8"))
    for run, entry in zip(runs, qpproj["images"], strict=True):
        name, width, height, mpp = run.output.split("SERVER ", 1)[1].split("\n", 1)[0].split("|")
        meta = entry["serverBuilder"]["metadata"]
        assert (int(width), int(height)) == (meta["width"], meta["height"])
        assert float(mpp) == pytest.approx(meta["pixelCalibration"]["pixelWidth"]["value"])
        slide = next(s for s in segmented["slides"] if Path(s).name == name)
        with tiffslide.TiffSlide(slide) as ts:
            reference = np.asarray(ts.read_region((200, 300), 0, (400, 256)).convert("RGB"), dtype=np.int16)
        served = np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB"), dtype=np.int16)
        assert served.shape == reference.shape
        diff = np.abs(served - reference)
        assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 8, (name, diff.mean(), diff.max())  # JPEG decoders
