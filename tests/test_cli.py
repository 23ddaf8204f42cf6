"""The zeus command line, end to end with the tiny open_clip model, on real and synthetic slides."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import shape

from zeus_qupath.cli import main
from zeus_qupath.outputs import PatchScores

from conftest import shared_file


@pytest.fixture(scope="module")
def tiny_args(tiny_model, spindle_prompts):
    return ["--model", f"open_clip:{tiny_model.config_path}", "--pretrained", str(tiny_model.checkpoint_path),
            "--prompts", str(spindle_prompts), "--device", "cpu", "--quiet"]


def check_geojson(path, width, height):
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    for feat in data["features"]:
        geom = shape(feat["geometry"])
        assert geom.geom_type in ("Polygon", "MultiPolygon") and geom.is_valid and geom.area > 0
        minx, miny, maxx, maxy = geom.bounds
        assert 0 <= minx and 0 <= miny and maxx <= width and maxy <= height
        props = feat["properties"]
        assert props["objectType"] == "annotation" and props["classification"]["name"] == "Tumor"
        assert len(props["classification"]["color"]) == 3 and props["name"].startswith("ZEUS")
        assert all(np.isfinite(v) for v in props["measurements"].values())
    return data


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_args):
    out = tmp_path_factory.mktemp("real")
    slides = [shared_file("wsi", "CMU-1-Small-Region.svs"), shared_file("wsi", "OS-1-detail.ome.tif")]
    assert main(["segment", *map(str, slides), *tiny_args, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("stem,size", [("CMU-1-Small-Region", (2220, 2967)), ("OS-1-detail", (1101, 1101))])
def test_segment_real_slides(real_run, stem, size):
    check_geojson(real_run / f"{stem}.geojson", *size)
    scores = PatchScores.load(real_run / f"{stem}.scores.npz")
    assert (scores.width, scores.height) == size and scores.classes == ("normal", "tumor")
    assert scores.patch_size == 448 and scores.stride == 112
    # OS-1-detail is a 250 um crop segmented at level 0: no tissue region passes CLAM's a_t = 2 x 512^2 level-0
    # px, so the default (--tissue zeus, as ZEUS) keeps no patch there (tests/test_clam_rules.py); CMU-1 has tissue
    assert (len(scores.coords) == 0) if stem == "OS-1-detail" else (len(scores.coords) > 0)
    assert (scores.coords[:, 0] < size[0]).all() and (scores.coords[:, 1] < size[1]).all()
    assert np.all(np.abs(scores.scores) <= 1.0001)
    with Image.open(real_run / f"{stem}.overlay.png") as im:
        assert abs(im.width / im.height - size[0] / size[1]) < 0.01
    run = json.loads((real_run / "run.json").read_text())
    assert run["complete"] and len(run["slides"]) == 2
    assert run["prompts"]["sha256"] and run["versions"]["torch"]
    assert {s["stem"] for s in run["slides"]} == {"CMU-1-Small-Region", "OS-1-detail"}


@pytest.mark.slow
def test_coarse_tissue_rule_finds_tissue_in_a_small_crop(tmp_path, tiny_args, capsys):
    slide = shared_file("wsi", "OS-1-detail.ome.tif")
    assert main(["segment", str(slide), *tiny_args, "--out", str(tmp_path / "zeus")]) == 0
    assert "no tissue" in capsys.readouterr().err
    assert main(["segment", str(slide), *tiny_args, "--tissue", "coarse", "--out", str(tmp_path / "coarse")]) == 0
    scores = PatchScores.load(tmp_path / "coarse" / "OS-1-detail.scores.npz")
    assert len(scores.coords) == 49 and not np.any(scores.coords % 112)  # one grid from (0, 0), as before
    run = json.loads((tmp_path / "coarse" / "run.json").read_text())
    assert run["parameters"]["tissue"] == "coarse"


def test_polygons_command_reproduces_segment(real_run, tmp_path):
    out = tmp_path / "again.geojson"
    assert main(["polygons", str(real_run / "CMU-1-Small-Region.scores.npz"), "--out", str(out)]) == 0
    a = json.loads((real_run / "CMU-1-Small-Region.geojson").read_text())["features"]
    b = json.loads(out.read_text())["features"]
    ga = shapely.union_all([shape(f["geometry"]) for f in a])
    gb = shapely.union_all([shape(f["geometry"]) for f in b])
    assert len(a) == len(b) and ga.symmetric_difference(gb).area <= 1e-6 * max(ga.area, 1)


@pytest.mark.slow
def test_demo_segments_the_synthetic_slide(tmp_path, tiny_model_cache, capsys):
    assert main(["demo", "--out", str(tmp_path), "--cache", str(tiny_model_cache), "--quiet"]) == 0
    text = capsys.readouterr().out
    dice = float(text.split("Dice vs the known tumor mask (inside tissue): ")[1].split()[0])
    assert dice >= 0.8
    check_geojson(tmp_path / "demo_slide.geojson", 6144, 4096)
    # the same Dice through the evaluate command, against the known mask
    assert main(["evaluate", str(tmp_path / "demo_slide.geojson"), str(tmp_path / "demo_slide.tumor.png"),
                 "--tissue", str(tmp_path / "demo_slide.tissue.png"), "--slide", str(tmp_path / "demo_slide.tif")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["dice"] == pytest.approx(dice, abs=1e-3) and 0 <= scores["precision"] <= 1


def test_slide_without_tissue_gives_empty_collection(tmp_path, tiny_args, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(np.clip(rng.normal(246, 2, (900, 1200, 3)), 0, 255).astype(np.uint8)).save(tmp_path / "blank.png")
    assert main(["segment", str(tmp_path / "blank.png"), *tiny_args, "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "blank.geojson").read_text()) == {"type": "FeatureCollection",
                                                                          "features": []}
    assert "no tissue" in capsys.readouterr().err


def test_bad_inputs_one_line_no_traceback_no_output(tmp_path, tiny_args, spindle_prompts, capsys):
    out = tmp_path / "out"
    truncated = tmp_path / "cut.svs"
    data = shared_file("wsi", "CMU-1-Small-Region.svs").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    broken = tmp_path / "broken.json"
    broken.write_text('{"0": {"classnames": {"tumor": ["t"]}, "templates": ["CLASSNAME"]}}')
    svs = str(shared_file("wsi", "CMU-1-Small-Region.svs"))
    cases = [
        (["segment", str(tmp_path / "missing.svs"), *tiny_args], "slide not found"),
        (["segment", str(truncated), *tiny_args], "cut.svs"),
        (["segment", svs, *tiny_args[:4], "--prompts", str(broken)], "at least two classes"),
        (["segment", svs, "--model", "no-such-model", "--prompts", str(spindle_prompts)], "unknown model"),
        (["segment", svs, "--model", "quiltnet-b32", "--prompts", str(spindle_prompts)], "QuiltNet-B-32"),
        (["segment", str(shared_file("wsi", "OS-1-detail.ome.tif")), *tiny_args, "--target-mpp", "1", "--mpp", "-1"],
         "argument --mpp: must be a pixel size in um/px in (0, 1000], got '-1'"),
        (["polygons", str(tmp_path / "missing.scores.npz")], "scores file not found"),
    ]
    for args, needle in cases:  # in this process: main() is what the console script runs
        try:
            rc = main([*args, "--out", str(out)] if args[0] == "segment" else args)
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("zeus") and needle in lines[0], err
    assert not out.exists() or not any(p.suffix in (".geojson", ".npz", ".png") for p in out.iterdir())


def test_unknown_mpp_is_a_one_line_error(tmp_path, tiny_args, capsys):
    Image.fromarray(np.full((500, 500, 3), 200, np.uint8)).save(tmp_path / "a.png")
    assert main(["segment", str(tmp_path / "a.png"), *tiny_args, "--target-mpp", "0.5",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pixel size unknown" in err[0]


@pytest.mark.slow
def test_score_command_from_clam_features(tmp_path, tiny_args, tiny_encoder, capsys):
    import h5py

    from zeus_qupath.samples.synthetic import make_synthetic_slide

    slide = make_synthetic_slide(tmp_path / "s.tif", 2048, 1536, seed=3)
    from zeus_qupath.grid import PatchGeometry, make_grid
    from zeus_qupath.reader import RegionReader

    grid = make_grid(2048, 1536, PatchGeometry(448, 112), None)
    feats = np.zeros((len(grid), tiny_encoder.embed_dim), np.float32)
    for batch in RegionReader(str(slide.path), grid):
        feats[batch.indices] = tiny_encoder.encode_images(batch.pixels)
    with h5py.File(tmp_path / "s.h5", "w") as h5:  # CLAM layout: no attributes
        h5["coords"] = grid.coords.astype(np.int32)
        h5["features"] = feats
    model_args = tiny_args[:6]  # --model, --pretrained, --prompts
    assert main(["score", str(tmp_path / "s.h5"), *model_args, "--patch-size", "448", "--width", "2048",
                 "--height", "1536", "--out", str(tmp_path / "o")]) == 0
    scores = PatchScores.load(tmp_path / "o" / "s.scores.npz")
    assert scores.scores.shape == (len(grid), 2) and scores.stride == 112
    check_geojson(tmp_path / "o" / "s.geojson", 2048, 1536)
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as h5:
        h5["coords"] = grid.coords.astype(np.int32)
        h5["features"] = np.ones((len(grid), 7), np.float32)
    capsys.readouterr()
    assert main(["score", str(bad), *model_args, "--patch-size", "448", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "7-d" in err[0]


@pytest.mark.slow
def test_qupath_round_trip_keeps_edits_and_reports_corrections(tmp_path, tiny_args, capsys):
    """Segment into a QuPath-free project, correct like an annotator, re-run, export: the issue's walk-through."""
    import uuid

    from shapely.geometry import box, mapping

    from zeus_qupath.samples.synthetic import make_synthetic_slide

    slide = make_synthetic_slide(tmp_path / "case.tif", 3072, 2048, seed=11, tumor_fraction=0.4)
    project, out = tmp_path / "project", tmp_path / "out"
    args = ["segment", str(slide.path), *tiny_args, "--out", str(out), "--project", str(project), "--backend", "files"]
    assert main(args) == 0
    qpproj = json.loads((project / "project.qpproj").read_text())
    (entry,) = qpproj["images"]
    assert entry["imageName"] == "case.tif" and entry["metadata"]["zeus.status"]
    zeus_file = project / "data" / str(entry["entryID"]) / "zeus_annotations.geojson"
    zeus = json.loads(zeus_file.read_text())["features"]
    assert zeus and (project / "scripts" / "import_zeus_annotations.groovy").is_file()

    # the annotator, in QuPath: moves part of the first outline, deletes the others, draws one more;
    # the export script then writes export/<image>.geojson
    first = zeus[0]
    g = shape(first["geometry"])
    minx, miny, maxx, maxy = g.bounds
    first["geometry"] = mapping(g.difference(box(minx, miny, (minx + maxx) / 2, maxy)))
    drawn = {"type": "Feature", "id": str(uuid.uuid4()), "geometry": mapping(box(10, 10, 410, 310)),
             "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}}
    (project / "export").mkdir()
    corrected = {"type": "FeatureCollection", "features": [first, drawn]}
    (project / "export" / "case.tif.geojson").write_text(json.dumps(corrected))
    data_qp = project / "data" / str(entry["entryID"]) / "data.qpdata"
    data_qp.write_bytes(b"QuPath's own file with the annotator's work")

    assert main([*args, "--threshold", "argmax"]) == 0  # re-run into the same project, other parameters
    again = json.loads((project / "project.qpproj").read_text())
    assert [e["entryID"] for e in again["images"]] == [entry["entryID"]]
    assert data_qp.read_bytes() == b"QuPath's own file with the annotator's work"
    assert json.loads((project / "export" / "case.tif.geojson").read_text()) == json.loads(json.dumps(corrected))
    assert list((project / "data" / str(entry["entryID"])).glob("zeus_annotations.geojson.bak-*"))

    capsys.readouterr()
    assert main(["export", str(project), "--out", str(tmp_path / "exported")]) == 0
    table = capsys.readouterr().out
    import csv

    (row,) = csv.DictReader((tmp_path / "exported" / "corrections.csv").open())
    assert int(row["created"]) == 1 and int(row["edited"]) == 1 and int(row["deleted"]) == len(zeus) - 1
    assert 0 < float(row["dice"]) < 1 and float(row["added_area"]) > 0 and float(row["removed_area"]) > 0
    assert "case" in table and (tmp_path / "exported" / "labels.json").is_file()
