"""The grid reconstruction against a straightforward full-resolution ZEUS rule."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from zeus_qupath.errors import ZeusError
from zeus_qupath.grid import grid_shape
from zeus_qupath.reconstruct import (
    Threshold,
    cell_sums,
    mask_to_level0,
    opencv_sigma,
    positive_argmax,
    zeus_mask,
    zeus_mask_fullres,
)
from zeus_qupath.scores import PatchScores


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2 * np.logical_and(a, b).sum() / s


def random_scores(
    width, height, patch, stride, *, seed, keep=0.7, smooth=0.0, n_cls=2, positive=1, bias=0.0
) -> PatchScores:
    rng = np.random.default_rng(seed)
    rows, cols = grid_shape(width, height, patch, stride)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    index = np.stack([r.ravel(), c.ravel()], axis=1)
    if keep < 1:  # partial tissue coverage: a random blob of kept patches
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
def test_grid_rule_matches_full_resolution(width, height, patch, stride, keep, smooth, bias, seed):
    scores = random_scores(width, height, patch, stride, seed=seed, keep=keep, smooth=smooth, bias=bias)
    reference = zeus_mask_fullres(scores)
    assert 0.05 < reference.mean() < 0.95  # a non-trivial mask
    exact = zeus_mask(scores)  # small slide: sampled at every pixel
    assert exact.pixel_size == 1 and exact.mask.shape == reference.shape == (height, width)
    assert dice(exact.mask, reference) >= 0.9999
    sampled = zeus_mask(scores, max_pixels=width * height // 9 + 1)  # as on a large slide: every 3rd pixel
    assert sampled.pixel_size == 3
    assert dice(mask_to_level0(sampled), reference) >= 0.99


def test_three_classes_and_ties_go_negative():
    scores = random_scores(1200, 900, 448, 112, seed=5, n_cls=3, positive=0, smooth=1.0)
    assert dice(mask_to_level0(zeus_mask(scores)), zeus_mask_fullres(scores)) >= 0.99
    tie = np.array([[[1.0, 1.0], [2.0, 1.0], [0.0, 0.0]]])
    assert positive_argmax(tie, 0).tolist() == [[False, True, False]]


def test_argmax_rule_is_exact_per_pixel():
    scores = random_scores(1300, 1000, 448, 112, seed=6, smooth=1.0)
    mask = zeus_mask(scores, threshold=Threshold("argmax"))
    full = np.zeros((scores.height, scores.width, 2))
    covered = np.zeros((scores.height, scores.width), bool)
    for (x, y), s in zip(scores.coords, scores.scores, strict=True):
        full[y : y + 448, x : x + 448] += s
        covered[y : y + 448, x : x + 448] = True
    expected = (full[..., 1] > full[..., 0]) & covered
    assert np.array_equal(mask_to_level0(mask), expected)


def test_cell_counts_and_sums():
    scores = PatchScores(np.array([[0, 0], [112, 0]]), np.array([[1.0, 2.0], [3.0, 5.0]], np.float32),
                         ("a", "b"), "b", 448, 112, 600, 500, None)
    cs = cell_sums(scores)
    assert cs.cell == 112
    assert cs.counts[0].tolist() == [1, 2, 2, 2, 1, 0]
    assert cs.sums[0, 1].tolist() == [4.0, 7.0]
    assert cs.counts[4].tolist() == [0] * 6  # row 4 (y 448..559) is below both patches


def test_prob_rule_monotonic_in_threshold():
    scores = random_scores(2400, 1800, 448, 112, seed=7, keep=1.0)
    low = zeus_mask(scores, threshold=Threshold.parse("prob:0.3"), logit_scale=10).mask
    high = zeus_mask(scores, threshold=Threshold.parse("prob:0.7"), logit_scale=10).mask
    assert high.sum() < low.sum() and not (high & ~low).any()


def test_threshold_parse():
    assert str(Threshold.parse("ZEUS")) == "zeus"
    assert Threshold.parse("prob:0.25").value == 0.25
    for bad in ("prob:1.5", "prob:x", "median"):
        with pytest.raises(ZeusError):
            Threshold.parse(bad)


def test_opencv_sigma_rule():
    assert opencv_sigma(897) == pytest.approx(0.3 * (448 - 1) + 0.8)


def test_memory_is_grid_sized():
    # a 100k x 80k slide: the fine raster stays within the cap, far from 8e9 level-0 pixels
    scores = PatchScores(np.array([[0, 0]]), np.array([[0.0, 1.0]], np.float32), ("n", "t"), "t", 448, 112,
                         100_000, 80_000, 0.5)
    mask = zeus_mask(scores)
    assert mask.mask.size <= 48_000_000
    assert mask.mask.any() and mask.pixel_size >= 14
