"""The README's annotator walk-through on real QuPath 0.7.0 (qupath-core, Run for project, saveImageData).

Also passes on 0.4.4, 0.5.1 and 0.6.0 (``ZEUS_TEST_WALKTHROUGH_VERSIONS=0.4.4,0.5.1,0.6.0,0.7.0``; off by default
for CI time).

1. ``zeus segment --project`` (tiny model) pre-segments four slides into a QuPath project;
2. the project's ``import_zeus_annotations.groovy``, *Run for project*;
3. the annotator edits through QuPath's API (moves vertices, cuts a hole, moves, deletes, reclassifies,
   renames, draws) and saves (``saveImageData``);
4. the server re-segments with another prompt file into the same project;
5. *Run for project* of the import script again (and once more);
6. ``export_training_data.groovy`` *Run for project*, one slide missing on this computer.

Asserted against the edits made (the independent reference): nothing the annotator did is undone, every
edit is seen by the rule, no deleted object comes back, no new ZEUS object lands on the annotator's
regions, nothing is imported twice, and the export of the other images survives the missing slide.
Real QuPath code throughout; stand-ins: the ``QP`` stub and the test-only image server.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from zeus_qupath.bridge.edits import IMPORTED, is_untouched_zeus, read_import_record, same_geometry, written_record
from zeus_qupath.bridge.project_files import ZEUS_GEOJSON
from zeus_qupath.cli import main
from zeus_qupath.samples import prompt_path

from qupath.fixtures import qupath_or_skip
from qupath.harness import QuPath, route_images_to_test_server

pytestmark = [pytest.mark.jvm, pytest.mark.slow]

# alpha: outline corrected + an object drawn; beta: its ZEUS object deleted; gamma: left alone (so replaced);
# delta: moved, reclassified, renamed, and its slide is missing at export time
SIZES = {"alpha.tif": (3072, 2048, 11), "beta.tif": (2048, 2048, 5), "gamma.tif": (2048, 1536, 23),
         "delta.tif": (2048, 1536, 31)}
N = len(SIZES)


# 0.7.0 by default, the release annotators download (it also passes on 0.4.4, 0.5.1 and 0.6.0 with the stand-in
# image server, minutes each): ZEUS_TEST_WALKTHROUGH_VERSIONS=0.4.4,0.5.1,0.6.0,0.7.0 runs it on those
WALKTHROUGH_VERSIONS = os.environ.get("ZEUS_TEST_WALKTHROUGH_VERSIONS", "0.7.0").split(",")


@pytest.fixture(scope="module", params=WALKTHROUGH_VERSIONS)
def qupath(request, tmp_path_factory) -> QuPath:
    return qupath_or_skip(request.param.strip(), tmp_path_factory)


def segment(slides, tiny_model, prompts: Path, out: Path, project: Path, cache: Path) -> None:
    args = ["segment", *map(str, slides), "--model", f"open_clip:{tiny_model.config_path}",
            "--pretrained", str(tiny_model.checkpoint_path), "--prompts", str(prompts), "--device", "cpu",
            "--quiet", "--out", str(out), "--cache", str(cache), "--project", str(project), "--backend", "files"]
    assert main(args) == 0


def annotations(qupath: QuPath, project: Path) -> dict[str, dict[str, object]]:
    """image name -> {id: QuPathObject} of the saved annotations, as QuPath loads them."""
    return {e.name: {o.id: o for o in e.annotations} for e in qupath.load_project(project).entries}


def test_annotator_walkthrough(qupath: QuPath, tiny_model, tmp_path: Path) -> None:
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    slides = [make_synthetic_slide(tmp_path / name, w, h, seed=seed, tumor_fraction=0.4).path
              for name, (w, h, seed) in SIZES.items()]
    project, cache = tmp_path / "project", tmp_path / "cache"

    # 1. the server pre-segments into a project
    segment(slides, tiny_model, prompt_path("spindle_cell"), tmp_path / "out1", project, cache)
    assert route_images_to_test_server(project) == N  # STAND-IN: QuPath here opens slides with the test server
    import_script = project / "scripts" / "import_zeus_annotations.groovy"
    assert import_script.is_file()

    # 2. the annotator imports: Run for project
    runs = qupath.run_for_project(project, import_script)
    assert [r.error for r in runs] == [None] * N, runs
    first = annotations(qupath, project)
    entries = {e.name: e for e in qupath.load_project(project).entries}
    written1 = {name: written_record(e.entry_path / ZEUS_GEOJSON) for name, e in entries.items()}
    for name, objs in first.items():
        assert set(objs) == set(written1[name])  # every ZEUS object, once
        assert all(is_untouched_zeus(o, written1[name]) for o in objs.values())
    alpha, beta, gamma, delta = (sorted(first[n].values(), key=lambda o: -o.geometry.area) for n in SIZES)
    assert alpha and beta and gamma and delta, "the tiny model found no region to edit on some slide"

    # 3. the annotator corrects, in QuPath, and saves
    big = alpha[0]
    x0, y0, x1, y1 = big.geometry.bounds
    cx, cy = big.geometry.representative_point().coords[0]
    hole = shapely.box(cx - 15, cy - 15, cx + 15, cy + 15).wkt
    free = shapely.box(5, 5, 120, 90)  # a corner of alpha, as far from tissue as the slide gets
    assert not any(o.geometry.intersects(free) for o in alpha)
    edits = [
        {"image": "alpha.tif", "op": "move_vertices", "id": big.id, "vertices": [1, 3], "dx": 30, "dy": 0},
        {"image": "alpha.tif", "op": "cut_hole", "id": big.id, "wkt": hole},
        {"image": "alpha.tif", "op": "draw", "wkt": free.wkt, "class": "Tumor"},
        {"image": "beta.tif", "op": "delete", "id": beta[0].id},
        {"image": "delta.tif", "op": "translate", "id": delta[0].id, "dx": 40, "dy": -25},
        {"image": "delta.tif", "op": "reclassify", "id": delta[0].id, "class": "Stroma"},
        {"image": "delta.tif", "op": "rename", "id": delta[0].id, "name": "stroma, checked"},
    ]
    (drawn_id,) = qupath.edit(project, edits)
    corrected = annotations(qupath, project)
    annotator_ids = {"alpha.tif": {big.id, drawn_id}, "beta.tif": set(), "gamma.tif": set(),
                     "delta.tif": {delta[0].id}}
    deleted = {"beta.tif": {beta[0].id: beta[0].geometry}}
    assert beta[0].id not in corrected["beta.tif"] and drawn_id in corrected["alpha.tif"]
    # every edit is seen by the rule
    for name, ids in annotator_ids.items():
        for i in ids:
            assert not is_untouched_zeus(corrected[name][i], written1[name]), (name, i)
    assert corrected["delta.tif"][delta[0].id].class_name == "Stroma"

    # 4. the server re-segments with another prompt file into the same project
    segment(slides, tiny_model, prompt_path("zeus_spindle_cell"), tmp_path / "out2", project, cache)
    entries = {e.name: e for e in qupath.load_project(project).entries}
    assert all(list(e.entry_path.glob(ZEUS_GEOJSON + ".bak-*")) for e in entries.values())
    new_result = {n: json.loads((e.entry_path / ZEUS_GEOJSON).read_text())["features"] for n, e in entries.items()}

    # 5. import again, and once more: the second run must change nothing
    states = []
    for _ in range(2):
        runs = qupath.run_for_project(project, import_script)
        assert [r.error for r in runs] == [None] * N, runs
        states.append(annotations(qupath, project))
    after, again = states
    assert {n: set(o) for n, o in after.items()} == {n: set(o) for n, o in again.items()}

    for name, objs in after.items():
        # nothing the annotator did is undone
        for i in annotator_ids[name]:
            now, then = objs[i], corrected[name][i]
            assert same_geometry(now.geometry, then.geometry), (name, i)
            assert (now.class_name, now.name) == (then.class_name, then.name)
        # no deleted object comes back, by id or by place
        for i, geometry in deleted.get(name, {}).items():
            assert i not in objs
            assert all(o.geometry.intersection(geometry).area <= 1.0 for o in objs.values()), name
        # no new ZEUS object on the annotator's regions; nothing twice
        new_ids = {f["id"] for f in new_result[name]}
        landed = [o for o in objs.values() if o.id in new_ids]
        for o in landed:
            for i in annotator_ids[name]:
                assert o.geometry.intersection(corrected[name][i].geometry).area <= 1.0
        assert len(objs) == len({o.id for o in objs.values()})
        geoms = [shapely.normalize(o.geometry).wkb for o in objs.values()]
        assert len(geoms) == len(set(geoms))
        # the untouched objects of the first result are gone (replaced) unless the new result has their id
        for i in set(first[name]) - annotator_ids[name] - set(deleted.get(name, {})):
            assert i not in objs
        status = read_import_record(entries[name].entry_path).status
        assert all(status[i] == IMPORTED for i in deleted.get(name, {}))  # remembered as deleted
    # gamma was left alone: its ZEUS object was replaced by the new result (if that found anything there)
    assert set(after["gamma.tif"]) == {f["id"] for f in new_result["gamma.tif"]}

    # 6. export (Run for project), with delta's slide missing on this computer
    qpproj = project / "project.qpproj"
    data = json.loads(qpproj.read_text(encoding="utf-8"))
    for entry in data["images"]:
        if entry["imageName"] == "delta.tif":
            entry["serverBuilder"]["uri"] = (tmp_path / "moved-away" / "delta.tif").as_uri()
    qpproj.write_text(json.dumps(data, indent=2), encoding="utf-8")
    export_script = project / "scripts" / "export_training_data.groovy"
    runs = qupath.run_for_project(project, export_script)
    out = project / "export"
    for name in SIZES:
        exported = qupath.read_geojson(out / f"{name}.geojson")  # the GeoJSON of every image, delta included
        assert {o.id for o in exported} == set(after[name]), name
    for name in ("alpha.tif", "beta.tif", "gamma.tif"):
        w, h, _ = SIZES[name]
        mask = np.asarray(Image.open(out / f"{name}-labels.png"))
        assert abs(mask.shape[1] - w / 16) <= 1 and abs(mask.shape[0] - h / 16) <= 1
        labels = json.loads((out / "labels.json").read_text(encoding="utf-8"))
        assert set(np.unique(mask)) <= set(labels.values())
        assert (mask.max() > 0) == bool(after[name])
    assert not (out / "delta.tif-labels.png").exists()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
