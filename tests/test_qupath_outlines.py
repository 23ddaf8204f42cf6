"""ZEUS outlines and the java.awt.geom.Area bug of JDK 25.0.3 / 26.0.1 (JDK-8386576), in real QuPath 0.4.4 to 0.7.0.

QuPath makes a ``PolygonROI`` of every GeoJSON polygon without holes and gives its geometry through
``java.awt.geom.Area`` (0.4/0.5 even build the ROI through it when reading); on those Javas large outlines come back
with less area and in pieces. No GeoJSON spelling avoids that in 0.6/0.7 (their reader reduces every geometry to
QuPath's precision with a JTS overlay, so a one-part MultiPolygon or one with an empty part comes back a plain
Polygon), so the scripts that bring ZEUS outlines into QuPath check each one against the written geometry and, when
the Java changed it, add the written outline itself as a geometry ROI and say so in one line.

Outlines: ZEUS's own outline code (``polygons.mask_polygons``) on the real test slides (tests/data/wsi), outlines of
many vertices made here (circle, noisy circle, pixel staircase, with holes, two parts) and small ones. Each version
runs on a good Java (the harness's choice: 17, 21, 25.0.2) and on a Java with the bug (Temurin 25.0.3 on these
machines; skipped where there is none). Independent references: the written GeoJSON (shapely) and QuPath's own
PathIO reader on the bad Java (which must show the bug, or this test would prove nothing).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape

from zeus_qupath.bridge.edits import is_untouched_zeus, same_geometry, written_record
from zeus_qupath.bridge.project_files import ZEUS_GEOJSON, FilesProject
from zeus_qupath.qupath_geojson import QuPathObject, annotation_feature

from conftest import shared_file
from qupath.fixtures import qupath_or_skip
from qupath.harness import (
    JVM_DIR,
    VERSIONS,
    java_full_version,
    java_has_area_bug,
    required_java,
    route_images_to_test_server,
)

pytestmark = [pytest.mark.jvm, pytest.mark.slow]

GROOVY = Path(__file__).resolve().parents[1] / "groovy" / "import_zeus_annotations.groovy"
W, H = 4096, 3072
WARNING = "java.awt.geom.Area changes large outlines"


def _circle(cx: float, cy: float, r: float, n: int, jitter: float = 0.0, seed: int = 0) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    radii = [r * (1 + jitter * (rng.random() - 0.5)) for _ in range(n)]
    return [(round(cx + rr * math.cos(2 * math.pi * k / n), 2), round(cy + rr * math.sin(2 * math.pi * k / n), 2))
            for k, rr in enumerate(radii)]


def _slide_outlines() -> dict[str, Polygon]:
    """ZEUS's outline code (mask_polygons, as ``zeus segment`` draws them) on dark regions of the real test slides."""
    import tiffslide
    from PIL import ImageFilter

    from zeus_qupath.polygons import PolygonParams, mask_polygons
    from zeus_qupath.reconstruct import Mask

    out = {}
    for name, threshold, blur, hole_area in (("CMU-1-Small-Region.svs", 200, 6, 1e12),
                                             ("CMU-1-Small-Region.svs", 200, 6, 500.0),
                                             ("OS-1-detail.ome.tif", 140, 2, 1e12)):
        with tiffslide.TiffSlide(shared_file("wsi", name)) as ts:
            w, h = ts.dimensions
            image = ts.read_region((0, 0), 0, (w, h)).convert("L").filter(ImageFilter.GaussianBlur(blur))
        mask = Mask(np.asarray(image) < threshold, 1.0, w, h)
        polys = mask_polygons(mask, PolygonParams(min_area=5000, min_hole_area=hole_area, tolerance=1.0))
        for k, poly in enumerate(polys[:4]):
            out[f"{name}:{'holes' if hole_area < 1e12 else 'outline'}{k}"] = poly
    return out


def _made_outlines() -> dict[str, Polygon | MultiPolygon]:
    steps = []
    for i in range(500):  # a pixel staircase, as a mask contour without simplification
        steps += [(2600 + 2 * i, 2000 + 1.5 * i), (2600 + 2 * i + 2, 2000 + 1.5 * i)]
    steps += [(3600, 2750), (3600, 3000), (2600, 3000)]
    return {
        "circle2000": Polygon(_circle(3300, 700, 600, 2000)),
        "noisy1500": Polygon(_circle(3300, 1700, 500, 1500, jitter=0.3, seed=1)),
        "staircase": Polygon(steps),
        "holes": Polygon(_circle(1100, 2300, 500, 1500), [_circle(1000, 2300, 100, 300)[::-1]]),
        "two_parts": MultiPolygon([Polygon(_circle(2000, 2600, 200, 800)), Polygon(_circle(2600, 2600, 200, 800))]),
        "small": Polygon(_circle(300, 2900, 80, 40)),
    }


@pytest.fixture(scope="module")
def outlines() -> dict[str, dict]:
    """name -> ZEUS feature (marked, 0.01 px precision) of every outline above."""
    geoms = {**_slide_outlines(), **_made_outlines()}
    assert all(g.is_valid for g in geoms.values())
    assert max(shapely.get_num_coordinates(g) for g in geoms.values()) > 1000  # enough to show the bug
    return {name: json.loads(json.dumps(annotation_feature(QuPathObject(g, class_name="Tumor"))))
            for name, g in geoms.items()}


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    return make_synthetic_slide(tmp_path_factory.mktemp("outline-slide") / "slide.tif", W, H, seed=5).path


@pytest.fixture(scope="module")
def bad_javas(tmp_path_factory) -> list[Path]:
    """The Javas in /usr/lib/jvm whose java.awt.geom.Area has the bug (here Temurin 25.0.3 and Debian's 17.0.21)."""
    root = tmp_path_factory.getbasetemp() / "qupath-build"
    homes = {home.resolve() for home in (JVM_DIR.glob("*") if JVM_DIR.is_dir() else [])
             if (home / "bin" / "java").exists() and (home / "release").exists()}
    return sorted(home for home in homes if java_has_area_bug(home, root))


def bad_java_for(version: str, bad_javas: list[Path]) -> Path:
    """A Java with the bug that runs ``version`` (the oldest such major); skipped where there is none."""
    runs = [h for h in bad_javas if int((java_full_version(h) or "0").split(".")[0]) >= required_java(version)]
    if not runs:
        pytest.skip(f"no Java {required_java(version)}+ with the java.awt.geom.Area bug (JDK-8386576) in {JVM_DIR}")
    return min(runs, key=lambda h: java_full_version(h) or "")


def _project(root: Path, slide: Path, features: list[dict]) -> Path:
    project = root / "project"
    with FilesProject(project) as proj:
        proj.add_or_update_image(slide, features, width=W, height=H, mpp=0.5, levels=[(W, H)])
    route_images_to_test_server(project)  # STAND-IN: the slide is opened by the test-only image server
    return project


def _republish(project: Path, slide: Path, features: dict[str, dict]) -> dict[str, dict]:
    """A new ZEUS result of the same outlines (new IDs) published into the project, as a re-segmentation does."""
    new = {name: json.loads(json.dumps(annotation_feature(QuPathObject(shape(f["geometry"]), class_name="Tumor"))))
           for name, f in features.items()}
    with FilesProject(project) as proj:
        proj.add_or_update_image(slide, list(new.values()), width=W, height=H, mpp=0.5, levels=[(W, H)])
    return new


def _replaced_all(output: str, n: int) -> bool:
    """The import replaced all ``n`` earlier ZEUS objects as untouched, kept none as edited, blocked nothing."""
    return (f"replaced {n} untouched ZEUS annotation(s), added {n}, kept 0 other object(s); not added: "
            "0 already present, 0 deleted by you, 0 over your own") in output


def _parts(geom) -> tuple[int, int]:
    polys = list(geom.geoms) if isinstance(geom, MultiPolygon) else [geom]
    return len(polys), sum(len(p.interiors) for p in polys)


def _same_shape(geom, want) -> bool:
    """The same parts, holes and area (QuPath's Area-based geometry drops collinear vertices even on a good Java)."""
    return _parts(geom) == _parts(want) and geom.area == pytest.approx(want.area, rel=1e-6)


def _assert_exact(objects: list[QuPathObject], features: dict[str, dict], written: dict) -> None:
    """Every ZEUS outline is in QuPath once: the outline it holds is the written one (float32), its geometry has the
    written shape, and the keep-edits rule sees it untouched."""
    by_id = {o.id: o for o in objects}
    assert sorted(by_id) == sorted(f["id"] for f in features.values())
    for name, f in features.items():
        obj, want = by_id[f["id"]], shape(f["geometry"])
        held = obj.properties["held"]
        if same_geometry(held, want):  # every vertex as written (float32)
            assert is_untouched_zeus(replace(obj, geometry=held), written), name
        else:  # QuPath 0.4/0.5 build a plain polygon's ROI through Area (any Java), which drops collinear vertices
            # and splits some edges of float32 vertices: the same outline, every point within float32 rounding of the
            # written one and the reverse
            assert obj.properties["roiType"] == "Polygon" and held.hausdorff_distance(want) <= 1e-3, name
        assert _same_shape(obj.geometry, want), name  # what QuPath's geometry operations, exports and measurements see


@pytest.mark.parametrize("java", ["good", "area-bug"])
@pytest.mark.parametrize("version", VERSIONS)
def test_import_brings_zeus_outlines_back_exactly(version: str, java: str, outlines: dict, slide: Path,
                                                   tmp_path: Path, tmp_path_factory, request) -> None:
    home = bad_java_for(version, request.getfixturevalue("bad_javas")) if java == "area-bug" else None
    qupath = qupath_or_skip(version, tmp_path_factory, java_home=home)
    project = _project(tmp_path, slide, list(outlines.values()))
    zeus_file = project / "data" / "1" / ZEUS_GEOJSON

    # the bug is there (or not) in QuPath's own reader: the reference for what the import has to avoid
    by_id = {f["id"]: shape(f["geometry"]) for f in outlines.values()}
    changed = [o for o in qupath.read_geojson(zeus_file) if not _same_shape(o.geometry, by_id[o.id])]
    assert bool(changed) == (java == "area-bug"), [o.id for o in changed]

    (run,) = qupath.run_for_project(project, GROOVY)
    assert run.error is None, run
    warnings = [line for line in run.output.splitlines() if WARNING in line]
    if java == "area-bug":
        assert len(warnings) == 1, run.output
        assert f"Java {java_full_version(qupath.java_home)}" in warnings[0]
        assert f"{len(changed)} ZEUS outline(s) added exactly as written" in warnings[0]
    else:
        assert warnings == [], run.output
    entry = qupath.load_project(project).entry("slide.tif")
    written = written_record(entry.entry_path / ZEUS_GEOJSON)
    _assert_exact(entry.annotations, outlines, written)
    kinds = {o.id: o.properties["roiType"] for o in entry.annotations}
    for name, f in outlines.items():
        plain = _parts(shape(f["geometry"])) == (1, 0)
        changed_here = f["id"] in {o.id for o in changed}
        assert kinds[f["id"]] == ("Polygon" if plain and not changed_here else "Geometry"), name

    # a new result of the same outlines: every earlier ZEUS object is recognised untouched and replaced, none is
    # kept as an annotator's edit, none blocks the new ones
    second = _republish(project, slide, outlines)
    (again,) = qupath.run_for_project(project, GROOVY)
    assert again.error is None and _replaced_all(again.output, len(outlines)), again
    entry = qupath.load_project(project).entry("slide.tif")
    _assert_exact(entry.annotations, second, written_record(entry.entry_path / ZEUS_GEOJSON))


@pytest.mark.parametrize("version", ["0.7.0"])  # 0.6.0 passes too (same conversion code); left out for CI time
def test_outlines_imported_on_a_good_java_stay_untouched_on_a_bad_one(version: str, outlines: dict, slide: Path,
                                                                      bad_javas: list[Path], tmp_path: Path,
                                                                      tmp_path_factory) -> None:
    """Plain PolygonROIs saved on a good Java: on a Java that changes their geometry they are still untouched ZEUS
    objects (compared by their vertices), so they are replaced by the exact outlines, never kept as edits."""
    good = qupath_or_skip(version, tmp_path_factory)
    bad = qupath_or_skip(version, tmp_path_factory, java_home=bad_java_for(version, bad_javas))
    project = _project(tmp_path, slide, list(outlines.values()))
    (run,) = good.run_for_project(project, GROOVY)
    assert run.error is None and WARNING not in run.output, run
    _republish(project, slide, outlines)
    (run,) = bad.run_for_project(project, GROOVY)
    assert run.error is None and _replaced_all(run.output, len(outlines)) and WARNING in run.output, run
    third = _republish(project, slide, outlines)
    (run,) = good.run_for_project(project, GROOVY)  # and back: the exact geometry ROIs are untouched ZEUS objects too
    assert run.error is None and _replaced_all(run.output, len(outlines)) and WARNING not in run.output, run
    entry = good.load_project(project).entry("slide.tif")
    _assert_exact(entry.annotations, third, written_record(entry.entry_path / ZEUS_GEOJSON))


def test_segment_script_adds_the_services_outlines_exactly_on_a_bad_java(outlines: dict, slide: Path, bad_javas,
                                                                         tmp_path: Path, tmp_path_factory) -> None:
    """``zeus_segment_current_image.groovy`` with an answer of the service (ANSWER_FILE, as the extension runs it)
    on QuPath 0.7.0 and Temurin 25.0.3: the outlines are added as written, with the one WARNING line."""
    qupath = qupath_or_skip("0.7.0", tmp_path_factory, java_home=bad_java_for("0.7.0", bad_javas))
    project = _project(tmp_path, slide, [])
    answer = tmp_path / "answer.geojson"
    answer.write_text(json.dumps({"type": "FeatureCollection", "features": list(outlines.values())}), "utf-8")
    script = tmp_path / "zeus_segment_current_image.groovy"
    text = (GROOVY.parent / "zeus_segment_current_image.groovy").read_text(encoding="utf-8")
    script.write_text(text.replace("String ANSWER_FILE = ''", f"String ANSWER_FILE = '{answer.as_posix()}'", 1),
                      encoding="utf-8")
    (run,) = qupath.run_for_project(project, script)
    assert run.error is None, run
    warnings = [line for line in run.output.splitlines() if WARNING in line]
    assert len(warnings) == 1 and f"Java {java_full_version(qupath.java_home)}" in warnings[0], run.output
    entry = qupath.load_project(project).entry("slide.tif")
    record = entry.entry_path / "zeus_service.geojson"  # the answer, kept as the record of what ZEUS wrote
    _assert_exact(entry.annotations, outlines, written_record(record))
