"""The learning loop on real QuPath (qupath-core through the harness): correct, export, learn, re-segment, import.

1. ``zeus segment --project`` (tiny model) pre-segments three slides; *Run for project* of the import script;
2. the annotator corrects alpha and beta through QuPath's API (deletes ZEUS's outlines, draws the true tumor
   outline) and edits gamma a little (moves one ZEUS outline, draws one); everything saved (``saveImageData``);
3. ``export_training_data.groovy`` *Run for project* writes ``export/``;
4. ``zeus learn PROJECT --images alpha.tif beta.tif`` (the files backend: what the export script wrote);
5. ``zeus segment --adapter`` re-segments all three into the project; *Run for project* of the import script.

Asserted: every annotator edit is kept (alpha's and beta's corrections, gamma's edits), no deleted outline
comes back, gamma's untouched ZEUS outlines are replaced by the adapted ones, and the entries record the
adapter. ``ZEUS_TEST_LEARN_LOOP_VERSIONS`` (default ``0.6.0,0.7.0``) picks the QuPath versions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio.features
import shapely
from affine import Affine
from PIL import Image
from shapely.geometry import shape

from zeus_qupath.bridge.edits import same_geometry
from zeus_qupath.bridge.project_files import ZEUS_GEOJSON
from zeus_qupath.cli import main
from zeus_qupath.samples import prompt_path

from qupath.fixtures import qupath_or_skip
from qupath.harness import QuPath, route_images_to_test_server

pytestmark = [pytest.mark.jvm, pytest.mark.slow]

SIZES = {"alpha.tif": (2560, 1792, 41), "beta.tif": (2560, 1792, 42), "gamma.tif": (2560, 1792, 43)}
VERSIONS = os.environ.get("ZEUS_TEST_LEARN_LOOP_VERSIONS", "0.6.0,0.7.0").split(",")


@pytest.fixture(scope="module", params=VERSIONS)
def qupath(request, tmp_path_factory) -> QuPath:
    return qupath_or_skip(request.param.strip(), tmp_path_factory)


def truth(syn) -> list[shapely.Polygon]:
    """The slide's true tumor regions (level-0 px), largest first, simplified as an annotator would draw them."""
    mask = np.asarray(Image.open(syn.tumor_mask_path)) > 127
    ds = syn.mask_downsample
    polys = [shape(g) for g, v in rasterio.features.shapes(mask.astype(np.uint8), mask=mask,
                                                            transform=Affine.scale(ds)) if v == 1]
    polys = [p.simplify(4).buffer(0) for p in polys if p.area >= 4 * ds * ds]
    return sorted((p for p in polys if p.geom_type == "Polygon" and p.is_valid), key=lambda p: -p.area)[:4]


def annotations(qupath: QuPath, project: Path) -> dict[str, dict[str, object]]:
    return {e.name: {o.id: o for o in e.annotations} for e in qupath.load_project(project).entries}


def test_learning_loop_in_qupath(qupath: QuPath, tiny_model, tmp_path: Path) -> None:
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    syn = {name: make_synthetic_slide(tmp_path / name, w, h, seed=seed, tumor_fraction=0.4)
           for name, (w, h, seed) in SIZES.items()}
    project, cache = tmp_path / "project", tmp_path / "cache"
    model = ["--model", f"open_clip:{tiny_model.config_path}", "--pretrained", str(tiny_model.checkpoint_path),
             "--prompts", str(prompt_path("spindle_cell")), "--device", "cpu"]
    slides = [str(s.path) for s in syn.values()]

    # 1. pre-segment, import
    assert main(["segment", *slides, *model, "--quiet", "--out", str(tmp_path / "zs"), "--cache", str(cache),
                 "--project", str(project), "--backend", "files"]) == 0
    assert route_images_to_test_server(project) == len(SIZES)  # STAND-IN: the test image server opens the slides
    import_script = project / "scripts" / "import_zeus_annotations.groovy"
    assert [r.error for r in qupath.run_for_project(project, import_script)] == [None] * len(SIZES)
    first = annotations(qupath, project)
    assert all(first.values()), "the tiny model found nothing to correct on some slide"

    # 2. the annotator corrects alpha and beta in full, edits gamma a little, and saves
    edits: list[dict[str, object]] = []
    drawn_on: list[str] = []
    for name in ("alpha.tif", "beta.tif"):
        edits += [{"image": name, "op": "delete", "id": i} for i in first[name]]
        for poly in truth(syn[name]):
            edits.append({"image": name, "op": "draw", "wkt": poly.wkt, "class": "Tumor"})
            drawn_on.append(name)
    gamma = sorted(first["gamma.tif"].values(), key=lambda o: -o.geometry.area)
    corner = shapely.box(5, 5, 100, 80)
    edits += [{"image": "gamma.tif", "op": "translate", "id": gamma[0].id, "dx": 30, "dy": 10},
              {"image": "gamma.tif", "op": "draw", "wkt": corner.wkt, "class": "Stroma"}]
    drawn_on.append("gamma.tif")
    drawn = qupath.edit(project, edits)
    annotator = {name: {i for i, on in zip(drawn, drawn_on, strict=True) if on == name} for name in SIZES}
    annotator["gamma.tif"].add(gamma[0].id)
    corrected = annotations(qupath, project)

    # 3. export; 4. learn from alpha and beta (named: gamma was edited too, but only a little)
    runs = qupath.run_for_project(project, project / "scripts" / "export_training_data.groovy")
    assert all(r.error is None for r in runs), runs
    adapter = tmp_path / "adapter.npz"
    assert main(["learn", str(project), "--backend", "files", "--images", "alpha.tif", "beta.tif", "--cache",
                 str(cache), "--force", "--out", str(adapter), *model]) == 0

    # 5. re-segment the cohort with the adapter into the project (cached: nothing embedded), import again
    assert main(["segment", *slides, *model, "--quiet", "--out", str(tmp_path / "adapted"), "--cache", str(cache),
                 "--adapter", str(adapter), "--project", str(project), "--backend", "files"]) == 0
    run = json.loads((tmp_path / "adapted" / "run.json").read_text())
    assert {s["cache"] for s in run["slides"]} == {"hit"}
    assert [r.error for r in qupath.run_for_project(project, import_script)] == [None] * len(SIZES)
    after = annotations(qupath, project)
    entries = {e.name: e for e in qupath.load_project(project).entries}
    meta = {e["imageName"]: e["metadata"] for e in json.loads((project / "project.qpproj").read_text())["images"]}

    for name in SIZES:
        assert meta[name]["zeus.adapter"].startswith(run["adapter"]["sha256"][:16])
        objs = after[name]
        for i in annotator[name]:  # every annotator edit kept, as saved
            assert i in objs and same_geometry(objs[i].geometry, corrected[name][i].geometry), (name, i)
            assert objs[i].class_name == corrected[name][i].class_name
        new_ids = {f["id"] for f in json.loads((entries[name].entry_path / ZEUS_GEOJSON).read_text())["features"]}
        for i in set(first[name]) - annotator[name]:
            assert i not in objs  # deleted stays deleted; untouched is replaced
        assert set(objs) <= annotator[name] | new_ids
        for o in objs.values():  # no adapted outline lands on the annotator's work
            if o.id in new_ids:
                assert all(o.geometry.intersection(corrected[name][i].geometry).area <= 1.0 for i in annotator[name])
    # alpha and beta keep only the corrections (ZEUS drew nothing over the places the annotator deleted or drew)
    for name in ("alpha.tif", "beta.tif"):
        deleted = shapely.union_all([first[name][i].geometry for i in first[name]])
        assert all(o.geometry.intersection(deleted).area <= 1.0 for i, o in after[name].items()
                   if i not in annotator[name])
