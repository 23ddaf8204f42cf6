"""The overlay PNG: heat map colours, where they are drawn, outlines, against a direct computation."""

from __future__ import annotations

import numpy as np
from PIL import Image
from shapely.geometry import box

from zeus_qupath.outputs import PatchScores
from zeus_qupath.overlay import NEGATIVE_RGB, POSITIVE_RGB, render_overlay, write_png


def test_overlay_colours_coverage_and_outlines(tmp_path):
    # a 4000 x 2000 slide, thumbnail 400 x 200 (10 level-0 px per thumbnail px); two patches that do not overlap:
    # left one strongly tumor (margin +0.2), right one mildly normal (margin -0.1); nothing covers x >= 3000
    scores = PatchScores(np.array([[0, 0], [1000, 0]]), np.array([[0.1, 0.3], [0.25, 0.15]], np.float32),
                         ("normal", "tumor"), "tumor", 1000, 1000, 4000, 2000, 0.5)
    thumb = np.full((200, 400, 3), 200, np.uint8)
    thumb[:, :, 1] = np.arange(400, dtype=np.uint8)[None, :] // 2  # some texture to blend with
    out = render_overlay(thumb, scores, [box(2500, 1200, 3500, 1800)], alpha=0.45)

    def expected(margin_over_max: float, px: np.ndarray) -> np.ndarray:
        t = (margin_over_max + 1) / 2
        heat = t * np.array(POSITIVE_RGB) + (1 - t) * np.array(NEGATIVE_RGB)
        return 0.55 * px.astype(float) + 0.45 * heat

    # inside each patch (away from its edges): the blend of the thumbnail with the margin's colour
    np.testing.assert_allclose(out[10:90, 10:90], expected(1.0, thumb[10:90, 10:90]), atol=1.01)
    np.testing.assert_allclose(out[10:90, 110:190], expected(-0.5, thumb[10:90, 110:190]), atol=1.01)
    # not covered by any patch: the thumbnail as it was (where no outline is drawn)
    assert np.array_equal(out[110:190, 10:240], thumb[110:190, 10:240])
    assert np.array_equal(out[10:110, 310:390], thumb[10:110, 310:390])
    # the outline of the box (level-0 2500..3500 x 1200..1800 -> thumbnail 250..350 x 120..180) in black
    assert (out[150, 248:253] == 0).all(axis=-1).any() and (out[120, 300] == 0).all()
    assert not (out[150, 300] == 0).all()  # inside the outline: not filled

    write_png(tmp_path / "o.png", out)
    with Image.open(tmp_path / "o.png") as im:
        assert np.array_equal(np.asarray(im), out)  # lossless


def test_overlay_has_a_legend_naming_the_positive_class_colours():
    from zeus_qupath.overlay import draw_legend

    scores = PatchScores(np.array([[0, 0]]), np.array([[0.1, 0.3]], np.float32), ("normal", "tumor"), "tumor",
                         1000, 1000, 20000, 10000, 0.5)
    thumb = np.full((1000, 2000, 3), 200, np.uint8)
    out = render_overlay(thumb, scores, [])
    x0, y0, x1, y1 = draw_legend(thumb.copy(), "tumor")
    assert x1 > 1000 and y1 > 750  # the bottom-right corner, away from the slide's covered top-left
    legend = out[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3)
    colours = {tuple(int(v) for v in c) for c in legend}
    assert tuple(POSITIVE_RGB) in colours and tuple(NEGATIVE_RGB) in colours  # both ends of the ramp
    assert (255, 255, 255) in colours and (0, 0, 0) in colours  # white box, black text and outline sample
    assert draw_legend(np.full((200, 400, 3), 200, np.uint8), "tumor") is None  # too small: none drawn
