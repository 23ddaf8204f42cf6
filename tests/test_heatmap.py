"""The score heatmap as QuPath tile detections, read back by real QuPath (PathIO.readObjects)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zeus_qupath.cli import main
from zeus_qupath.heatmap import measurement_name, tile_collection, write_tiles
from zeus_qupath.outputs import TILES_SUFFIX, PatchScores

from qupath.fixtures import qupath_or_skip
from qupath.harness import VERSIONS


def contour_patch_scores(seed: int = 3) -> PatchScores:
    """Two per-contour lattices (anchors off the origin, as CLAM/ZEUS patch), 3 classes, patches past the edge."""
    rng = np.random.default_rng(seed)
    coords = []
    for ax, ay, nx, ny in ((37, 21, 6, 4), (1290, 610, 3, 2)):
        gx, gy = np.meshgrid(ax + 112 * np.arange(nx), ay + 112 * np.arange(ny))
        coords.append(np.stack([gx.ravel(), gy.ravel()], axis=1))
    xy = np.concatenate(coords).astype(np.int64)
    values = rng.normal(0, 0.1, (len(xy), 3)).astype(np.float32)
    return PatchScores(xy, values, ("normal", "tumor", "stroma"), "tumor", 448, 112, 1700, 1000, 0.5)


def expected_box(scores: PatchScores, i: int) -> tuple[float, float, float, float]:
    """The stride cell centred on patch i's centre, clipped to the slide (written independently of heatmap.py)."""
    x, y = scores.coords[i]
    cx, cy = x + scores.patch_size / 2, y + scores.patch_size / 2
    h = scores.stride / 2
    return (max(cx - h, 0), max(cy - h, 0), min(cx + h, scores.width), min(cy + h, scores.height))


def test_tiles_are_stride_cells_with_the_scores():
    scores = contour_patch_scores()
    features = tile_collection(scores)["features"]
    assert len(features) == len(scores.coords)  # every cell here lies at least partly in the slide
    names = ["ZEUS score: Normal", "ZEUS score: Tumor", "ZEUS score: Stroma"]
    assert [measurement_name(c) for c in scores.classes] == names
    for i, f in enumerate(features):
        assert f["properties"]["objectType"] == "tile" and "classification" not in f["properties"]
        ring = np.array(f["geometry"]["coordinates"][0])
        x0, y0, x1, y1 = expected_box(scores, i)
        assert ring.min(axis=0).tolist() == [x0, y0] and ring.max(axis=0).tolist() == [x1, y1]
        meas = f["properties"]["measurements"]
        assert [np.float32(meas[n]) for n in names] == scores.scores[i].tolist()
    assert any(expected_box(scores, i)[2] == scores.width for i in range(len(features)))  # one clipped at the edge
    # first lattice: stride cells of one lattice tile the plane (touching, never overlapping)
    a, b = np.array(features[0]["geometry"]["coordinates"][0]), np.array(features[1]["geometry"]["coordinates"][0])
    assert a.max(axis=0)[0] == b.min(axis=0)[0] == 37 + 224 + 56


def test_cells_outside_the_slide_get_no_tile():
    scores = PatchScores(np.array([[0, 0], [990, 0]]), np.array([[0.1, 0.2], [0.3, 0.4]], np.float32),
                         ("normal", "tumor"), "tumor", 448, 112, 1000, 500, None)
    features = tile_collection(scores)["features"]
    assert len(features) == 1  # the second patch's centre cell starts at x 1158, beyond the 1000-px slide


@pytest.fixture(scope="module", params=VERSIONS)
def qupath(request, tmp_path_factory):
    return qupath_or_skip(request.param, tmp_path_factory)


@pytest.mark.jvm
def test_real_qupath_reads_tiles_with_their_scores(qupath, tmp_path):
    scores = contour_patch_scores()
    path = tmp_path / f"slide{TILES_SUFFIX}"
    assert write_tiles(path, scores) == len(scores.coords)
    objects = qupath.read_geojson(path)
    assert len(objects) == len(scores.coords)
    names = [measurement_name(c) for c in scores.classes]
    for i, obj in enumerate(objects):  # PathIO keeps the file's order
        assert obj.object_type == "tile"  # PathTileObject: a detection, shown by Measure > Show measurement maps
        assert obj.class_name is None
        x0, y0, x1, y1 = obj.geometry.bounds
        assert obj.geometry.area == (x1 - x0) * (y1 - y0)  # an axis-aligned rectangle
        assert (x0, y0, x1, y1) == expected_box(scores, i)
        assert x1 - x0 == y1 - y0 == 112 or x0 == 0 or y0 == 0 or x1 == scores.width or y1 == scores.height
        # QuPath stores measurements as float32: exactly the scores file's values
        assert [np.float32(obj.measurements[n]) for n in names] == scores.scores[i].tolist()


@pytest.mark.jvm
def test_polygons_tiles_option_on_a_scores_file(qupath, tmp_path, capsys):
    scores = contour_patch_scores(seed=4)
    scores.save(tmp_path / "s.scores.npz")
    assert main(["polygons", str(tmp_path / "s.scores.npz"), "--tiles", "--out", str(tmp_path / "s.geojson")]) == 0
    tiles = tmp_path / "s.tiles.geojson"
    assert f"{len(scores.coords)} tiles -> {tiles}" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.geojson").read_text())["type"] == "FeatureCollection"
    back = PatchScores.load(tmp_path / "s.scores.npz")
    objects = qupath.read_geojson(tiles)
    values = np.array([[o.measurements[measurement_name(c)] for c in back.classes] for o in objects], np.float32)
    np.testing.assert_array_equal(values, back.scores)
    assert main(["polygons", str(tmp_path / "s.scores.npz"), "--out", str(tmp_path / "t.geojson")]) == 0
    assert not (tmp_path / "t.tiles.geojson").exists()  # off by default


@pytest.mark.slow
def test_segment_tiles_end_to_end(tmp_path, tiny_model, tmp_path_factory):
    """zeus segment --tiles on a real slide (default: CLAM/ZEUS per-contour patches); QuPath 0.6.0 reads the tiles."""
    from conftest import shared_file

    slide = shared_file("wsi", "CMU-1-Small-Region.svs")
    out = tmp_path / "out"
    assert main(["segment", str(slide), "--model", f"open_clip:{tiny_model.config_path}", "--pretrained",
                 str(tiny_model.checkpoint_path), "--device", "cpu", "--quiet", "--tiles", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["prompts"]["file"].endswith("zeus_spindle_cell.json")  # no --prompts: ZEUS's own prompt file
    assert run["models"][0]["precision"]["computes"] == "fp32"
    tiles = out / f"CMU-1-Small-Region{TILES_SUFFIX}"
    assert run["slides"][0]["outputs"]["tiles"] == str(tiles)
    scores = PatchScores.load(out / "CMU-1-Small-Region.scores.npz")
    assert len(scores.coords) > 0
    objects = qupath_or_skip("0.6.0", tmp_path_factory).read_geojson(tiles)
    assert {o.object_type for o in objects} == {"tile"}
    boxes = [expected_box(scores, i) for i in range(len(scores.coords))]
    expected = {tuple(np.round(b, 2)): scores.scores[i].tolist() for i, b in enumerate(boxes)
                if b[2] > b[0] and b[3] > b[1]}
    got = {tuple(np.round(o.geometry.bounds, 2)): [np.float32(o.measurements[measurement_name(c)])
                                                   for c in scores.classes] for o in objects}
    assert got == expected
