"""The ``EXPORT_TILES`` path of ``export_training_data.groovy`` (QuPath's own ``TileExporter``) on real QuPath.

A project with a ZEUS annotation and two drawn ones (another class, overlapping; a second slide region) is
imported and exported with tiles (``TILE_DOWNSAMPLE`` 4, 64 px tiles, PNG) through *Run for project*, the slide
served by the test-only image server (a STAND-IN for Bio-Formats). Independent references: image tiles against
the slide's own pixels (tiffslide, box-downsampled), label tiles against ``zeus export``'s label rule
(``export_corrections`` at the same downsample), cropped at the region each tile's name gives.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import Polygon

from zeus_qupath.bridge.export import export_corrections
from zeus_qupath.bridge.project_files import FilesProject
from zeus_qupath.qupath_geojson import QuPathObject, annotation_feature

from conftest import shared_file
from qupath.fixtures import only_boundary_differences, qupath_or_skip
from qupath.harness import QuPath, route_images_to_test_server

pytestmark = [pytest.mark.jvm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
EXPORT_SCRIPT = ROOT / "groovy" / "export_training_data.groovy"
IMPORT_SCRIPT = ROOT / "groovy" / "import_zeus_annotations.groovy"
DOWNSAMPLE, TILE = 4.0, 64
TILE_NAME = re.compile(r"\[d=([0-9.]+),x=(\d+),y=(\d+),w=(\d+),h=(\d+)\](-labelled)?\.png$")


@pytest.fixture(scope="module", params=("0.4.4", "0.7.0"))  # TileExporter is the same code from 0.4 to 0.7
def qupath(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> QuPath:
    return qupath_or_skip(request.param, tmp_path_factory)



def _tiles_script(tmp_path: Path) -> Path:
    text = EXPORT_SCRIPT.read_text(encoding="utf-8")
    for name, value in (("boolean EXPORT_TILES", "true"), ("int TILE_SIZE", str(TILE)),
                        ("double TILE_DOWNSAMPLE", str(DOWNSAMPLE)), ("String TILE_EXTENSION", "'.png'"),
                        ("double DOWNSAMPLE", str(DOWNSAMPLE))):
        text, n = re.subn(rf"^{re.escape(name)} = .*$", f"{name} = {value}", text, count=1, flags=re.M)
        assert n == 1, name
    path = tmp_path / "export_training_data.groovy"
    path.write_text(text, encoding="utf-8")
    return path


def test_tile_export_agrees_with_the_slide_and_zeus_exports_labels(qupath: QuPath, tmp_path: Path) -> None:
    import tiffslide

    slide = shared_file("wsi", "OS-1-detail.ome.tif")
    width = height = 1101
    tumor = Polygon([(100, 100), (700, 150), (650, 800), (120, 700)])
    project = tmp_path / "project"
    with FilesProject(project) as proj:
        proj.add_or_update_image(slide, [annotation_feature(QuPathObject(tumor, class_name="Tumor"))], width=width,
                                 height=height, mpp=0.2271, levels=[(width, height)])
    route_images_to_test_server(project)
    assert not [r for r in qupath.run_for_project(project, IMPORT_SCRIPT) if r.error]
    qupath.edit(project, [
        {"image": slide.name, "op": "draw", "wkt": "POLYGON ((600 600, 1000 620, 980 1000, 620 980, 600 600))",
         "class": "Stroma"},
        {"image": slide.name, "op": "draw", "wkt": "POLYGON ((900 60, 1060 60, 1060 220, 900 220, 900 60))",
         "class": "Necrosis"},
    ])
    runs = qupath.run_for_project(project, _tiles_script(tmp_path), save=False)
    text = "\n".join(r.output for r in runs)
    assert not [r for r in runs if r.error] and "tiles not" not in text, text

    tiles_dir = project / "export" / "tiles" / slide.name.replace(" ", "_")
    if not tiles_dir.is_dir():  # the script's safe folder name
        (tiles_dir,) = (project / "export" / "tiles").iterdir()
    names = sorted(p.name for p in tiles_dir.iterdir())
    images = [n for n in names if TILE_NAME.search(n) and not TILE_NAME.search(n).group(6)]
    labels = [n for n in names if TILE_NAME.search(n) and TILE_NAME.search(n).group(6)]
    assert images and len(labels) == len(images), names
    assert {n.replace("-labelled", "") for n in labels} == set(images)

    report = export_corrections(project, tmp_path / "py", backend="files", downsample=DOWNSAMPLE)
    (ours,) = [np.array(Image.open(s.mask)) for s in report.slides]  # zeus export's label mask of the slide
    with tiffslide.TiffSlide(slide) as ts:
        full = ts.read_region((0, 0), 0, (width, height)).convert("RGB")
    covered = np.zeros(ours.shape, dtype=bool)
    mismatched = labelled = 0
    for name in images:
        d, x, y, w, h = (float(v) for v in TILE_NAME.search(name).groups()[:5])
        assert d == DOWNSAMPLE
        c0, r0 = round(x / d), round(y / d)
        # the image tile: the slide's own pixels in that region (decoders and resampling differ slightly)
        tile = np.asarray(Image.open(tiles_dir / name).convert("RGB"), dtype=np.int16)
        want = full.crop((int(x), int(y), int(x + w), int(y + h))).resize((tile.shape[1], tile.shape[0]), Image.BOX)
        diff = np.abs(tile - np.asarray(want, dtype=np.int16))
        assert diff.mean() < 6.0, (name, diff.mean())
        # the label tile: zeus export's labels there (QuPath's rasteriser may differ on outline pixels)
        label = np.array(Image.open(tiles_dir / name.replace(".png", "-labelled.png")))
        region = ours[r0:r0 + label.shape[0], c0:c0 + label.shape[1]]
        label = label[:region.shape[0], :region.shape[1]]
        assert set(np.unique(label)) <= set(report.labels.values())
        assert only_boundary_differences(label, region), name
        mismatched += int((label != region).sum())
        labelled += int((region > 0).sum())
        covered[r0:r0 + region.shape[0], c0:c0 + region.shape[1]] = True
    assert labelled > 0 and mismatched <= 0.05 * labelled, (mismatched, labelled)
    # annotatedTilesOnly: every labelled pixel of zeus export's mask lies in some exported tile, within the grid of
    # whole tiles (TileExporter leaves out the partial tiles at the right and bottom edges by default)
    grid = int(width // (TILE * DOWNSAMPLE) * TILE), int(height // (TILE * DOWNSAMPLE) * TILE)
    inside = np.zeros(ours.shape, dtype=bool)
    inside[:grid[1], :grid[0]] = True
    missed = np.argwhere((ours > 0) & ~covered & inside)
    assert len(missed) == 0, (len(missed), missed[:5].tolist(), missed[-5:].tolist(), ours.shape, images)
