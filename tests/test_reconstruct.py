"""The reconstruction against a straightforward full-resolution transcription of ZEUS's rule.

ZEUS's ``inference/process_embeddings.py`` (``mask_from_predictions`` + ``generate_and_save_masks``):
per class, a level-0 float map where every patch adds its score to the pixels it covers (clipped at
the image edge); argmax over the class maps (``np.argmax``: ties go to the first class, its "normal");
``cv2.GaussianBlur`` with kernel 2 * patch + 1 and sigma 0; keep pixels above 10 %. The transcription
below (:func:`zeus_reference`) puts the positive class last so that ``np.argmax`` gives ties to the
others, and blurs the 0/1 map in float32 (ZEUS blurs 0/255 in uint8, which rounds).
"""

from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest
from scipy import ndimage

from zeus_qupath import reconstruct
from zeus_qupath.errors import ZeusError
from zeus_qupath.grid import grid_shape
from zeus_qupath.outputs import PatchScores
from zeus_qupath.reconstruct import (
    Threshold,
    band_sums,
    mask_to_level0,
    patch_cells,
    positive_argmax,
    reflect101,
    sample_centres,
    zeus_mask,
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2 * np.logical_and(a, b).sum() / s


def class_maps(scores: PatchScores) -> tuple[np.ndarray, np.ndarray]:
    """ZEUS's ``mask_from_predictions`` for every class (float32), and where any patch lies."""
    h, w, p = scores.height, scores.width, scores.patch_size
    maps = np.zeros((scores.scores.shape[1], h, w), dtype=np.float32)
    covered = np.zeros((h, w), dtype=bool)
    for (x, y), s in zip(scores.coords, scores.scores, strict=True):
        x_end, y_end = min(x + p, w), min(y + p, h)
        maps[:, y:y_end, x:x_end] += s[:, None, None]
        covered[y:y_end, x:x_end] = True
    return maps, covered


def zeus_reference(scores: PatchScores) -> np.ndarray:
    maps, _ = class_maps(scores)
    pos = scores.positive_index
    order = [i for i in range(len(scores.classes)) if i != pos] + [pos]
    pred = (np.argmax(maps[order], axis=0) == len(order) - 1).astype(np.float32)
    k = 2 * scores.patch_size + 1
    return cv2.GaussianBlur(pred, (k, k), 0) > 0.1


def lattice_scores(width, height, patch, stride, *, seed, keep=0.7, smooth=0.0, n_cls=2, positive=1,
                   bias=0.0) -> PatchScores:
    """One lattice from (0, 0), a random blob of it kept (partial tissue), a random (smoothed) score field."""
    rng = np.random.default_rng(seed)
    rows, cols = grid_shape(width, height, patch, stride)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    index = np.stack([r.ravel(), c.ravel()], axis=1)
    if keep < 1:
        blob = ndimage.gaussian_filter(rng.normal(size=(rows, cols)), 2)
        blob = blob >= np.quantile(blob, 1 - keep)
        index = index[blob[index[:, 0], index[:, 1]]]
    field = rng.normal(size=(rows, cols, n_cls))
    if smooth:
        field = ndimage.gaussian_filter(field, (smooth, smooth, 0))
    field[..., positive] += bias
    values = field[index[:, 0], index[:, 1]] + rng.normal(0, 0.3, (len(index), n_cls))
    return PatchScores(
        coords=index[:, ::-1] * stride, scores=values.astype(np.float32),
        classes=tuple(f"c{i}" for i in range(n_cls)), positive_class=f"c{positive}",
        patch_size=patch, stride=stride, width=width, height=height, mpp=0.5,
    )


def contour_scores(width, height, patch, stride, *, seed, n_contours=4, keep=0.75, n_cls=3, positive=1,
                   bias=-0.2) -> PatchScores:
    """CLAM/ZEUS-like patches: one lattice per tissue contour, anchored at the contour's bounding box.

    Each contour is a random box (they may overlap one another), its lattice starts at the box's
    top-left (any integer, not a multiple of the stride), a random blob of its patches is kept, and
    the scores follow a smooth field over the slide (so that neighbouring contours agree roughly).
    """
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(height // 50 + 1, width // 50 + 1, n_cls)), (3, 3, 0))
    field[..., positive] += bias * field.std()
    coords = []
    for _ in range(n_contours):
        x0, y0 = int(rng.integers(0, width - patch)), int(rng.integers(0, height - patch))
        bw, bh = int(rng.integers(patch, width - x0 + 1)), int(rng.integers(patch, height - y0 + 1))
        xs = x0 + np.arange(0, bw, stride)
        ys = y0 + np.arange(0, bh, stride)
        gx, gy = np.meshgrid(xs, ys)
        blob = ndimage.gaussian_filter(rng.normal(size=gx.shape), 1.5)
        kept = blob >= np.quantile(blob, 1 - keep)
        coords.append(np.stack([gx[kept], gy[kept]], axis=1))
    xy = np.unique(np.concatenate(coords), axis=0).astype(np.int64)
    xy = xy[(xy[:, 0] < width) & (xy[:, 1] < height)]
    centre = np.minimum((xy + patch // 2) // 50, [field.shape[1] - 1, field.shape[0] - 1])
    values = field[centre[:, 1], centre[:, 0]] / field.std() + rng.normal(0, 0.5, (len(xy), n_cls))
    return PatchScores(coords=xy, scores=values.astype(np.float32), classes=tuple(f"c{i}" for i in range(n_cls)),
                       positive_class=f"c{positive}", patch_size=patch, stride=stride, width=width, height=height,
                       mpp=0.5)


# ----------------------------------------------------------------------------------------- any grid


@pytest.mark.parametrize(
    "width,height,patch,stride,n_contours,seed",
    [
        (1500, 1100, 448, 112, 4, 10),  # ZEUS's geometry, four overlapping contour lattices
        (1300, 900, 200, 120, 5, 11),  # patch not a multiple of the stride
        (1000, 1400, 300, 112, 6, 12),  # patch not a multiple of the stride, portrait
        (1600, 1200, 256, 256, 5, 18),  # CLAM's default step: no overlap within a lattice
    ],
)
def test_any_grid_matches_zeus_rule_at_full_resolution(width, height, patch, stride, n_contours, seed):
    scores = contour_scores(width, height, patch, stride, seed=seed, n_contours=n_contours)
    assert np.any(scores.coords % stride)  # really off the (0, 0) lattice
    reference = zeus_reference(scores)
    assert 0.05 < reference.mean() < 0.95, reference.mean()  # a non-trivial mask
    exact = zeus_mask(scores)  # small slide: sampled at every pixel
    assert exact.pixel_size == 1 and exact.mask.shape == reference.shape == (height, width)
    assert dice(exact.mask, reference) >= 0.9999
    # as on a large slide: every 3rd pixel, exact at each sampled pixel
    sampled = zeus_mask(scores, max_pixels=width * height // 9 + 1)
    assert sampled.pixel_size == 3
    ys, xs = sample_centres(height, 3), sample_centres(width, 3)
    assert dice(sampled.mask, reference[np.ix_(ys, xs)]) >= 0.9999
    assert dice(mask_to_level0(sampled), reference) >= 0.99


def test_bands_give_the_same_mask(monkeypatch):
    scores = contour_scores(1200, 1000, 448, 112, seed=14)
    whole = zeus_mask(scores)
    monkeypatch.setattr(reconstruct, "BLOCK_SAMPLES", 20_000)  # ~17 sample rows per band: many bands
    banded = zeus_mask(scores)
    assert np.array_equal(whole.mask, banded.mask)
    for rule in ("argmax", "prob:0.4"):
        monkeypatch.setattr(reconstruct, "BLOCK_SAMPLES", 2_000_000)
        one = zeus_mask(scores, threshold=Threshold.parse(rule), logit_scale=10)
        monkeypatch.setattr(reconstruct, "BLOCK_SAMPLES", 20_000)
        assert np.array_equal(one.mask, zeus_mask(scores, threshold=Threshold.parse(rule), logit_scale=10).mask)


def test_argmax_and_prob_rules_exact_per_pixel_on_any_grid():
    scores = contour_scores(1300, 1000, 300, 112, seed=15)
    maps, covered = class_maps(scores)
    pos = scores.positive_index
    others = np.delete(maps, pos, axis=0).max(axis=0)
    expected = (maps[pos] > others) & covered
    assert np.array_equal(mask_to_level0(zeus_mask(scores, threshold=Threshold("argmax"))), expected)
    # prob:P: softmax per patch (logit scale 10), mean over the covering patches, positive above P
    z = 10 * scores.scores.astype(np.float64)
    prob = np.exp(z - z.max(axis=1, keepdims=True))
    prob = prob[:, pos] / prob.sum(axis=1)
    total = np.zeros((scores.height, scores.width))
    count = np.zeros((scores.height, scores.width))
    p = scores.patch_size
    for (x, y), v in zip(scores.coords, prob, strict=True):
        total[y : y + p, x : x + p] += v
        count[y : y + p, x : x + p] += 1
    expected = np.divide(total, count, out=np.zeros_like(total), where=count > 0) > 0.4
    got = mask_to_level0(zeus_mask(scores, threshold=Threshold.parse("prob:0.4"), logit_scale=10))
    assert np.array_equal(got, expected)


def test_cells_are_the_distinct_patch_edges():
    scores = PatchScores(np.array([[0, 0], [112, 30], [500, 7]]), np.array([[1, 2], [3, 5], [0, 1]], np.float32),
                         ("a", "b"), "b", 448, 112, 700, 600, None)
    cells = patch_cells(scores)
    assert cells.x_edges.tolist() == [0, 112, 448, 500, 560, 700]  # 500 + 448 is clipped to the width
    assert cells.y_edges.tolist() == [0, 7, 30, 448, 455, 478, 600]
    sums, counts = band_sums(cells, scores.scores, 0, cells.shape[0])
    # y 30..448 lies in all three patches: x 0..448 (first), 112..560 (second), 500..700 (third)
    assert counts[2].tolist() == [1, 2, 1, 2, 1]
    assert sums[2, 1].tolist() == [4.0, 7.0] and sums[2, 3].tolist() == [3.0, 6.0]
    assert counts[5].tolist() == [0] * 5  # y 478..600 is below every patch


def test_memory_follows_the_patches_not_the_slide():
    # a 100k x 80k slide (8e9 level-0 px) with 12 contour lattices: peak memory far below one level-0 map
    rng = np.random.default_rng(16)
    coords = []
    for _ in range(12):
        x0, y0 = rng.integers(0, 80_000), rng.integers(0, 60_000)
        gx, gy = np.meshgrid(x0 + np.arange(0, 15_000, 112), y0 + np.arange(0, 15_000, 112))
        coords.append(np.stack([gx.ravel(), gy.ravel()], axis=1))
    xy = np.unique(np.concatenate(coords), axis=0)
    xy = xy[(xy[:, 0] < 100_000) & (xy[:, 1] < 80_000)]
    values = rng.normal(size=(len(xy), 3)).astype(np.float32)
    scores = PatchScores(xy, values, ("a", "b", "c"), "b", 448, 112, 100_000, 80_000, 0.5)
    tracemalloc.start()
    mask = zeus_mask(scores)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert mask.mask.size <= 33_000_000 and mask.pixel_size >= 14 and mask.mask.any()
    assert peak < 600e6, f"{peak / 1e6:.0f} MB"  # one float32 level-0 map would be 32,000 MB
    cells = patch_cells(scores)
    assert cells.shape[0] <= 2 * len(xy) + 1 and cells.shape[1] <= 2 * len(xy) + 1


# --------------------------------------------------------------------------- one lattice from (0, 0)


@pytest.mark.parametrize(
    "width,height,patch,stride,keep,smooth,bias,seed",
    [
        (1500, 1100, 448, 112, 0.7, 0.0, -0.5, 0),  # raw noise: the hardest case
        (2000, 1337, 448, 112, 1.0, 2.0, -0.3, 1),  # smooth field, odd height
        (1111, 2222, 448, 112, 0.5, 1.0, -0.3, 2),  # portrait, sparse tissue
        (1024, 768, 224, 56, 0.8, 1.5, -0.5, 3),
        (900, 700, 200, 120, 0.9, 1.0, -0.3, 4),  # patch not a multiple of the stride
    ],
)
def test_lattice_matches_full_resolution(width, height, patch, stride, keep, smooth, bias, seed):
    scores = lattice_scores(width, height, patch, stride, seed=seed, keep=keep, smooth=smooth, bias=bias)
    reference = zeus_reference(scores)
    assert 0.05 < reference.mean() < 0.95
    exact = zeus_mask(scores)
    assert exact.pixel_size == 1 and dice(exact.mask, reference) >= 0.9999
    sampled = zeus_mask(scores, max_pixels=width * height // 9 + 1)
    assert sampled.pixel_size == 3 and dice(mask_to_level0(sampled), reference) >= 0.99


def test_three_classes_and_ties_go_negative():
    scores = lattice_scores(1200, 900, 448, 112, seed=5, n_cls=3, positive=0, smooth=1.0)
    assert dice(zeus_mask(scores).mask, zeus_reference(scores)) >= 0.9999
    tie = np.array([[[1.0, 1.0], [2.0, 1.0], [0.0, 0.0]]])
    assert positive_argmax(tie, 0).tolist() == [[False, True, False]]


def test_prob_rule_monotonic_in_threshold():
    scores = lattice_scores(2400, 1800, 448, 112, seed=7, keep=1.0)
    low = zeus_mask(scores, threshold=Threshold.parse("prob:0.3"), logit_scale=10).mask
    high = zeus_mask(scores, threshold=Threshold.parse("prob:0.7"), logit_scale=10).mask
    assert high.sum() < low.sum() and not (high & ~low).any()


def test_no_patches_gives_an_empty_mask():
    scores = PatchScores(np.zeros((0, 2), np.int64), np.zeros((0, 2), np.float32), ("n", "t"), "t", 448, 112,
                         900, 700, None)
    for rule in ("zeus", "argmax", "prob:0.5"):
        assert not zeus_mask(scores, threshold=Threshold.parse(rule)).mask.any()


def test_threshold_parse():
    assert str(Threshold.parse("ZEUS")) == "zeus"
    assert Threshold.parse("prob:0.25").value == 0.25
    for bad in ("prob:1.5", "prob:x", "median"):
        with pytest.raises(ZeusError):
            Threshold.parse(bad)


def test_opencv_border():
    # OpenCV's BORDER_REFLECT_101, also where the kernel is wider than the image (reflected again)
    px = np.arange(-12, 17)
    expected = [cv2.borderInterpolate(int(p), 5, cv2.BORDER_REFLECT_101) for p in px]
    assert reflect101(px, 5).tolist() == expected
