"""``zeus export``: corrected annotations, label masks and the corrections table.

A QuPath-free project is built from the real test slides' sizes; an annotator is simulated by writing
the GeoJSON QuPath would export after the corrections (QuPath 0.4+ layout, and a QuPath 0.2 file).
The areas the annotator added and removed are known exactly from the shapes used.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import types
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box, mapping, shape

import zeus_qupath.bridge.export as export_mod
import zeus_qupath.bridge.label_masks as label_masks
from zeus_qupath.bridge.correction_stats import compare_annotations
from zeus_qupath.bridge.export import export_corrections
from zeus_qupath.bridge.export_report import format_table
from zeus_qupath.bridge.export_sources import SlideSource
from zeus_qupath.bridge.label_masks import label_map, rasterize_labels, write_mask
from zeus_qupath.bridge.project_files import ZEUS_GEOJSON, packed_argb
from zeus_qupath.bridge.publish import ResultItem, publish_results
from zeus_qupath.errors import ZeusError
from zeus_qupath.geometry import polygonal
from zeus_qupath.qupath_geojson import (
    MEAS_AREA_PX,
    MEAS_CENTROID_X,
    MEAS_VERTICES,
    QuPathObject,
    feature_collection,
    read_qupath_geojson,
    write_geojson,
)

TESTDATA = Path(__file__).resolve().parent / "data"
SVS = TESTDATA / "wsi" / "CMU-1-Small-Region.svs"  # 2220 x 2967, 0.499 um/px
OME = TESTDATA / "wsi" / "OS-1-detail.ome.tif"  # 1101 x 1101, 0.2271 um/px
MPP = 0.499
UM2 = MPP * MPP

# ZEUS's result on the SVS slide (level-0 px) and what the annotator does with each object
A = box(100, 100, 600, 500)  # the annotator drags its right edge 100 px out: edited, +40,000 px^2
A_EDITED = box(100, 100, 700, 500)
B = box(1000, 1000, 1400, 1300)  # deleted: -120,000 px^2
C = box(1500, 2000, 1800, 2300)  # reclassified as Stroma: edited, -90,000 px^2 of tumor
D = box(200, 1500, 500, 1800)  # left as ZEUS wrote it
E = box(1900, 100, 2100, 300)  # drawn by the annotator as Tumor: created, +40,000 px^2
ADDED_PX = 40_000 + 40_000
REMOVED_PX = 120_000 + 90_000
ORIGINAL_PX = 200_000 + 120_000 + 90_000 + 90_000
CORRECTED_PX = 240_000 + 90_000 + 40_000
DICE = 2 * (200_000 + 90_000) / (ORIGINAL_PX + CORRECTED_PX)

needs_slides = pytest.mark.skipif(
    not (SVS.is_file() and OME.is_file()),
    reason=f"real test slides not found in {TESTDATA / 'wsi'} (tests/data)",
)


def zeus_features(*geoms: Any) -> list[dict[str, Any]]:
    objs = [QuPathObject(g, class_name="Tumor", measurements={"Mean tumor score": 0.3}) for g in geoms]
    return feature_collection(objs)["features"]


def annotator_v04(original: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What QuPath 0.4+ exports after the corrections (ids kept, ZEUS measurements kept, now stale)."""
    a, _b, c, d = (json.loads(json.dumps(f)) for f in original)
    a["geometry"] = mapping(A_EDITED)
    c["properties"]["classification"] = {"name": "Stroma", "color": [150, 200, 150]}
    e = {"type": "Feature", "id": str(uuid.uuid4()), "geometry": mapping(E),
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}}
    detection = {"type": "Feature", "id": str(uuid.uuid4()), "geometry": mapping(box(0, 0, 50, 50)),
                 "properties": {"objectType": "detection", "classification": {"name": "Tumor", "color": [200, 0, 0]}}}
    line = {"type": "Feature", "id": str(uuid.uuid4()),
            "geometry": {"type": "LineString", "coordinates": [[0, 0], [100, 100]]},
            "properties": {"objectType": "annotation", "name": "ruler"}}
    return [a, c, d, e, detection, line]


def to_v02(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same objects as QuPath 0.2 wrote them: no ids, colorRGB, measurement lists."""
    out = []
    for f in features:
        props = f["properties"]
        kind = {"annotation": "PathAnnotationObject", "detection": "PathDetectionObject"}[props["objectType"]]
        p2: dict[str, Any] = {"isLocked": False,
                              "measurements": [{"name": k, "value": v} for k, v in props.get("measurements",
                                                                                            {}).items()]}
        if "name" in props:
            p2["name"] = props["name"]
        if "classification" in props:
            cls = props["classification"]
            p2["classification"] = {"name": cls["name"], "colorRGB": packed_argb(cls["color"])}
        out.append({"type": "Feature", "id": kind, "geometry": f["geometry"], "properties": p2})
    return out


def build_project(tmp_path: Path) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]:
    """A files-backend project with both real slides, published like ``zeus project add`` does."""
    out = tmp_path / "zeus-out"
    svs_features, ome_features = zeus_features(A, B, C, D), zeus_features(box(100, 100, 300, 400),
                                                                          box(500, 500, 900, 800))
    write_geojson(out / "svs.geojson", {"type": "FeatureCollection", "features": svs_features})
    write_geojson(out / "ome.geojson", {"type": "FeatureCollection", "features": ome_features})
    items = [ResultItem(str(SVS), str(out / "svs.geojson"), 2220, 2967, MPP, ((2220, 2967),), "quiltnet-b32"),
             ResultItem(str(OME), str(out / "ome.geojson"), 1101, 1101, 0.2271, ((1101, 1101),), "quiltnet-b32"),
             ResultItem("/elsewhere/never-opened.svs", str(out / "ome.geojson"), 1000, 1000)]
    project = tmp_path / "project"
    publish_results(project, items, backend="files")
    return project, svs_features, ome_features


def write_qupath_export(project: Path, svs_features: list[dict[str, Any]], ome_features: list[dict[str, Any]],
                        v02: bool = False) -> None:
    """``export_training_data.groovy``'s ``<project>/export/<imageName>.geojson`` files."""
    export = project / "export"
    export.mkdir()
    svs = annotator_v04(svs_features)
    ome = json.loads(json.dumps(ome_features))  # untouched by the annotator
    if v02:
        svs, ome = to_v02(svs), to_v02(ome)
        (export / "CMU-1-Small-Region.svs.geojson").write_text(json.dumps(svs), encoding="utf-8")
        (export / "OS-1-detail.ome.tif.geojson").write_text(json.dumps(ome), encoding="utf-8")
    else:
        for name, feats in (("CMU-1-Small-Region.svs", svs), ("OS-1-detail.ome.tif", ome)):
            (export / f"{name}.geojson").write_text(
                json.dumps({"type": "FeatureCollection", "features": feats}), encoding="utf-8")
    (export / "labels.json").write_text('{"background": 0, "Tumor": 1}', encoding="utf-8")  # an older script run


def check_svs_stats(stats: Any) -> None:
    assert stats.positive_class == "Tumor" and stats.area_unit == "um^2"
    assert (stats.created, stats.edited, stats.deleted, stats.untouched) == (1, 2, 1, 1)
    assert stats.dice == pytest.approx(DICE) and stats.dice < 1
    assert stats.added_area == pytest.approx(ADDED_PX * UM2)
    assert stats.removed_area == pytest.approx(REMOVED_PX * UM2)
    assert stats.original_area == pytest.approx(ORIGINAL_PX * UM2)
    assert stats.corrected_area == pytest.approx(CORRECTED_PX * UM2)


@needs_slides
@pytest.mark.parametrize("v02", [False, True], ids=["qupath-0.4+", "qupath-0.2"])
def test_export_from_a_files_project(tmp_path: Path, v02: bool) -> None:
    project, svs_features, ome_features = build_project(tmp_path)
    write_qupath_export(project, svs_features, ome_features, v02=v02)
    out = tmp_path / "training"

    report = export_corrections(project, out, backend="files")

    assert report.backend == "files"
    assert report.labels == {"background": 0, "Tumor": 1, "Stroma": 2}
    assert json.loads((out / "labels.json").read_text(encoding="utf-8")) == report.labels
    assert [s.name for s in report.slides] == ["CMU-1-Small-Region", "OS-1-detail"]
    assert any("never-opened.svs: skipped, not exported from QuPath" in w for w in report.warnings)
    assert any("gives other label values" in w for w in report.warnings)  # the older labels.json in export/
    svs, ome = report.slides
    check_svs_stats(svs.stats)
    assert ome.stats.dice == 1.0 and ome.stats.added_area == 0 and ome.stats.removed_area == 0
    assert (ome.stats.created, ome.stats.edited, ome.stats.deleted, ome.stats.untouched) == (0, 0, 0, 2)

    # label mask: 2220 x 2967 at downsample 16 -> 139 x 185 (rounded as QuPath rounds)
    mask = np.asarray(Image.open(out / "CMU-1-Small-Region.labels.png"))
    assert mask.shape == (185, 139) and mask.dtype == np.uint8
    assert (svs.mask_width, svs.mask_height, svs.downsample) == (139, 185, 16.0)
    assert set(np.unique(mask)) == {0, 1, 2}

    def at(x: float, y: float) -> int:  # label at a level-0 point
        return int(mask[int(y // 16), int(x // 16)])

    assert at(650, 300) == 1  # the part the annotator added to A
    assert at(1200, 1150) == 0  # B, deleted
    assert at(1650, 2150) == 2  # C, now Stroma
    assert at(2000, 200) == 1 and at(350, 1650) == 1  # E (drawn) and D (untouched)
    assert np.count_nonzero(mask == 1) * 256 == pytest.approx(CORRECTED_PX, rel=0.03)
    assert np.count_nonzero(mask == 2) * 256 == pytest.approx(90_000, rel=0.03)
    ome_mask = np.asarray(Image.open(out / "OS-1-detail.labels.png"))
    assert ome_mask.shape == (69, 69)  # round(1101 / 16)

    # clean GeoJSON: annotations only, polygons, classes kept, ZEUS marker measurements gone
    clean = read_qupath_geojson(out / "CMU-1-Small-Region.geojson")
    assert [o.object_type for o in clean] == ["annotation"] * 4  # detection and line dropped
    assert sorted(o.class_name for o in clean) == ["Stroma", "Tumor", "Tumor", "Tumor"]
    assert all(o.geometry.geom_type in ("Polygon", "MultiPolygon") and o.geometry.is_valid for o in clean)
    assert all(MEAS_AREA_PX not in o.measurements and MEAS_VERTICES not in o.measurements
               and MEAS_CENTROID_X not in o.measurements for o in clean)
    assert any(o.measurements.get("Mean tumor score") == 0.3 for o in clean)  # other measurements kept

    rows = list(csv.DictReader((out / "corrections.csv").open(encoding="utf-8")))
    assert [r["slide"] for r in rows] == ["CMU-1-Small-Region", "OS-1-detail"]
    row = rows[0]
    assert float(row["dice"]) == pytest.approx(DICE)
    assert float(row["added_area"]) == pytest.approx(ADDED_PX * UM2)
    assert float(row["removed_area"]) == pytest.approx(REMOVED_PX * UM2)
    assert (row["created"], row["edited"], row["deleted"], row["untouched"]) == ("1", "2", "1", "1")
    assert row["area_unit"] == "um^2" and row["mask"] == "CMU-1-Small-Region.labels.png"

    table = format_table(report)
    line = next(t for t in table.splitlines() if t.startswith("CMU-1-Small-Region"))
    assert line.split() == ["CMU-1-Small-Region", "0.667", f"{ADDED_PX * UM2:,.1f}", f"{REMOVED_PX * UM2:,.1f}",
                            "um^2", "1", "2", "1", "1", "139x185", "@16"]
    assert "labels: background=0, Tumor=1, Stroma=2" in table
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


@needs_slides
def test_export_at_a_pixel_size_and_with_a_class_order(tmp_path: Path) -> None:
    project, svs_features, ome_features = build_project(tmp_path)
    write_qupath_export(project, svs_features, ome_features)
    report = export_corrections(project, tmp_path / "out", mpp=MPP * 16, classes=["Stroma", "Tumor"],
                                backend="files")
    assert report.labels == {"background": 0, "Stroma": 1, "Tumor": 2}
    svs, ome = report.slides
    assert svs.downsample == pytest.approx(16.0) and (svs.mask_width, svs.mask_height) == (139, 185)
    assert ome.downsample == pytest.approx(MPP * 16 / 0.2271)
    assert (ome.mask_width, ome.mask_height) == (31, 31)
    mask = np.asarray(Image.open(svs.mask))
    assert mask[2150 // 16, 1650 // 16] == 1 and mask[300 // 16, 650 // 16] == 2
    check_svs_stats(svs.stats)  # statistics do not depend on the mask


@needs_slides
def test_refusals(tmp_path: Path) -> None:
    project, svs_features, ome_features = build_project(tmp_path)
    with pytest.raises(ZeusError, match="no QuPath export found") as info:
        export_corrections(project, tmp_path / "out", backend="files")
    assert "\n" not in str(info.value)
    write_qupath_export(project, svs_features, ome_features)
    with pytest.raises(ZeusError, match="is the folder the corrected annotations are read from"):
        export_corrections(project, project / "export", backend="files")
    with pytest.raises(ZeusError, match="not both"):
        export_corrections(project, tmp_path / "out", downsample=4, mpp=2.0, backend="files")
    with pytest.raises(ZeusError, match="positive number"):
        export_corrections(project, tmp_path / "out", downsample=0, backend="files")
    with pytest.raises(ZeusError, match="unknown backend"):
        export_corrections(project, tmp_path / "out", backend="qupath")
    with pytest.raises(ZeusError, match="not found"):
        export_corrections(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written by a refused export


def test_plain_folder_with_v02_export_and_zeus_originals(tmp_path: Path) -> None:
    folder, out = tmp_path / "exports", tmp_path / "out"
    folder.mkdir()
    original = zeus_features(A, B, C, D)
    # a QuPath 0.2 export (bare list of features) beside ZEUS's result saved as <name>.zeus.geojson
    (folder / "case1.svs.json").write_text(json.dumps(to_v02(annotator_v04(original))), encoding="utf-8")
    write_geojson(folder / "case1.svs.zeus.geojson", {"type": "FeatureCollection", "features": original})
    (folder / "notes.json").write_text('{"reviewer": "AB"}', encoding="utf-8")

    report = export_corrections(folder, out, downsample=32)
    assert report.backend == "folder"
    (slide,) = report.slides
    assert slide.name == "case1" and slide.image_name == "case1.svs.json"
    st = slide.stats
    assert st.area_unit == "px^2"  # no pixel size known
    assert (st.created, st.edited, st.deleted, st.untouched) == (1, 2, 1, 1)
    assert st.dice == pytest.approx(DICE)
    assert (st.added_area, st.removed_area) == (pytest.approx(ADDED_PX), pytest.approx(REMOVED_PX))
    assert any("notes.json: skipped, not QuPath GeoJSON" in w for w in report.warnings)
    assert any("image size unknown" in w for w in report.warnings)
    mask = np.asarray(Image.open(out / "case1.labels.png"))
    assert mask.shape == (round(2300 / 32), round(2100 / 32))  # the annotations' extent from (0, 0)


def test_plain_folder_with_a_zeus_output_folder_as_originals(tmp_path: Path) -> None:
    folder, zeus_out, out = tmp_path / "exports", tmp_path / "zeus-out", tmp_path / "out"
    folder.mkdir()
    original = zeus_features(A, B, C, D)
    write_geojson(zeus_out / "case1.geojson", {"type": "FeatureCollection", "features": original})
    (zeus_out / "run.json").write_text(json.dumps({"slides": [
        {"slide": "/data/case1.svs", "stem": "case1", "width": 2220, "height": 2967, "mpp": MPP}]}),
        encoding="utf-8")
    (folder / "case1.svs.geojson").write_text(json.dumps(
        {"type": "FeatureCollection", "features": annotator_v04(original)}), encoding="utf-8")
    no_original = folder / "case2.geojson"
    no_original.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": mapping(box(0, 0, 64, 64)), "properties": {
            "objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}}]}),
        encoding="utf-8")

    report = export_corrections(folder, out, originals=zeus_out)
    case1, case2 = report.slides
    check_svs_stats(case1.stats)  # size and pixel size from run.json
    assert (case1.mask_width, case1.mask_height) == (139, 185)
    assert case2.stats.dice is None and case2.stats.deleted is None and case2.stats.created == 1
    assert any("case2.geojson: ZEUS's original annotations were not found" in w for w in report.warnings)
    row = next(t for t in format_table(report).splitlines() if t.startswith("case2"))
    assert row.split()[1:5] == ["-", "-", "-", "px^2"] and row.split()[7] == "-"  # no original: no Dice
    with pytest.raises(ZeusError, match="--mpp cannot be used"):
        export_corrections(folder, tmp_path / "out2", mpp=8.0, originals=zeus_out)


def test_compare_annotations_edge_cases() -> None:
    empty = compare_annotations([], [], "Tumor", None)
    assert empty.dice == 1.0 and empty.added_area == 0 and empty.deleted == 0
    obj = QuPathObject(geometry=box(0, 0, 10, 10), class_name="tumor", name="ZEUS tumor",
                       measurements={MEAS_AREA_PX: 100.0, MEAS_VERTICES: 5.0}, id="x")
    # class names compare ignoring case (older ZEUS versions wrote "tumor")
    same = compare_annotations([obj], [obj], "Tumor", 0.5)
    assert same.dice == 1.0 and same.untouched == 1 and same.original_area == pytest.approx(25.0)
    gone = compare_annotations([obj], [], "Tumor", None)
    assert gone.dice == 0.0 and gone.deleted == 1 and gone.removed_area == 100.0


def test_overlaps_higher_label_on_top_and_large_masks_as_tiff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = QuPathObject(geometry=box(0, 0, 100, 100), class_name="Tumor")
    small = QuPathObject(geometry=box(40, 40, 60, 60), class_name="Stroma")
    stroma_under = QuPathObject(geometry=box(80, 80, 100, 100), class_name="Stroma")
    tumor_over = QuPathObject(geometry=box(85, 85, 100, 100), class_name="Tumor")
    unlabelled = QuPathObject(geometry=box(0, 0, 10, 10), class_name="Ignore*")
    objects = [small, big, stroma_under, tumor_over, unlabelled]
    labels = label_map([SlideSource("s", "s", objects, "x", None)], "Tumor")
    assert labels == {"background": 0, "Tumor": 1, "Stroma": 2}
    mask = rasterize_labels(objects, labels, 100, 100, 10)
    assert mask.shape == (10, 10) and mask[5, 5] == 2 and mask[0, 0] == 1  # Stroma (2) over Tumor (1)
    assert mask[9, 9] == 2  # whatever the object order or size: the higher label is on top
    monkeypatch.setattr(label_masks, "MAX_PNG_SIDE", 8)
    path = write_mask(tmp_path / "s.labels", mask)
    assert path.name == "s.labels.tif"
    import tifffile

    assert np.array_equal(tifffile.imread(path), mask)
    bowtie = shape({"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]})
    fixed = polygonal(bowtie)
    assert fixed is not None and fixed.is_valid and fixed.area == pytest.approx(50.0)


# ------------------------------------------------------------------------ paquo backend (stand-in)


class StandInAnnotation:
    """Test double of a paquo annotation: what ``paquo_annotation_to_object`` reads."""

    def __init__(self, feature: dict[str, Any]) -> None:
        self._feature = json.loads(json.dumps(feature))  # plain JSON, as QuPath's Gson writes it
        self.roi = shape(feature["geometry"])

    def to_geojson(self) -> dict[str, Any]:
        return self._feature


def stand_in_paquo(project: Path, hierarchies: dict[str, list[dict[str, Any]]]) -> dict[str, types.ModuleType]:
    """Modules named like paquo's whose project returns ``hierarchies`` (entry id -> features)."""

    class StandInProject:
        def __init__(self, path: Any, mode: str = "r") -> None:
            assert Path(path) == project / "project.qpproj" and mode == "r"
            self.images = [types.SimpleNamespace(
                entry_id=eid, hierarchy=types.SimpleNamespace(annotations=[StandInAnnotation(f) for f in feats]))
                for eid, feats in hierarchies.items()]

    projects = types.ModuleType("paquo.projects")
    projects.QuPathProject = StandInProject
    config = types.ModuleType("paquo._config")
    config.settings, config.to_kwargs = {}, lambda s: {}
    backend = types.ModuleType("paquo.jpype_backend")
    backend.find_qupath = lambda **kwargs: "a QuPath install"
    return {"paquo": types.ModuleType("paquo"), "paquo.projects": projects, "paquo._config": config,
            "paquo.jpype_backend": backend}


@needs_slides
def test_export_reads_the_hierarchy_through_paquo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project, svs_features, ome_features = build_project(tmp_path)
    for entry_id in ("1", "2"):  # saved by QuPath; entry 3 never was
        (project / "data" / entry_id / "data.qpdata").write_bytes(b"\xac\xed")
    hierarchies = {"1": annotator_v04(svs_features), "2": ome_features, "3": []}
    for name, module in stand_in_paquo(project, hierarchies).items():
        monkeypatch.setitem(sys.modules, name, module)
    report = export_corrections(project, tmp_path / "out")  # auto: paquo is "available"
    assert report.backend == "paquo"
    svs, ome = report.slides
    check_svs_stats(svs.stats)
    assert ome.stats.untouched == 2 and ome.stats.dice == 1.0
    assert any("never-opened.svs: skipped, never saved in QuPath" in w for w in report.warnings)
    assert (project / "data" / "1" / ZEUS_GEOJSON).is_file()


# ------------------------------------------------------------------------ real QuPath: the Groovy export

EXPORT_SCRIPT = Path(__file__).resolve().parents[1] / "groovy" / "export_training_data.groovy"
IMPORT_SCRIPT = Path(__file__).resolve().parents[1] / "groovy" / "import_zeus_annotations.groovy"


@pytest.fixture(scope="module", params=("0.4.4", "0.5.1", "0.6.0", "0.7.0"))
def qupath(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from qupath.fixtures import qupath_or_skip

    return qupath_or_skip(request.param, tmp_path_factory)



@pytest.mark.jvm
@pytest.mark.slow
@needs_slides
def test_groovy_export_survives_a_missing_slide_and_agrees_with_zeus_export(qupath: Any, tmp_path: Path) -> None:
    """Run for project on real QuPath: a slide that cannot be opened keeps its GeoJSON (one line, no mask, older
    mask removed), the others get masks, one summary; labels.json and masks equal ``zeus export``'s."""
    from qupath.fixtures import only_boundary_differences
    from qupath.harness import route_images_to_test_server

    missing = tmp_path / "slides" / "missing.tif"
    missing.parent.mkdir()
    missing.write_bytes(OME.read_bytes())
    out = tmp_path / "zeus-out"
    write_geojson(out / "a.geojson", feature_collection([QuPathObject(A, class_name="Tumor"),
                                                         QuPathObject(B, class_name="Tumor")]))
    write_geojson(out / "b.geojson", feature_collection([QuPathObject(box(100, 100, 300, 400), class_name="Tumor")]))
    items = [ResultItem(str(missing), str(out / "b.geojson"), 1101, 1101, 0.2271, ((1101, 1101),)),  # first: on
             ResultItem(str(SVS), str(out / "a.geojson"), 2220, 2967, MPP, ((2220, 2967),)),  # 0.4/0.5 QuPath
             ResultItem(str(OME), str(out / "b.geojson"), 1101, 1101, 0.2271, ((1101, 1101),))]  # skips it
    project = tmp_path / "project"
    publish_results(project, items, backend="files")
    assert route_images_to_test_server(project) == 3  # STAND-IN for Bio-Formats (tests/qupath)
    assert not [r for r in qupath.run_for_project(project, IMPORT_SCRIPT) if r.error]
    svs, ome = "CMU-1-Small-Region.svs", "OS-1-detail.ome.tif"
    drawn = [  # mixed-case classes, overlaps, diagonal outlines, a line, an Ignore* region
        (svs, "POLYGON ((300 250, 900 250, 900 700, 300 700, 300 250))", "Stroma"),
        (svs, "POLYGON ((1100 1100, 1201 1100, 1201 1203.5, 1100 1203.5, 1100 1100))", "necrosis"),
        (svs, "POLYGON ((1500 1500, 1900 1530, 1700 1950, 1500 1500))", "tumor"),
        (ome, "POLYGON ((500 500, 800 520, 700 900, 500 500))", "Necrosis"),
        (ome, "POLYGON ((50 900, 250 900, 250 1000, 50 1000, 50 900))", "Ignore*"),
        (ome, "POLYGON ((10 10, 60 10, 60 60, 10 60, 10 10))", "Äpfel"),
        (ome, "LINESTRING (0 0, 500 500)", "Zebra"),
    ]
    qupath.edit(project, [{"image": i, "op": "draw", "wkt": w, "class": c} for i, w, c in drawn])
    export = project / "export"
    export.mkdir()
    (export / "missing.tif-labels.png").write_bytes(b"a mask of an earlier export")
    missing.unlink()  # the slide is gone from this computer
    runs = qupath.run_for_project(project, EXPORT_SCRIPT, save=False)
    text = "\n".join(r.output for r in runs)
    summaries = [line for line in text.splitlines() if line.startswith("ZEUS export: done:")]
    assert len(summaries) == 1, text
    assert "2 image(s) with label mask, 1 without (image not opened: missing.tif), 0 skipped" in summaries[0]
    assert "0 failed" in summaries[0]
    (line,) = [s for s in text.splitlines() if s.startswith("ZEUS export: missing.tif:")]
    assert "exported, no label mask: cannot open the image" in line and "older mask was removed" in line
    assert sorted(p.name for p in export.iterdir()) == [
        f"{svs}-labels.png", f"{svs}.geojson", f"{ome}-labels.png", f"{ome}.geojson", "labels.json",
        "missing.tif.geojson"]  # no temporary files, no mask left that disagrees with its GeoJSON

    # the GeoJSON files hold what QuPath holds (read back with QuPath's own PathIO)
    view = qupath.load_project(project)
    exported = qupath.read_geojson(export / f"{svs}.geojson")
    saved = view.entry(svs).annotations
    assert len(saved) == 5 and sorted((o.id, o.class_name) for o in exported) == sorted(
        (o.id, o.class_name) for o in saved)
    missing_ids = {o.id for o in read_qupath_geojson(export / "missing.tif.geojson")}
    assert missing_ids == {o.id for o in view.entry("missing.tif").annotations} and len(missing_ids) == 1

    # one label rule: Groovy's labels.json and masks equal zeus export's
    groovy_labels = json.loads((export / "labels.json").read_text(encoding="utf-8"))
    assert groovy_labels == {"background": 0, "Tumor": 1, "tumor": 1, "Necrosis": 2, "necrosis": 2, "Stroma": 3,
                             "Äpfel": 4}
    report = export_corrections(project, tmp_path / "py", backend="files")
    assert report.labels == groovy_labels and not [w for w in report.warnings if "other label values" in w]
    assert json.loads(Path(report.labels_json).read_text(encoding="utf-8")) == groovy_labels
    by_name = {s.image_name: s for s in report.slides}
    for name in (svs, ome):
        ours = np.array(Image.open(by_name[name].mask))
        theirs = np.array(Image.open(export / f"{name}-labels.png"))
        assert ours.shape == theirs.shape
        assert set(np.unique(ours)) == set(np.unique(theirs))
        assert only_boundary_differences(ours, theirs)
        assert (ours != theirs).sum() <= 0.15 * (theirs > 0).sum()


# ------------------------------------------------------------------------ a failed export leaves nothing new


def _folder_source(tmp_path: Path) -> Path:
    """Two slides exported from QuPath (File > Export objects), with ZEUS's originals beside them."""
    folder = tmp_path / "qupath-export"
    for stem, geom in (("a", box(0, 0, 400, 300)), ("b", box(100, 100, 500, 600))):
        feats = zeus_features(geom)
        write_geojson(folder / f"{stem}.geojson", {"type": "FeatureCollection", "features": feats})
        write_geojson(folder / f"{stem}.zeus.geojson", {"type": "FeatureCollection", "features": feats})
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), MemoryError()], ids=["disk-full", "memory"])
def test_a_failed_export_leaves_nothing_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str], error: BaseException) -> None:
    from zeus_qupath.cli import main

    source = _folder_source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.geojson").write_text("an earlier export", encoding="utf-8")  # must survive unchanged
    (out / "notes.txt").write_text("the user's", encoding="utf-8")
    before = _tree(out)
    real_write_mask = export_mod.write_mask
    calls = []

    def failing_write_mask(base: Path, mask: np.ndarray) -> Path:
        calls.append(base)
        if len(calls) == 2:  # the second slide's mask: the first slide's files are written by then
            raise error
        return real_write_mask(base, mask)

    monkeypatch.setattr(export_mod, "write_mask", failing_write_mask)
    code = main(["export", str(source), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == (2 if isinstance(error, OSError) else 1) and len(calls) == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("zeus: error:")
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == ["a.geojson", "notes.txt"]

    fresh = tmp_path / "new" / "out"  # a folder the export had to create is removed again
    calls.clear()
    assert main(["export", str(source), "--out", str(fresh)]) in (1, 2)
    assert not (tmp_path / "new").exists()

    monkeypatch.setattr(export_mod, "write_mask", real_write_mask)  # and with nothing failing: the whole set
    assert main(["export", str(source), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.geojson", "a.labels.png", "b.geojson", "b.labels.png",
                                                     "corrections.csv", "labels.json", "notes.txt"]
    assert (out / "a.geojson").read_text(encoding="utf-8") != "an earlier export"


def test_output_set_restores_what_it_replaced_when_moving_in_fails(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import zeus_qupath.output_set as output_set
    from zeus_qupath.output_set import OutputSet

    out = tmp_path / "out"
    out.mkdir()
    (out / "x.txt").write_text("old x", encoding="utf-8")
    real_replace = os.replace
    moved_in: list[str] = []

    def failing_replace(src: Any, dst: Any) -> None:
        if Path(dst).parent == out and ".replaced" not in str(src):
            moved_in.append(Path(dst).name)
            if len(moved_in) == 2:
                raise PermissionError(13, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(output_set.os, "replace", failing_replace)
    with pytest.raises(PermissionError), OutputSet(out) as outputs:
        outputs.path("x.txt").write_text("new x", encoding="utf-8")
        outputs.path("y.txt").write_text("new y", encoding="utf-8")
    assert moved_in == ["x.txt", "y.txt"]
    assert _tree(out) == {"x.txt": b"old x"}  # x moved in, then taken back and the old one restored
    with pytest.raises(ValueError, match="plain file name"), OutputSet(out) as outputs:
        outputs.path("../escape.txt")
    assert _tree(out) == {"x.txt": b"old x"}
