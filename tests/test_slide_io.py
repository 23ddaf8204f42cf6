"""Slides, tissue, the patch grid and the region reader, on real and generated files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from zeus_qupath.errors import SlideError, ZeusError
from zeus_qupath.grid import PatchGeometry, make_grid
from zeus_qupath.outputs import PatchScores
from zeus_qupath.reader import RegionReader
from zeus_qupath.slide import Slide
from zeus_qupath.tissue import detect_tissue, segment_tissue

from conftest import shared_file


def test_real_svs_and_ome_tiff_metadata():
    with Slide(shared_file("wsi", "CMU-1-Small-Region.svs")) as s:
        assert s.dimensions == (2220, 2967) and s.mpp == pytest.approx(0.499)
        region = s.read_region(2100, 2900, 200, 100)
        assert region.shape == (100, 200, 3) and region.dtype == np.uint8
        assert (region[:, 120:] == 255).all() and (region[67:] == 255).all()  # outside the image: white
    with Slide(shared_file("wsi", "OS-1-detail.ome.tif")) as s:
        assert s.dimensions == (1101, 1101) and s.mpp == pytest.approx(0.2271, abs=1e-4)
    with Slide(shared_file("wsi", "OS-1-detail.ome.tif"), mpp=0.5) as s:
        assert s.mpp == 0.5


def test_plain_images_rgba_and_grey(tmp_path):
    rgba = np.zeros((50, 60, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :30, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    with Slide(tmp_path / "a.png") as s:
        px = s.read_region(0, 0, 60, 50)
        assert s.mpp is None and s.dimensions == (60, 50)
        assert tuple(px[10, 10]) == (200, 0, 0) and tuple(px[10, 50]) == (255, 255, 255)
    Image.fromarray(np.full((40, 30), 77, np.uint8)).save(tmp_path / "g.jpg")
    with Slide(tmp_path / "g.jpg") as s:
        assert s.read_region(0, 0, 30, 40).shape == (40, 30, 3)
    tifffile.imwrite(tmp_path / "plain.tif", np.full((64, 48, 3), 9, np.uint8))
    with Slide(tmp_path / "plain.tif") as s:
        assert s.dimensions == (48, 64) and int(s.read_region(0, 0, 48, 64).max()) == 9


def test_bad_slides_give_one_line_errors(tmp_path):
    with pytest.raises(SlideError, match="not found"):
        Slide(tmp_path / "missing.svs")
    (tmp_path / "junk.svs").write_bytes(b"not a tiff at all")
    with pytest.raises(SlideError, match="cannot open"):
        Slide(tmp_path / "junk.svs")
    data = shared_file("wsi", "CMU-1-Small-Region.svs").read_bytes()
    (tmp_path / "cut.svs").write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError) as info:
        with Slide(tmp_path / "cut.svs") as s:
            s.read_region(0, 0, *s.dimensions)
    assert "\n" not in str(info.value)


def test_tissue_detection_real_and_blank(tmp_path):
    with Slide(shared_file("wsi", "CMU-1-Small-Region.svs")) as s:
        t = detect_tissue(s)
    assert 0.2 < t.fraction < 0.9
    assert t.mask.shape[1] * t.downsample == pytest.approx(2220, rel=1e-3)
    rng = np.random.default_rng(0)
    blank = np.clip(rng.normal(245, 3, (300, 300, 3)), 0, 255).astype(np.uint8)
    assert not segment_tissue(blank).any()


def test_grid_covers_image_and_keeps_tissue_patches():
    from zeus_qupath.tissue import TissueMask

    tissue = np.zeros((100, 100), bool)
    tissue[10:20, 10:20] = True  # level-0 px 100..200 at downsample 10
    grid = make_grid(1000, 1000, PatchGeometry(448, 112), TissueMask(tissue, 10.0))
    assert (grid.rows, grid.cols) == (6, 6)
    assert (grid.cols - 1) * 112 + 448 >= 1000
    x, y = grid.coords[:, 0], grid.coords[:, 1]
    assert ((x < 200) & (x + 448 > 100) & (y < 200) & (y + 448 > 100)).all()
    assert len(grid) == 4  # columns/rows 0 and 1 (x 0 and 112) touch [100, 200)
    with pytest.raises(ZeusError):
        make_grid(1000, 1000, PatchGeometry(100, 200), None)


def test_reader_patches_equal_per_patch_reads():
    path = shared_file("wsi", "CMU-1-Small-Region.svs")
    with Slide(path) as s:
        tissue = detect_tissue(s)
        grid = make_grid(*s.dimensions, PatchGeometry(448, 112), tissue)
        seen = np.zeros(len(grid), bool)
        reader = RegionReader(str(path), grid, batch_size=48, block_cells=5, workers=2)
        for batch in reader:
            assert batch.pixels.shape[1:] == (448, 448, 3) and len(batch.indices) <= 48
            for i, px in zip(batch.indices[::7], batch.pixels[::7], strict=True):
                x, y = grid.coords[i]
                assert np.array_equal(px, s.read_region(int(x), int(y), 448, 448))
            seen[batch.indices] = True
    assert seen.all()


def test_reader_at_target_mpp():
    path = shared_file("wsi", "CMU-1-Small-Region.svs")
    geo = PatchGeometry(224, 56, scale=2.0)  # 224 px at 1 um/px from a 0.5 um/px slide
    with Slide(path) as s:
        grid = make_grid(*s.dimensions, geo, detect_tissue(s))
        batch = next(iter(RegionReader(str(path), grid, batch_size=8)))
        x, y = grid.coords[batch.indices[0]]
        direct = s.read_region(int(x), int(y), 448, 448)
    assert batch.pixels.shape == (8, 224, 224, 3)
    shrunk = direct.reshape(224, 2, 224, 2, 3).mean(axis=(1, 3))
    assert np.abs(shrunk - batch.pixels[0].astype(float)).mean() < 3


def test_scores_file_roundtrip_and_errors(tmp_path):
    s = PatchScores(np.array([[0, 0], [112, 224]]), np.array([[0.1, 0.2], [0.3, -0.1]], np.float32),
                    ("normal", "tumor"), "tumor", 448, 112, 1000, 800, None, {"model": "m"})
    s.save(tmp_path / "a.scores.npz")
    back = PatchScores.load(tmp_path / "a.scores.npz")
    assert back.classes == s.classes and back.mpp is None and back.meta == {"model": "m"}
    assert np.array_equal(back.coords, s.coords) and back.scores.dtype == np.float32
    with np.load(tmp_path / "a.scores.npz") as z:
        assert z["coords"].dtype == np.int64 and np.isnan(z["mpp"]) and str(z["positive_class"]) == "tumor"
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ZeusError, match="bad.npz"):
        PatchScores.load(tmp_path / "bad.npz")
    # any grid (CLAM/ZEUS per-contour lattices): coords off the stride are kept, negative ones refused
    assert PatchScores(np.array([[5, 0]]), np.zeros((1, 2), np.float32), ("a", "b"), "b", 448, 112, 10, 10,
                       None).coords.tolist() == [[5, 0]]
    with pytest.raises(ZeusError, match="non-negative"):
        PatchScores(np.array([[-5, 0]]), np.zeros((1, 2), np.float32), ("a", "b"), "b", 448, 112, 10, 10, None)
