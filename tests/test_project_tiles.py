"""Heatmap tiles through a project, on real QuPath (qupath-core 0.6.0, Run for project, saveImageData).

``zeus segment --project --tiles`` (files backend) keeps each image's tiles as
``data/<entryID>/zeus_tiles.geojson``; the project's ``import_zeus_annotations.groovy``, run as *Run for
project*, adds them to the image. Asserted against the scores file the run wrote (the independent
reference; ``PatchScores`` read back, tiles matched by their stride cell): the saved hierarchy holds one
tile per patch with the scores as float32 measurements; a re-run with other prompts and a re-import replace
them (none twice); a re-run without ``--tiles`` clears them; another tool's tile and the annotator's
annotation are never touched. Stand-ins: the ``QP`` stub and the test-only image server (harness).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely

from zeus_qupath.bridge.heatmap_tiles import ZEUS_TILES
from zeus_qupath.cli import main
from zeus_qupath.heatmap import measurement_name
from zeus_qupath.outputs import TILES_SUFFIX, PatchScores
from zeus_qupath.samples import prompt_path

from qupath.fixtures import qupath_or_skip
from qupath.harness import QuPath, route_images_to_test_server

NAME = "case.tif"
OTHER_BOX = (40.0, 40.0, 90.0, 90.0)  # another tool's tile (no ZEUS score), added inside QuPath
ADD_OTHER_TILE = """
import qupath.lib.objects.PathObjects
import qupath.lib.regions.ImagePlane
import qupath.lib.roi.ROIs
import static qupath.lib.scripting.QP.*

def roi = ROIs.createRectangleROI(40, 40, 50, 50, ImagePlane.getDefaultPlane())
def tile = PathObjects.createTileObject(roi, null, null)
tile.getMeasurementList().put('Tumor probability', 0.75d)
getCurrentImageData().getHierarchy().addObject(tile)
"""


@pytest.fixture(scope="module")
def qupath(tmp_path_factory: pytest.TempPathFactory) -> QuPath:
    return qupath_or_skip("0.6.0", tmp_path_factory)


def segment(slide: Path, tiny_model: Any, prompts: Path, out: Path, project: Path, cache: Path, *extra: str) -> None:
    args = ["segment", str(slide), "--model", f"open_clip:{tiny_model.config_path}", "--pretrained",
            str(tiny_model.checkpoint_path), "--prompts", str(prompts), "--device", "cpu", "--quiet",
            "--out", str(out), "--cache", str(cache), "--project", str(project), "--backend", "files", *extra]
    assert main(args) == 0


def expected_tiles(scores: PatchScores) -> dict[tuple[float, ...], list[float]]:
    """Stride cell (clipped to the slide, 2 decimals) -> the patch's scores, from the scores file."""
    out = {}
    half = scores.stride / 2
    for (x, y), row in zip(scores.coords.tolist(), scores.scores.tolist(), strict=True):
        cx, cy = x + scores.patch_size / 2, y + scores.patch_size / 2
        box = (max(cx - half, 0), max(cy - half, 0), min(cx + half, scores.width), min(cy + half, scores.height))
        if box[2] > box[0] and box[3] > box[1]:
            out[tuple(round(v, 2) for v in box)] = row
    return out


def saved_tiles(qupath: QuPath, project: Path, classes: tuple[str, ...]) -> tuple[dict, list, Any]:
    """The saved hierarchy's ZEUS tiles (box -> float32 scores), other tiles, and the entry (readHierarchy)."""
    (entry,) = qupath.load_project(project).entries
    zeus, other = {}, []
    for o in entry.objects:
        if o.object_type != "tile":
            continue
        if not any(k.startswith("ZEUS score: ") for k in o.measurements):
            other.append(o)
            continue
        box = tuple(round(v, 2) for v in o.geometry.bounds)
        assert box not in zeus, f"two ZEUS tiles at {box}"
        assert o.geometry.area == pytest.approx((box[2] - box[0]) * (box[3] - box[1]))  # a rectangle
        zeus[box] = [float(np.float32(o.measurements[measurement_name(c)])) for c in classes]
    return zeus, other, entry


@pytest.mark.jvm
@pytest.mark.slow
def test_tiles_reach_the_image_and_follow_the_latest_run(qupath: QuPath, tiny_model: Any, tmp_path: Path) -> None:
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    slide = make_synthetic_slide(tmp_path / NAME, 2048, 1536, seed=7, tumor_fraction=0.4).path
    project, cache = tmp_path / "project", tmp_path / "cache"

    # 1. pre-segment into the project with --tiles, import (Run for project)
    segment(slide, tiny_model, prompt_path("spindle_cell"), tmp_path / "out1", project, cache, "--tiles")
    assert route_images_to_test_server(project) == 1  # STAND-IN: the test-only image server opens the slide
    import_script = project / "scripts" / "import_zeus_annotations.groovy"
    runs = qupath.run_for_project(project, import_script)
    assert [r.error for r in runs] == [None], runs
    scores1 = PatchScores.load(tmp_path / "out1" / f"{slide.stem}.scores.npz")
    zeus, other, entry = saved_tiles(qupath, project, scores1.classes)
    assert len(zeus) > 20 and zeus == expected_tiles(scores1) and not other
    kept = entry.entry_path / ZEUS_TILES
    assert kept.read_text() == (tmp_path / "out1" / f"{slide.stem}{TILES_SUFFIX}").read_text()
    first_annotations = {o.id for o in entry.annotations}
    assert first_annotations  # the tiny model found tumor: tiles and annotations live side by side

    # 2. the annotator draws; another tool adds a tile of its own; both saved
    (drawn,) = qupath.edit(project, [{"image": NAME, "op": "draw", "wkt": shapely.box(5, 5, 30, 30).wkt,
                                      "class": "Tumor"}])
    script = tmp_path / "add_other_tile.groovy"
    script.write_text(ADD_OTHER_TILE, encoding="utf-8")
    assert [r.error for r in qupath.run_for_project(project, script)] == [None]

    # 3. re-run with other prompts and --tiles into another folder, import again: the tiles are replaced
    segment(slide, tiny_model, prompt_path("zeus_spindle_cell"), tmp_path / "out2", project, cache, "--tiles")
    runs = qupath.run_for_project(project, import_script)
    assert [r.error for r in runs] == [None], runs
    scores2 = PatchScores.load(tmp_path / "out2" / f"{slide.stem}.scores.npz")
    assert not np.array_equal(scores1.scores, scores2.scores)
    zeus, other, entry = saved_tiles(qupath, project, scores2.classes)
    assert zeus == expected_tiles(scores2)  # the earlier ZEUS tiles are gone, none twice
    assert [tuple(o.geometry.bounds) for o in other] == [OTHER_BOX]
    assert other[0].measurements == {"Tumor probability": 0.75}
    assert drawn in {o.id for o in entry.annotations}
    assert len(list(entry.entry_path.glob(f"{ZEUS_TILES}.bak-*"))) == 1

    # 4. re-run without --tiles into the same folder (its old tiles file goes with the rest): import clears the heatmap
    segment(slide, tiny_model, prompt_path("spindle_cell"), tmp_path / "out2", project, cache)
    assert not (tmp_path / "out2" / f"{slide.stem}{TILES_SUFFIX}").exists()
    assert json.loads(kept.read_text())["features"] == []
    for _ in range(2):  # twice: the second import changes nothing
        runs = qupath.run_for_project(project, import_script)
        assert [r.error for r in runs] == [None], runs
        zeus, other, entry = saved_tiles(qupath, project, scores2.classes)
        assert zeus == {} and [tuple(o.geometry.bounds) for o in other] == [OTHER_BOX]
        assert drawn in {o.id for o in entry.annotations}
    assert "0 heatmap tile(s), replacing 0" in runs[0].output


def _scores(seed: int, width: int, height: int, classes: tuple[str, ...]) -> PatchScores:
    """A patch lattice over the slide (anchored off the origin, as per-contour lattices are) with random scores."""
    xs, ys = np.meshgrid(np.arange(13, width - 200, 112), np.arange(37, height - 200, 112))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    values = np.random.default_rng(seed).normal(0, 0.1, (len(coords), len(classes))).astype(np.float32)
    return PatchScores(coords, values, classes, "tumor", 448, 112, width, height, 0.5)


@pytest.mark.jvm
@pytest.mark.parametrize("version", ["0.4.4", "0.5.1"])
def test_import_script_replaces_tiles_on_older_qupath(version: str, tmp_path: Path,
                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same replace/clear cycle on QuPath 0.4.4 and 0.5.1, published with ``zeus project add``'s code
    (``publish_results``) from outputs written here, so no model runs."""
    from zeus_qupath.bridge.publish import ResultItem, publish_results
    from zeus_qupath.heatmap import write_tiles
    from zeus_qupath.qupath_geojson import QuPathObject, feature_collection, write_geojson
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    qp = qupath_or_skip(version, tmp_path_factory)
    width, height = 1024, 768
    slide = make_synthetic_slide(tmp_path / NAME, width, height, seed=3, tumor_fraction=0.4).path
    geojson = tmp_path / "case.geojson"
    write_geojson(geojson, feature_collection([QuPathObject(shapely.box(300, 300, 500, 450), class_name="Tumor")]))
    project = tmp_path / "project"
    import_script = project / "scripts" / "import_zeus_annotations.groovy"

    def publish_and_import(scores: PatchScores | None) -> tuple[dict, list, Any]:
        tiles = None
        if scores is not None:
            tiles = tmp_path / f"case-{len(other_added)}-{scores.scores[0, 0]:.6f}{TILES_SUFFIX}"
            write_tiles(tiles, scores)
        item = ResultItem(str(slide), str(geojson), width, height, 0.5, tiles_path=str(tiles) if tiles else None)
        publish_results(project, [item], backend="files")
        route_images_to_test_server(project)  # STAND-IN: the test-only image server opens the slide
        if not other_added:
            script = tmp_path / "add_other_tile.groovy"
            script.write_text(ADD_OTHER_TILE, encoding="utf-8")
            assert [r.error for r in qp.run_for_project(project, script)] == [None]
            other_added.append(True)
        runs = qp.run_for_project(project, import_script)
        assert [r.error for r in runs] == [None], runs
        return saved_tiles(qp, project, classes)

    other_added: list[bool] = []
    classes = ("normal", "tumor")
    first, second = _scores(1, width, height, classes), _scores(2, width, height, classes)
    for scores in (first, second):
        zeus, other, entry = publish_and_import(scores)
        assert len(zeus) > 20 and zeus == expected_tiles(scores)  # replaced, none twice
        assert [tuple(o.geometry.bounds) for o in other] == [OTHER_BOX]
        assert [o.name for o in entry.annotations] == ["ZEUS Tumor"]
    zeus, other, entry = publish_and_import(None)  # a run without --tiles: the heatmap is cleared
    assert zeus == {} and [tuple(o.geometry.bounds) for o in other] == [OTHER_BOX]
    assert [o.name for o in entry.annotations] == ["ZEUS Tumor"]
