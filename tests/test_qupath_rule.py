"""The keep-edits rule on real QuPath objects (qupath-core 0.4.4 to 0.7.0): Groovy and Python agree.

A project is written by the project writer with ZEUS features of every shape ZEUS writes (holes,
several parts), the import script brings them in (*Run for project*), an annotator edits them through
QuPath's API (every edit kind) and saves, and a new ZEUS result is published into the project. Then, on
the objects QuPath saved:

- the rule block of ``groovy/import_zeus_annotations.groovy`` and ``bridge/edits.py`` must give the same
  verdict for every object and the same merge (what is replaced, added, skipped, blocked);
- every edit must be seen (independent reference: the list of edits made), the untouched objects must
  be recognised in spite of QuPath's float32 storage and ring reordering;
- importing again must undo nothing, bring back no deleted object and add nothing twice.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box, shape

from zeus_qupath.bridge.edits import (
    IMPORTED,
    REPLACED,
    is_untouched_zeus,
    merge_annotations,
    read_import_record,
    same_geometry,
    written_record,
)
from zeus_qupath.bridge.project_files import ZEUS_GEOJSON, FilesProject
from zeus_qupath.qupath_geojson import QuPathObject, annotation_feature

from qupath.fixtures import qupath_or_skip
from qupath.harness import VERSIONS, QuPath, route_images_to_test_server

pytestmark = [pytest.mark.jvm, pytest.mark.slow]

GROOVY = Path(__file__).resolve().parents[1] / "groovy" / "import_zeus_annotations.groovy"
RULE_BLOCK = re.compile(r"// >>> ZEUS keep-edits rule.*?// <<< ZEUS keep-edits rule", re.S)
W, H = 2048, 1536


def ring(cx: float, cy: float, r: float, n: int = 40) -> list[tuple[float, float]]:
    """A 40-gon with coordinates that are not float32-exact (QuPath 0.6 rounds them)."""
    return [(cx + r * math.cos(2 * math.pi * k / n) + 0.013, cy + r * math.sin(2 * math.pi * k / n) + 0.007)
            for k in range(n)]


def feature(geom, cls: str = "Tumor") -> dict:
    obj = QuPathObject(geom, class_name=cls, measurements={"Mean tumor score": 0.4})
    return json.loads(json.dumps(annotation_feature(obj)))


# what ZEUS writes first: one object per edit kind, laid out on a 4 x 3 grid of 400 px cells
FIRST = {
    "vertices_same_area": Polygon(ring(200, 200, 150)),
    "vertex": Polygon(ring(600, 200, 150)),
    "translated": Polygon(ring(1000, 200, 150)),
    "deleted": Polygon(ring(1400, 200, 150)),
    "reclassified": Polygon(ring(200, 600, 150)),
    "renamed": Polygon(ring(600, 600, 150)),
    "hole_filled": Polygon(ring(1000, 600, 170), [ring(1000, 600, 60)[::-1]]),
    "hole_cut": Polygon(ring(1400, 600, 170)),
    "locked": Polygon(ring(200, 1000, 150)),
    "untouched": Polygon(ring(600, 1000, 150)),
    "untouched_holed": Polygon(ring(1000, 1000, 170), [ring(1000, 1000, 50)[::-1]]),
    "untouched_parts": MultiPolygon([Polygon(ring(1330, 930, 60)), Polygon(ring(1470, 1070, 60))]),
}
EDITED = ["vertices_same_area", "vertex", "translated", "reclassified", "renamed", "hole_filled", "hole_cut", "locked"]
UNTOUCHED = ["untouched", "untouched_holed", "untouched_parts"]
DRAWN_WKT = "POLYGON ((1750 100, 1950 100, 1950 300, 1750 300, 1750 100))"
BOWTIE_WKT = "POLYGON ((1700 500, 1900 700, 1900 500, 1700 700, 1700 500))"  # self-crossing, as drawn by hand


def annotator_edits(ids: dict[str, str]) -> list[dict]:
    img = "slide.tif"
    return [
        # two vertices on opposite sides moved 45 px the same way: the area barely changes
        {"image": img, "op": "move_vertices", "id": ids["vertices_same_area"], "vertices": [10, 30], "dx": 45, "dy": 0},
        {"image": img, "op": "move_vertices", "id": ids["vertex"], "vertices": [0], "dx": 25, "dy": -10},
        {"image": img, "op": "translate", "id": ids["translated"], "dx": 30, "dy": 20},
        {"image": img, "op": "delete", "id": ids["deleted"]},
        {"image": img, "op": "reclassify", "id": ids["reclassified"], "class": "Stroma"},
        {"image": img, "op": "rename", "id": ids["renamed"], "name": "checked by AB"},
        {"image": img, "op": "fill_holes", "id": ids["hole_filled"]},
        {"image": img, "op": "cut_hole", "id": ids["hole_cut"],
         "wkt": "POLYGON ((1380 580, 1420 580, 1420 620, 1380 620, 1380 580))"},
        {"image": img, "op": "lock", "id": ids["locked"]},
        {"image": img, "op": "draw", "wkt": DRAWN_WKT, "class": "Tumor"},
        {"image": img, "op": "draw", "wkt": BOWTIE_WKT, "class": "Stroma"},
    ]


def second_result(first_features: dict[str, dict]) -> tuple[list[dict], dict[str, str]]:
    """A re-segmentation: new outlines over edited/deleted/drawn places, one in an empty place, and two old ids."""
    new = {
        "over_edited": feature(Polygon(ring(205, 205, 140))),
        "over_deleted": feature(Polygon(ring(1400, 200, 140))),
        "over_drawn": feature(box(1800, 150, 1900, 250)),
        "over_locked": feature(Polygon(ring(200, 1000, 100))),
        "over_bowtie_lobe": feature(box(1710, 580, 1760, 620)),
        "in_empty_place": feature(box(1700, 1300, 1900, 1450)),
        "touching_drawn": feature(box(1950, 100, 2000, 300)),  # shares only an edge: not an overlap
    }
    features = [*new.values(), first_features["untouched"], first_features["deleted"]]
    return features, {k: v["id"] for k, v in new.items()}


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    return make_synthetic_slide(tmp_path_factory.mktemp("slide") / "slide.tif", W, H, seed=3).path


@pytest.fixture(scope="module", params=VERSIONS)
def qupath(request, tmp_path_factory) -> QuPath:
    return qupath_or_skip(request.param, tmp_path_factory)


def publish(project: Path, slide: Path, features: list[dict]) -> None:
    with FilesProject(project) as proj:
        proj.add_or_update_image(slide, features, width=W, height=H, mpp=0.5, levels=[(W, H)])


def rule_script(tmp: Path, new_geojson: Path) -> Path:
    """The import script's rule block, run on the current image without changing it; prints its answers."""
    text = GROOVY.read_text(encoding="utf-8")
    imports = "\n".join(line for line in text.splitlines() if line.startswith("import "))
    block = RULE_BLOCK.search(text).group(0)
    path = tmp / "rule_answers.groovy"
    path.write_text(f"""{imports}
{block}
def entry = getProjectEntry()
File dir = entry.getEntryPath().toFile()
def written = writtenRecord(new File(dir, '{ZEUS_GEOJSON}'))
def status = readImportRecord(dir)
def objects = getCurrentImageData().getHierarchy().getAllObjects(false)
def verdicts = [:]
objects.each {{ verdicts[it.getID().toString()] = isUntouchedZeus(it, written) }}
def merge = mergeZeus(objects, readGeoJson(new File('{new_geojson.as_posix()}')), written, status)
def ids = {{ list -> list.collect {{ it.getID().toString() }}.sort() }}
def answers = [untouched: verdicts, removed: ids(merge.removed), kept: ids(merge.kept), added: ids(merge.added),
               skipped: ids(merge.skipped), deleted: ids(merge.deleted), blocked: ids(merge.blocked),
               deletedIds: new ArrayList(merge.deletedIds), status: merge.status]
println 'RULE ' + GsonTools.getInstance().toJson(answers)
""", encoding="utf-8")
    return path


def test_rule_in_real_qupath(qupath: QuPath, slide: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    first = {k: feature(g) for k, g in FIRST.items()}
    publish(project, slide, list(first.values()))
    route_images_to_test_server(project)  # STAND-IN: the slide is opened by the test-only image server
    ids = {k: f["id"] for k, f in first.items()}

    # 1. import, Run for project: every ZEUS object arrives, untouched, once
    (run,) = qupath.run_for_project(project, GROOVY)
    assert run.error is None, run
    entry = qupath.load_project(project).entry("slide.tif")
    imported = {o.id: o for o in entry.annotations}
    assert sorted(imported) == sorted(ids.values())
    written = written_record(entry.entry_path / ZEUS_GEOJSON)
    assert all(is_untouched_zeus(o, written) for o in imported.values())
    assert read_import_record(entry.entry_path).status == {i: IMPORTED for i in ids.values()}

    # 2. the annotator edits through QuPath's API and saves
    drawn_id, bowtie_id = qupath.edit(project, annotator_edits(ids))
    entry = qupath.load_project(project).entry("slide.tif")
    after_edit = {o.id: o for o in entry.objects}
    assert ids["deleted"] not in after_edit and drawn_id in after_edit
    same_area = after_edit[ids["vertices_same_area"]].geometry
    assert abs(same_area.area - imported[ids["vertices_same_area"]].geometry.area) < 0.01 * same_area.area
    assert after_edit[ids["translated"]].measurements == {}  # QuPath cleared them: measurements cannot be the rule

    # 3. every edit seen, every untouched object recognised (Python on QuPath's objects)
    verdict = {name: is_untouched_zeus(after_edit[ids[name]], written) for name in EDITED + UNTOUCHED}
    assert verdict == {**{n: False for n in EDITED}, **{n: True for n in UNTOUCHED}}
    assert not is_untouched_zeus(after_edit[drawn_id], written)
    assert after_edit[bowtie_id].geometry.area > 0  # QuPath makes the crossing outline valid (both lobes kept?)

    # 4. a new result is published; Groovy's rule block and Python's rule answer the same on QuPath's objects
    new_features, new_ids = second_result(first)
    publish(project, slide, new_features)
    written = written_record(entry.entry_path / ZEUS_GEOJSON)  # now with the backup of the first result
    assert set(written) == set(ids.values()) | set(new_ids.values())
    (answer_run,) = qupath.run_for_project(project, rule_script(tmp_path, entry.entry_path / ZEUS_GEOJSON),
                                           save=False)
    assert answer_run.error is None, answer_run
    groovy = json.loads(answer_run.output.split("RULE ", 1)[1])
    record = read_import_record(entry.entry_path)
    merge = merge_annotations(entry.objects, new_features, written, record)
    python = {
        "untouched": {o.id: is_untouched_zeus(o, written) for o in entry.objects},
        "removed": sorted(o.id for o in merge.removed), "kept": sorted(o.id for o in merge.kept),
        "added": sorted(f["id"] for f in merge.added), "skipped": sorted(f["id"] for f in merge.skipped),
        "deleted": sorted(f["id"] for f in merge.deleted), "blocked": sorted(f["id"] for f in merge.blocked),
        "deletedIds": sorted(merge.deleted_ids), "status": dict(merge.record.status),
    }
    assert groovy == python

    # ... and both answer what the edits call for (independent of either implementation)
    assert python["removed"] == sorted(ids[n] for n in ("untouched_holed", "untouched_parts"))
    assert python["skipped"] == [ids["untouched"]]
    assert python["deleted"] == [ids["deleted"]] and python["deletedIds"] == [ids["deleted"]]
    assert python["blocked"] == sorted(new_ids[n] for n in ("over_edited", "over_deleted", "over_drawn", "over_locked",
                                                           "over_bowtie_lobe"))
    assert python["added"] == sorted(new_ids[n] for n in ("in_empty_place", "touching_drawn"))

    # 5. import again (Run for project) and once more: nothing the annotator did is undone, nothing doubled
    for _ in range(2):
        (run,) = qupath.run_for_project(project, GROOVY)
        assert run.error is None, run
        final = {o.id: o for o in qupath.load_project(project).entry("slide.tif").objects}
        expected = ({ids[n] for n in EDITED + ["untouched"]} | {drawn_id, bowtie_id}
                    | {new_ids["in_empty_place"], new_ids["touching_drawn"]})
        assert set(final) == expected
        for name in EDITED:
            obj, before = final[ids[name]], after_edit[ids[name]]
            assert same_geometry(obj.geometry, before.geometry)
            assert (obj.class_name, obj.name, obj.is_locked) == (before.class_name, before.name, before.is_locked)
        assert final[ids["reclassified"]].class_name == "Stroma"
        assert final[ids["renamed"]].name == "checked by AB"
        assert same_geometry(final[drawn_id].geometry, after_edit[drawn_id].geometry)
        status = read_import_record(entry.entry_path).status
        assert status[ids["deleted"]] == IMPORTED  # still known as deleted
        assert status[ids["untouched_parts"]] == REPLACED


def test_float32_coordinates_of_qupath_06_still_match(qupath: QuPath, tmp_path: Path) -> None:
    """QuPath 0.6 stores float32 coordinates and reorders rings; the written geometry must still match."""
    path = tmp_path / "odd.geojson"
    odd = Polygon([(123456.789, 98765.4321), (123999.123, 98765.4321), (123999.123, 99999.987),
                   (123456.789, 99999.987)],
                  [[(123600.111, 98900.222), (123700.333, 98900.222), (123700.333, 99000.444)]])
    feats = [feature(odd), feature(MultiPolygon([box(0.1, 0.1, 10.3, 10.7), box(20.01, 20.02, 30.03, 30.04)]))]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}), encoding="utf-8")
    objects = qupath.read_geojson(path)
    written = written_record(path)
    assert [o.id for o in objects] == [f["id"] for f in feats]
    assert all(is_untouched_zeus(o, written) for o in objects)
    if qupath.version >= "0.6":  # really float32 there: QuPath's coordinates differ from the written ones
        ours = shapely.get_coordinates(shapely.normalize(shape(feats[0]["geometry"])))
        theirs = shapely.get_coordinates(shapely.normalize(objects[0].geometry))
        assert 0 < abs(ours - theirs).max() <= 2.0**-23 * 123999.123


def test_heatmap_tiles_are_replaced_not_doubled(qupath: QuPath, slide: Path, tmp_path: Path) -> None:
    """zeus_tiles.geojson beside the annotations: the import puts the tiles in and replaces them next time."""
    project = tmp_path / "project"
    publish(project, slide, [feature(Polygon(ring(600, 600, 150)))])
    route_images_to_test_server(project)
    entry_dir = project / "data" / "1"

    def tiles(score: float) -> None:
        feats = [{"type": "Feature", "geometry": shapely.geometry.mapping(box(x, y, x + 112, y + 112)),
                  "properties": {"objectType": "tile", "measurements": {"ZEUS score: Tumor": score}}}
                 for x in range(0, 448, 112) for y in range(0, 336, 112)]
        (entry_dir / "zeus_tiles.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))

    for score in (0.25, 0.75):
        tiles(score)
        (run,) = qupath.run_for_project(project, GROOVY)
        assert run.error is None and "12 heatmap tile(s)" in run.output, run
        objects = qupath.load_project(project).entry("slide.tif").objects
        tile_objects = [o for o in objects if o.object_type == "tile"]
        assert len(tile_objects) == 12
        assert {o.measurements["ZEUS score: Tumor"] for o in tile_objects} == {score}
        assert len([o for o in objects if o.object_type == "annotation"]) == 1
