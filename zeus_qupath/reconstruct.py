"""From patch scores to a mask, with memory proportional to the patch grid.

The ZEUS rule (its public code, at full resolution): every pixel sums the scores of the patches
covering it, one map per class; pixel-wise argmax (ties go to the non-positive classes); Gaussian
blur with kernel k = 2 * patch + 1 (OpenCV's sigma for sigma=0); keep pixels whose blurred value is
above 0.1. Pixels inside one stride cell are covered by exactly the same patches, so the sums and
the argmax are computed once per cell (cell = gcd(patch, stride)). The blur of a cell-constant image
is separable and linear, so its value at any pixel is ``Ky @ cells @ Kx.T`` with small per-axis weight
matrices (:func:`blur_matrix`): exact at every sampled pixel. The mask is sampled every pixel when the
slide has at most ``MAX_FINE_PIXELS`` pixels (identical to the full-resolution rule), otherwise every
``step`` px (:func:`sample_step`), so memory never grows with the slide beyond that cap.
(:func:`zeus_mask_fullres` is the straightforward reference, for tests and benchmarks only.)

Other rules: ``argmax`` (the per-cell argmax, no smoothing) and ``prob:P`` (softmax over classes with
the model's logit scale, averaged over the covering patches, positive class above P).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .errors import ZeusError
from .scores import PatchScores

ZEUS_BLUR_THRESHOLD = 0.1
MAX_FINE_PIXELS = 32_000_000
MAX_CELLS = 64_000_000


@dataclass(frozen=True)
class Threshold:
    """How scores become a mask: ``zeus`` (default), ``argmax`` or ``prob`` with ``value``."""

    method: str = "zeus"
    value: float = 0.5

    @classmethod
    def parse(cls, text: str) -> Threshold:
        t = text.strip().lower()
        if t in ("zeus", "argmax"):
            return cls(t)
        if t.startswith("prob:"):
            try:
                value = float(t[5:])
            except ValueError:
                value = math.nan
            if not 0.0 < value < 1.0:
                raise ZeusError(f"--threshold prob:P needs 0 < P < 1, got {text!r}")
            return cls("prob", value)
        raise ZeusError(f"--threshold must be zeus, argmax or prob:P, got {text!r}")

    def __str__(self) -> str:
        return f"prob:{self.value:g}" if self.method == "prob" else self.method


@dataclass(frozen=True)
class Mask:
    """Boolean raster; pixel (r, c) covers level-0 [c*ps, (c+1)*ps) x [r*ps, (r+1)*ps), ps = ``pixel_size``."""

    mask: np.ndarray
    pixel_size: float
    width: int
    height: int


@dataclass(frozen=True)
class CellSums:
    """Per-cell sums of the covering patches' values, and how many patches cover each cell."""

    sums: np.ndarray  # (rows, cols, C) float64
    counts: np.ndarray  # (rows, cols) int32
    cell: int  # level-0 px per cell


def cell_sums(scores: PatchScores, values: np.ndarray | None = None) -> CellSums:
    """Sum ``values`` (default: the scores) of every patch over the cells it covers (2-D difference arrays)."""
    values = scores.scores if values is None else values
    cell = math.gcd(scores.patch_size, scores.stride)
    rows, cols = math.ceil(scores.height / cell), math.ceil(scores.width / cell)
    if rows * cols > MAX_CELLS:
        raise ZeusError(
            f"patch size {scores.patch_size} and stride {scores.stride} give {rows * cols:,} cells; "
            "use a patch size that is a multiple of the stride"
        )
    k = scores.patch_size // cell
    n_cls = values.shape[1]
    diff = np.zeros((rows + k + 1, cols + k + 1, n_cls + 1), dtype=np.float64)
    r0 = scores.coords[:, 1] // cell
    c0 = scores.coords[:, 0] // cell
    vals = np.concatenate([values.astype(np.float64), np.ones((len(values), 1))], axis=1)
    for dr, dc, sign in ((0, 0, 1), (k, 0, -1), (0, k, -1), (k, k, 1)):
        np.add.at(diff, (r0 + dr, c0 + dc), sign * vals)
    acc = diff.cumsum(axis=0).cumsum(axis=1)[:rows, :cols]
    return CellSums(sums=acc[..., :n_cls], counts=np.rint(acc[..., n_cls]).astype(np.int32), cell=cell)


def positive_argmax(sums: np.ndarray, positive: int) -> np.ndarray:
    """True where the positive class's sum is strictly above every other class's (ties are negative)."""
    others = np.delete(sums, positive, axis=-1)
    return sums[..., positive] > others.max(axis=-1)


def opencv_sigma(ksize: int) -> float:
    """OpenCV's Gaussian sigma for ``sigma=0``: 0.3 * ((k - 1) / 2 - 1) + 0.8."""
    return 0.3 * ((ksize - 1) / 2 - 1) + 0.8


def blur_matrix(n_px: int, cell: int, n_cells: int, step: int, patch: int) -> np.ndarray:
    """(samples, cells) weights: the blur, along one axis, of a cell-constant image, sampled every ``step`` px.

    Row i holds, for the level-0 pixel at the centre of sample i, the weight of each cell in OpenCV's
    Gaussian kernel of size 2 * patch + 1 (sigma from OpenCV's rule), with OpenCV's default border
    (reflect-101 at the image edge). So ``Ky @ cells @ Kx.T`` is exactly the full-resolution blur at the
    sampled pixels.
    """
    n_s = math.ceil(n_px / step)
    centres = np.minimum(np.arange(n_s, dtype=np.int64) * step + step // 2, n_px - 1)
    kernel = cv2.getGaussianKernel(2 * patch + 1, 0).ravel()
    weights = np.zeros((n_s, n_cells), dtype=np.float64)
    for start in range(0, n_s, 1024):  # chunks keep the (samples x kernel) index arrays small
        px = centres[start : start + 1024, None] + np.arange(-patch, patch + 1)[None, :]
        px = np.abs(px)
        px = np.where(px > n_px - 1, 2 * (n_px - 1) - px, px)  # reflect-101
        rows = np.arange(px.shape[0])[:, None] * n_cells + px // cell
        flat = np.bincount(rows.ravel(), weights=np.broadcast_to(kernel, px.shape).ravel(),
                           minlength=px.shape[0] * n_cells)
        weights[start : start + px.shape[0]] = flat.reshape(px.shape[0], n_cells)
    return weights


def sample_step(width: int, height: int, max_pixels: int = MAX_FINE_PIXELS) -> int:
    """Level-0 px between mask samples: 1 (exact) when the slide fits ``max_pixels``, else the smallest that does."""
    return max(1, math.ceil(math.sqrt(width * height / max_pixels)))


def zeus_mask(scores: PatchScores, logit_scale: float | None = None, threshold: Threshold = Threshold(),
              max_pixels: int = MAX_FINE_PIXELS) -> Mask:
    """The mask of ``threshold``'s rule, with memory proportional to the grid (and at most ``max_pixels``)."""
    if threshold.method == "prob":
        if logit_scale is None:
            logit_scale = float(scores.meta.get("logit_scale", 100.0))
        z = logit_scale * scores.scores.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        cs = cell_sums(scores, probs[:, [scores.positive_index]])
        mean = np.divide(cs.sums[..., 0], cs.counts, out=np.zeros(cs.counts.shape), where=cs.counts > 0)
        return Mask(mean > threshold.value, float(cs.cell), scores.width, scores.height)
    cs = cell_sums(scores)
    winner = positive_argmax(cs.sums, scores.positive_index) & (cs.counts > 0)
    if threshold.method == "argmax":
        return Mask(winner, float(cs.cell), scores.width, scores.height)
    step = sample_step(scores.width, scores.height, max_pixels)
    ky = blur_matrix(scores.height, cs.cell, winner.shape[0], step, scores.patch_size).astype(np.float32)
    kx = blur_matrix(scores.width, cs.cell, winner.shape[1], step, scores.patch_size).astype(np.float32)
    right = winner.astype(np.float32) @ kx.T  # (cell rows, sample cols)
    mask = np.empty((ky.shape[0], kx.shape[0]), dtype=bool)
    for start in range(0, ky.shape[0], 2048):  # row chunks: never a full float raster
        mask[start : start + 2048] = (ky[start : start + 2048] @ right) > ZEUS_BLUR_THRESHOLD
    return Mask(mask, float(step), scores.width, scores.height)


def zeus_mask_fullres(scores: PatchScores) -> np.ndarray:
    """Reference: the ZEUS rule at full resolution, as its public code does it. O(width x height x C) memory."""
    h, w = scores.height, scores.width
    p = scores.patch_size
    sums = np.zeros((h, w, scores.scores.shape[1]), dtype=np.float32)
    for (x, y), s in zip(scores.coords, scores.scores, strict=True):
        sums[y : y + p, x : x + p] += s
    covered = np.zeros((h, w), dtype=bool)
    for x, y in scores.coords:
        covered[y : y + p, x : x + p] = True
    binary = (positive_argmax(sums, scores.positive_index) & covered).astype(np.float32)
    del sums
    blurred = cv2.GaussianBlur(binary, (2 * p + 1, 2 * p + 1), 0)
    return blurred > ZEUS_BLUR_THRESHOLD


def mask_to_level0(mask: Mask) -> np.ndarray:
    """Nearest-neighbour expansion of ``mask`` to level-0 size (for tests and small images only)."""
    ys = np.minimum((np.arange(mask.height) / mask.pixel_size).astype(np.int64), mask.mask.shape[0] - 1)
    xs = np.minimum((np.arange(mask.width) / mask.pixel_size).astype(np.int64), mask.mask.shape[1] - 1)
    return mask.mask[np.ix_(ys, xs)]
