"""Publishing ZEUS outputs (GeoJSON + scores file + run.json, as ``zeus segment`` writes them) into a project.

The outputs are written here by hand with the engine's own writers (``feature_collection``,
``PatchScores.save``, ``SlideReport``) for the real test slides in tests/data/wsi.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from zeus_qupath.bridge.heatmap_tiles import ZEUS_TILES
from zeus_qupath.bridge.project_files import ZEUS_GEOJSON
from zeus_qupath.bridge.publish import (
    ResultItem,
    items_from_outputs,
    publish_outputs,
    publish_results,
)
from zeus_qupath.errors import GeoJSONError, ProjectError, ZeusError
from zeus_qupath.heatmap import measurement_name, write_tiles
from zeus_qupath.outputs import TILES_SUFFIX, PatchScores, SlideReport, output_stem
from zeus_qupath.qupath_geojson import QuPathObject, feature_collection, read_qupath_geojson, write_geojson

TESTDATA = Path(__file__).resolve().parent / "data"
SVS = TESTDATA / "wsi" / "CMU-1-Small-Region.svs"  # 2220 x 2967, 0.499 um/px
OME = TESTDATA / "wsi" / "OS-1-detail.ome.tif"  # 1101 x 1101, 0.2271 um/px
SLIDES = {SVS: (2220, 2967, 0.499), OME: (1101, 1101, 0.2271)}

needs_slides = pytest.mark.skipif(
    not (SVS.is_file() and OME.is_file()),
    reason=f"real test slides not found in {TESTDATA / 'wsi'} (tests/data)",
)


def write_outputs(out: Path, slides: dict[Path, tuple[int, int, float | None]], *, shift: float = 0.0,
                  with_run: bool = True, model: str = "quiltnet-b32", started: str = "2025-01-02T03:04:05+00:00",
                  tiles_seed: int | None = None) -> dict[Path, list[dict[str, Any]]]:
    """What ``zeus segment`` writes for ``slides``: <stem>.geojson, <stem>.scores.npz and run.json; with
    ``tiles_seed``, random scores and <stem>.tiles.geojson, as ``--tiles`` does."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[Path, list[dict[str, Any]]] = {}
    reports = []
    for slide, (width, height, mpp) in slides.items():
        stem = output_stem(slide)
        polys = [box(100 + shift, 100, 600 + shift, 500),
                 Polygon([(700, 700), (1000, 720), (900, 1050)], [[(800, 800), (880, 810), (850, 900)]])]
        collection = feature_collection([QuPathObject(p, class_name="Tumor", measurements={"Mean tumor score": 0.31})
                                         for p in polys])
        write_geojson(out / f"{stem}.geojson", collection)
        written[slide] = collection["features"]
        coords = np.array([[x, y] for y in range(0, height - 448, 112) for x in range(0, width - 448, 112)],
                          dtype=np.int64)
        values = (np.zeros((len(coords), 2), np.float32) if tiles_seed is None else
                  np.random.default_rng(tiles_seed).normal(0, 0.1, (len(coords), 2)).astype(np.float32))
        scores = PatchScores(coords=coords, scores=values,
                             classes=("tumor", "normal"), positive_class="tumor", patch_size=448, stride=112,
                             width=width, height=height, mpp=mpp,
                             meta={"model": model, "prompts": "spindle_cell.json", "zeus_version": "0.1.0",
                                   "slide": slide.name})
        scores.save(out / f"{stem}.scores.npz")
        outputs = {k: str(out / f"{stem}{s}") for k, s in
                   (("geojson", ".geojson"), ("scores", ".scores.npz"), ("overlay", ".overlay.png"))}
        if tiles_seed is not None:
            outputs["tiles"] = str(out / f"{stem}{TILES_SUFFIX}")
            write_tiles(outputs["tiles"], scores)
        reports.append(SlideReport(
            slide=str(slide), stem=stem, width=width, height=height, mpp=mpp, patches=len(coords),
            tissue_fraction=0.5, regions=len(polys), tumor_area_um2=None, seconds={"total": 1.0},
            patches_per_s=10.0, warnings=[], outputs=outputs,
        ).to_dict())
    if with_run:
        run = {"started": started, "command": "segment",
               "model": {"spec": model, "name": model},
               "prompts": {"file": "samples/prompts/spindle_cell.json", "classes": ["tumor", "normal"]},
               "versions": {"zeus-qupath": "0.1.0"}, "slides": reports, "complete": True}
        (out / "run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    return written


def qpproj(project: Path) -> dict[str, Any]:
    return json.loads((project / "project.qpproj").read_text(encoding="utf-8"))


@needs_slides
def test_items_from_an_output_folder(tmp_path: Path) -> None:
    write_outputs(tmp_path / "out", SLIDES)
    items = items_from_outputs([tmp_path / "out"])
    assert [Path(i.slide_path) for i in items] == [SVS, OME]
    svs, ome = items
    assert (svs.width, svs.height, svs.mpp) == (2220, 2967, 0.499)
    assert (ome.width, ome.height, ome.mpp) == (1101, 1101, 0.2271)
    assert svs.levels == ((2220, 2967),) and ome.levels == ((1101, 1101),)  # opened with tiffslide
    assert svs.geojson_path == str(tmp_path / "out" / "CMU-1-Small-Region.geojson")
    assert ome.geojson_path == str(tmp_path / "out" / "OS-1-detail.geojson")
    assert (svs.model, svs.prompts, svs.zeus_version, svs.date) == (
        "quiltnet-b32", "spindle_cell", "0.1.0", "2025-01-02T03:04:05+00:00")


@needs_slides
def test_publish_then_republish_after_the_annotator_worked(tmp_path: Path) -> None:
    out, project = tmp_path / "out", tmp_path / "project"
    first = write_outputs(out, SLIDES)
    report = publish_results(project, items_from_outputs([out]), backend="files",
                             uri_map=[f"{TESTDATA / 'wsi'}=Z:\\slides"])
    assert report.backend == "files" and report.project == str(project)
    assert [(im.entry_id, im.image_name, im.created, im.n_features) for im in report.images] == [
        ("1", "CMU-1-Small-Region.svs", True, 2), ("2", "OS-1-detail.ome.tif", True, 2)]
    assert "2 image(s) added, 0 updated" in report.summary()

    data = qpproj(project)
    svs_entry, ome_entry = data["images"]
    assert svs_entry["serverBuilder"]["uri"] == "file:/Z:/slides/CMU-1-Small-Region.svs"
    meta = svs_entry["serverBuilder"]["metadata"]
    assert (meta["width"], meta["height"]) == (2220, 2967)
    assert meta["levels"] == [{"downsample": 1.0, "width": 2220, "height": 2967}]
    assert meta["pixelCalibration"]["pixelWidth"] == {"value": 0.499, "unit": "\u00b5m"}
    assert ome_entry["serverBuilder"]["metadata"]["pixelCalibration"]["pixelHeight"]["value"] == 0.2271
    md = svs_entry["metadata"]
    assert md["zeus.model"] == "quiltnet-b32" and md["zeus.prompts"] == "spindle_cell"
    assert md["zeus.version"] == "0.1.0" and md["zeus.status"] == "pre-segmented"
    assert md["zeus.date"] == "2025-01-02T03:04:05+00:00"
    assert (md["zeus.width"], md["zeus.height"], md["zeus.mpp"]) == ("2220", "2967", "0.499")

    geo = project / "data" / "1" / ZEUS_GEOJSON
    objs = read_qupath_geojson(geo)
    assert [o.id for o in objs] == [f["id"] for f in first[SVS]]  # ids kept: QuPath's import skips repeats
    assert objs[1].geometry.equals(Polygon([(700, 700), (1000, 720), (900, 1050)],
                                           [[(800, 800), (880, 810), (850, 900)]]))
    assert objs[0].class_name == "Tumor" and objs[0].name == "ZEUS Tumor"

    # the annotator opens the project in QuPath, edits (QuPath writes data.qpdata) and tags the entry
    qpdata = project / "data" / "1" / "data.qpdata"
    qpdata.write_bytes(b"\xac\xed\x00\x05 edits saved by QuPath")
    data["images"][0]["description"] = "reviewed"
    data["images"][0]["metadata"]["reviewer"] = "AB"
    (project / "project.qpproj").write_text(json.dumps(data, indent=2), encoding="utf-8")
    old_geo_text = geo.read_text(encoding="utf-8")

    # ZEUS runs again with another model; the result is published into the same project
    second = write_outputs(out, {SVS: SLIDES[SVS]}, shift=50.0, model="conch",
                           started="2025-02-03T04:05:06+00:00")
    again = publish_outputs(project, [out], backend="files", uri_map=[(str(TESTDATA / "wsi"), "Z:\\slides")],
                            status="re-segmented")
    assert [(im.entry_id, im.created) for im in again.images] == [("1", False)]
    data2 = qpproj(project)
    assert len(data2["images"]) == 2 and data2["lastID"] == 2
    entry = data2["images"][0]
    assert entry["entryID"] == 1 and entry["randomizedName"] == svs_entry["randomizedName"]
    assert entry["description"] == "reviewed" and entry["metadata"]["reviewer"] == "AB"
    assert entry["metadata"]["zeus.model"] == "conch" and entry["metadata"]["zeus.status"] == "re-segmented"
    assert entry["metadata"]["zeus.date"] == "2025-02-03T04:05:06+00:00"
    assert data2["images"][1] == ome_entry  # the other slide is untouched

    new_objs = read_qupath_geojson(geo)
    assert [o.id for o in new_objs] == [f["id"] for f in second[SVS]]
    assert new_objs[0].geometry.bounds == (150.0, 100.0, 650.0, 500.0)
    backups = list(geo.parent.glob(f"{ZEUS_GEOJSON}.bak-*"))
    assert len(backups) == 1 and backups[0].read_text(encoding="utf-8") == old_geo_text
    assert list(project.glob("project.qpproj.bak-*"))
    assert qpdata.read_bytes() == b"\xac\xed\x00\x05 edits saved by QuPath"  # never touched


@needs_slides
def test_a_single_geojson_identified_by_scores_and_run_json(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(out, SLIDES)
    (item,) = items_from_outputs([out / "OS-1-detail.geojson"])
    assert Path(item.slide_path) == OME and (item.width, item.height, item.mpp) == (1101, 1101, 0.2271)
    assert item.levels == ((1101, 1101),) and item.model == "quiltnet-b32"

    # no run.json: the scores file names the slide, found beside the GeoJSON
    alone = tmp_path / "alone"
    write_outputs(alone, {OME: SLIDES[OME]}, with_run=False)
    with pytest.raises(ZeusError, match="cannot identify its slide 'OS-1-detail.ome.tif'") as info:
        items_from_outputs([alone / "OS-1-detail.geojson"])
    assert "\n" not in str(info.value)
    os.symlink(OME, alone / OME.name)
    (item,) = items_from_outputs([alone])  # a folder without run.json: its <stem>.geojson + scores pairs
    assert item.slide_path == str(alone / OME.name) and item.prompts == "spindle_cell"
    assert item.zeus_version == "0.1.0" and item.levels == ((1101, 1101),)


def test_unreachable_slide_is_published_without_levels(tmp_path: Path) -> None:
    out, project = tmp_path / "out", tmp_path / "project"
    gpu_slide = Path("/gpu-server/slides/case 7.svs")  # the slides live on the compute machine
    write_outputs(out, {gpu_slide: (4000, 3000, None)})
    (item,) = items_from_outputs([out])
    assert item.slide_path == str(gpu_slide) and item.levels is None and item.mpp is None
    report = publish_results(project, [item], backend="files", uri_map=["/gpu-server/slides=//nas/slides"])
    entry = qpproj(project)["images"][0]
    assert entry["serverBuilder"]["uri"] == "file:////nas/slides/case%207.svs"
    assert "metadata" not in entry["serverBuilder"]  # QuPath reads the pyramid when it opens the image
    assert entry["metadata"]["zeus.width"] == "4000" and "zeus.mpp" not in entry["metadata"]
    assert report.images[0].image_name == "case 7.svs"


def test_slides_that_cannot_be_identified(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(out, {Path("relative/missing.svs"): (1000, 800, 0.5)})
    with pytest.raises(ProjectError, match="the path is relative and found neither from here"):
        items_from_outputs([out])
    with pytest.raises(ZeusError, match="not found"):
        items_from_outputs([tmp_path / "nowhere"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ZeusError, match="not a ZEUS output folder"):
        items_from_outputs([empty])
    lone = tmp_path / "lone.geojson"
    write_geojson(lone, feature_collection([]))
    with pytest.raises(ZeusError, match=r"no lone\.scores\.npz beside it and run\.json is missing"):
        items_from_outputs([lone])
    with pytest.raises(ZeusError, match="expected a ZEUS output folder or a <slide>.geojson"):
        items_from_outputs([out / "run.json"])


@needs_slides
def test_wrong_slide_size_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(out, {SVS: (2000, 2000, 0.5)})
    with pytest.raises(ProjectError, match="is 2220x2967 px, but the ZEUS result was made for a 2000x2000"):
        items_from_outputs([out])


def test_bad_geojson_leaves_the_project_untouched(tmp_path: Path) -> None:
    project = tmp_path / "project"
    good = tmp_path / "good.geojson"
    write_geojson(good, feature_collection([QuPathObject(box(0, 0, 10, 10), class_name="Tumor")]))
    bad = tmp_path / "bad.geojson"
    bad.write_text("{ not json", encoding="utf-8")
    items = [ResultItem("/x/a.svs", str(good), 100, 100), ResultItem("/x/b.svs", str(bad), 100, 100)]
    with pytest.raises(GeoJSONError, match="not valid JSON"):
        publish_results(project, items, backend="files")
    assert not project.exists()
    with pytest.raises(ProjectError, match="given twice"):
        publish_results(project, [items[0], items[0]], backend="files")
    with pytest.raises(ProjectError, match="nothing to publish"):
        publish_results(project, [], backend="files")


def _stand_in_paquo_modules() -> Any:
    """The paquo test double of tests/test_paquo.py (paquo and QuPath cannot run here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("zeus_test_paquo_stand_in", Path(__file__).with_name("test_paquo.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_stand_in_paquo


def test_paquo_backend_keeps_zeus_result_beside_the_image_data(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    for name, module in _stand_in_paquo_modules()({}).items():
        monkeypatch.setitem(sys.modules, name, module)
    geo = tmp_path / "a.geojson"
    write_geojson(geo, feature_collection([QuPathObject(box(10, 10, 500, 400), class_name="Tumor")]))
    item = ResultItem(str(tmp_path / "slides" / "a.svs"), str(geo), 2220, 2967, 0.5, model="conch")
    report = publish_results(tmp_path / "p", [item])  # auto: the stand-in "finds" QuPath
    assert report.backend == "paquo" and report.images[0].merge is not None
    assert "replaced 0 untouched" in report.summary()
    kept = read_qupath_geojson(tmp_path / "p" / "data" / "1" / ZEUS_GEOJSON)
    assert [o.id for o in kept] == [o.id for o in read_qupath_geojson(geo)]  # what `zeus export` compares with
    write_geojson(geo, feature_collection([QuPathObject(box(20, 20, 600, 400), class_name="Tumor")]))
    publish_results(tmp_path / "p", [item])
    assert len(list((tmp_path / "p" / "data" / "1").glob(f"{ZEUS_GEOJSON}.bak-*"))) == 1
    assert read_qupath_geojson(tmp_path / "p" / "data" / "1" / ZEUS_GEOJSON)[0].geometry.bounds[2] == 600


# ------------------------------------------------------------------------------------------ heatmap tiles


def _tiles(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))["features"]


@needs_slides
def test_heatmap_tiles_follow_the_latest_run(tmp_path: Path) -> None:
    """--tiles: the run's tiles become data/<id>/zeus_tiles.geojson; a re-run replaces them (old file backed up);
    a re-run without tiles leaves an empty collection (the import script then clears the old heatmap)."""
    out, project = tmp_path / "out", tmp_path / "project"
    write_outputs(out, {SVS: SLIDES[SVS]}, tiles_seed=1)
    run_tiles = out / f"{output_stem(SVS)}{TILES_SUFFIX}"
    scores = PatchScores.load(out / f"{output_stem(SVS)}.scores.npz")
    report = publish_outputs(project, [out], backend="files")
    assert report.images[0].n_tiles == len(scores.coords) and "heatmap tile(s)" in report.summary()
    kept = project / "data" / "1" / ZEUS_TILES
    assert _tiles(kept) == _tiles(run_tiles)
    # the reference is the scores file: one tile per patch, its scores as float32 measurements
    names = [measurement_name(c) for c in scores.classes]
    values = np.array([[f["properties"]["measurements"][n] for n in names] for f in _tiles(kept)], np.float32)
    np.testing.assert_array_equal(values, scores.scores)
    qpdata = project / "data" / "1" / "data.qpdata"
    qpdata.write_bytes(b"\xac\xed\x00\x05 saved by QuPath")

    write_outputs(out, {SVS: SLIDES[SVS]}, tiles_seed=2, model="conch")
    first_text = kept.read_text(encoding="utf-8")
    publish_outputs(project, [out], backend="files")
    assert _tiles(kept) == _tiles(run_tiles) != json.loads(first_text)["features"]
    (backup,) = kept.parent.glob(f"{ZEUS_TILES}.bak-*")
    assert backup.read_text(encoding="utf-8") == first_text

    # a run without --tiles into the same folder: the old <stem>.tiles.geojson is still there, but run.json
    # does not list it, so it is stale: the heatmap is cleared
    write_outputs(out, {SVS: SLIDES[SVS]}, model="keep")
    assert run_tiles.is_file()
    report = publish_outputs(project, [out], backend="files")
    assert report.images[0].n_tiles == 0
    assert json.loads(kept.read_text(encoding="utf-8")) == {"type": "FeatureCollection", "features": []}
    assert len(list(kept.parent.glob(f"{ZEUS_TILES}.bak-*"))) == 2
    assert qpdata.read_bytes() == b"\xac\xed\x00\x05 saved by QuPath"  # never touched
    publish_outputs(project, [out], backend="files")  # again: nothing new to back up
    assert len(list(kept.parent.glob(f"{ZEUS_TILES}.bak-*"))) == 2

    # an image that never had tiles gets no tiles file at all
    publish_outputs(tmp_path / "other", [out], backend="files")
    assert not (tmp_path / "other" / "data" / "1" / ZEUS_TILES).exists()


@needs_slides
def test_tiles_beside_a_geojson_without_run_json(tmp_path: Path) -> None:
    alone = tmp_path / "alone"
    write_outputs(alone, {OME: SLIDES[OME]}, with_run=False, tiles_seed=3)
    os.symlink(OME, alone / OME.name)
    stem = output_stem(OME)
    (item,) = items_from_outputs([alone / f"{stem}.geojson"])
    assert item.tiles_path == str(alone / f"{stem}{TILES_SUFFIX}")
    # tiles older than the scores file: an earlier run wrote them, not used
    scores = alone / f"{stem}.scores.npz"
    os.utime(alone / f"{stem}{TILES_SUFFIX}", (scores.stat().st_mtime - 60,) * 2)
    (item,) = items_from_outputs([alone])
    assert item.tiles_path is None


@needs_slides
def test_bad_or_missing_tiles_leave_the_project_untouched(tmp_path: Path) -> None:
    out, project = tmp_path / "out", tmp_path / "project"
    write_outputs(out, {SVS: SLIDES[SVS]}, tiles_seed=4)
    run_tiles = out / f"{output_stem(SVS)}{TILES_SUFFIX}"
    good = _tiles(run_tiles)
    not_tiles = [dict(good[0], properties={"objectType": "annotation", "measurements": {"ZEUS score: Tumor": 1.0}}),
                 dict(good[0], properties={"objectType": "tile", "measurements": {"Other score": 1.0}})]
    for bad, why in ((not_tiles[0], "objectType is not 'tile'"), (not_tiles[1], "no 'ZEUS score: <Class>'")):
        run_tiles.write_text(json.dumps({"type": "FeatureCollection", "features": [*good, bad]}), encoding="utf-8")
        with pytest.raises(ProjectError, match=f"feature {len(good)} is not a ZEUS heatmap tile \\({why}"):
            publish_outputs(project, [out], backend="files")
    run_tiles.write_text(json.dumps(good)[:-50], encoding="utf-8")
    with pytest.raises(ProjectError, match="not valid JSON") as info:
        publish_outputs(project, [out], backend="files")
    assert "\n" not in str(info.value)
    nan = json.loads(json.dumps(good[0]))
    nan["properties"]["measurements"]["ZEUS score: Tumor"] = float("nan")
    run_tiles.write_text(json.dumps({"type": "FeatureCollection", "features": [nan]}), encoding="utf-8")
    with pytest.raises(ProjectError, match="feature 0 is not a ZEUS heatmap tile \\(a measurement is not a finite"):
        publish_outputs(project, [out], backend="files")
    run_tiles.unlink()
    with pytest.raises(ZeusError, match=f"{run_tiles.name} listed in run.json is missing"):
        publish_outputs(project, [out], backend="files")
    assert not project.exists()
