"""Light commands (polygons, evaluate, project add, export) load no model code: each runs as its own process.

Python's ``-X importtime`` logs every module a process imports, including those imported inside
functions at run time, so the whole command (parsing, work, output) is covered, not just its module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import box, mapping, shape

from zeus_qupath.outputs import PatchScores

from conftest import shared_file

# the model side: none of these may be imported by a light command
MODEL_MODULES = ("torch", "torchvision", "open_clip", "transformers", "timm", "conch", "musk",
                 "zeus_qupath.models", "zeus_qupath.embed", "zeus_qupath.identity", "zeus_qupath.runs.local_executor",
                 "zeus_qupath.runs.ray_executor")

SLIDE = "CMU-1-Small-Region.svs"  # 2220 x 2967 px, 0.499 um/px
WIDTH, HEIGHT, MPP = 2220, 2967, 0.499
TUMOR = box(560, 672, 1680, 2240)  # level-0 px: patches whose centre lies here score tumor


def run_light(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``zeus ARGS`` in a fresh interpreter; its result and every module it imported."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "zeus_qupath", *args], cwd=cwd,
                         capture_output=True, text=True, timeout=600)
    modules = {line.rsplit("|", 1)[1].strip() for line in res.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    modules.discard("imported package")  # the header line
    assert res.returncode == 0, [line for line in res.stderr.splitlines() if not line.startswith("import time:")]
    assert "zeus_qupath.cli" in modules  # the log is complete (it names the command's own module)
    return res, modules


def model_side(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == top or m.startswith(top + ".") for top in MODEL_MODULES))


def make_scores(path: Path) -> PatchScores:
    """A 448/112 grid over the test slide: tumor where a patch's centre is inside TUMOR, normal elsewhere."""
    xs, ys = np.arange(0, WIDTH - 447, 112), np.arange(0, HEIGHT - 447, 112)
    coords = np.array([(x, y) for y in ys for x in xs], dtype=np.int64)
    centres = shapely.points(coords + 224)
    tumor = shapely.contains(TUMOR, centres)
    rng = np.random.default_rng(3)
    values = np.where(tumor[:, None], [0.20, 0.26], [0.26, 0.20]) + rng.normal(0, 0.002, (len(coords), 2))
    scores = PatchScores(coords, values.astype(np.float32), ("normal", "tumor"), "tumor", 448, 112, WIDTH, HEIGHT,
                         MPP, meta={"slide": SLIDE, "logit_scale": 100.0})
    scores.save(path)
    return scores


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A ZEUS output folder for the test slide, as ``zeus segment`` leaves it (scores, GeoJSON, run.json)."""
    out = tmp_path_factory.mktemp("light") / "out"
    out.mkdir()
    make_scores(out / "CMU-1-Small-Region.scores.npz")
    slide = shared_file("wsi", SLIDE)
    report = {"slide": str(slide), "stem": "CMU-1-Small-Region", "width": WIDTH, "height": HEIGHT, "mpp": MPP,
              "outputs": {"geojson": str(out / "CMU-1-Small-Region.geojson"),
                          "scores": str(out / "CMU-1-Small-Region.scores.npz")}}
    run = {"started": "2026-01-02T03:04:05+00:00", "command": "segment", "model": {"spec": "quiltnet-b32"},
           "prompts": {"file": "spindle_cell.json"}, "versions": {"zeus-qupath": "0.1.0"}, "slides": [report],
           "complete": True}
    (out / "run.json").write_text(json.dumps(run))
    return out


@pytest.fixture(scope="module")
def polygons_run(results):
    return run_light("polygons", str(results / "CMU-1-Small-Region.scores.npz"), cwd=results.parent)


@pytest.mark.slow
def test_polygons_loads_no_model_code(polygons_run, results):
    res, modules = polygons_run
    assert model_side(modules) == []
    feats = json.loads((results / "CMU-1-Small-Region.geojson").read_text())["features"]
    assert len(feats) == 1 and res.stdout.startswith("1 regions")
    # the tumor block, grown and rounded by the patch footprint and the blur, never outside the slide
    region = shape(feats[0]["geometry"])
    assert region.intersection(TUMOR).area > 0.95 * TUMOR.area
    assert box(0, 0, WIDTH, HEIGHT).contains(region)


@pytest.mark.slow
def test_evaluate_loads_no_model_code(polygons_run, results):
    gt = results.parent / "gt.geojson"
    gt.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "id": str(uuid.uuid4()), "geometry": mapping(TUMOR),
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}}]}))
    res, modules = run_light("evaluate", str(results / "CMU-1-Small-Region.geojson"), str(gt),
                             "--size", f"{WIDTH},{HEIGHT}", cwd=results.parent)
    assert model_side(modules) == []
    assert "cv2" not in modules  # two GeoJSON files: no OpenCV either (only a tissue mask detected on a slide)
    # the Dice of the polygons themselves (exact areas), against the command's raster count at 1 px
    pred = shapely.union_all([shape(f["geometry"]) for f in
                              json.loads((results / "CMU-1-Small-Region.geojson").read_text())["features"]])
    exact = 2 * pred.intersection(TUMOR).area / (pred.area + TUMOR.area)
    assert json.loads(res.stdout)["dice"] == pytest.approx(exact, abs=2e-3)


@pytest.mark.slow
def test_project_add_and_export_load_no_model_code(polygons_run, results):
    project = results.parent / "project"
    res, modules = run_light("project", "add", str(project), str(results), "--backend", "files", cwd=results.parent)
    assert model_side(modules) == []
    (entry,) = json.loads((project / "project.qpproj").read_text())["images"]
    zeus = json.loads((project / "data" / str(entry["entryID"]) / "zeus_annotations.geojson").read_text())
    # the annotator removes the right half of ZEUS's region; QuPath's export script writes export/<image>.geojson
    (first,) = zeus["features"]
    outline = shape(first["geometry"])
    minx, miny, maxx, maxy = outline.bounds
    first["geometry"] = mapping(outline.difference(box((minx + maxx) / 2, miny, maxx, maxy)))
    (project / "export").mkdir()
    (project / "export" / f"{entry['imageName']}.geojson").write_text(json.dumps(zeus))
    res, modules = run_light("export", str(project), "--out", str(results.parent / "exported"), "--backend", "files",
                             cwd=results.parent)
    assert model_side(modules) == []
    assert (results.parent / "exported" / "corrections.csv").is_file()
