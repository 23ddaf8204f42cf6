"""From patch scores to a mask, with memory proportional to the number of patches.

The ZEUS rule (its public code, at full resolution): every pixel sums the scores of the patches
covering it, one map per class; pixel-wise argmax (ties go to the non-positive classes); Gaussian
blur with kernel k = 2 * patch + 1 (OpenCV's sigma for sigma=0); keep pixels whose blurred value is
above 0.1.

Patches may sit anywhere (integer top-lefts >= 0): one lattice from (0, 0), CLAM's and ZEUS's
per-contour lattices, or no lattice at all. Between two consecutive distinct patch edges (every
``x`` and ``x + patch``, clipped to the slide, and likewise in y) the set of covering patches does
not change, so the plane splits into at most (2N + 1) x (2N + 1) rectangular *cells* on which the
sums, the argmax and the coverage are constant (:class:`Cells`). The blur of a cell-constant image
is separable and linear, so its value at a pixel is ``Ky @ winner @ Kx.T`` with sparse per-axis
weight matrices (:func:`blur_weights`), exact at every sampled pixel. The mask is computed in bands
of sample rows, each needing only the cell rows within one kernel radius, so no array ever has the
slide's size or (cells x cells) size: memory follows the patches and the sample grid. The mask is
sampled every pixel when the slide has at most ``MAX_FINE_PIXELS`` pixels (identical to the
full-resolution rule), otherwise every ``step`` px (:func:`sample_step`).
(:func:`zeus_mask_fullres` is the straightforward reference, for tests and benchmarks only.)

Other rules, sampled the same way and exact at each sample: ``argmax`` (the per-pixel argmax, no
smoothing) and ``prob:P`` (softmax over classes with the model's logit scale, averaged over the
covering patches, positive class above P).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import scipy.sparse

from .errors import ZeusError
from .outputs import PatchScores
from .params import Threshold

ZEUS_BLUR_THRESHOLD = 0.1
MAX_FINE_PIXELS = 32_000_000
BLOCK_SAMPLES = 2_000_000  # mask samples computed at once (rows x columns of one band)
ZEUS_RULE = Threshold()  # the default: ZEUS's blur rule


@dataclass(frozen=True)
class Mask:
    """Boolean raster; pixel (r, c) covers level-0 [c*ps, (c+1)*ps) x [r*ps, (r+1)*ps), ps = ``pixel_size``."""

    mask: np.ndarray
    pixel_size: float
    width: int
    height: int


@dataclass(frozen=True)
class Cells:
    """The rectangles between consecutive distinct patch edges, and the cells each patch covers.

    Cell (i, j) is level-0 ``[x_edges[j], x_edges[j+1]) x [y_edges[i], y_edges[i+1])``; patch k covers
    cell columns ``[col0[k], col1[k])`` and rows ``[row0[k], row1[k])``.
    """

    x_edges: np.ndarray  # (nx + 1,) int64, 0 .. width
    y_edges: np.ndarray  # (ny + 1,) int64, 0 .. height
    col0: np.ndarray
    col1: np.ndarray
    row0: np.ndarray
    row1: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.y_edges) - 1, len(self.x_edges) - 1


def _axis(starts: np.ndarray, patch: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo = np.clip(starts, 0, size)
    hi = np.clip(starts + patch, 0, size)
    edges = np.unique(np.concatenate([[0, size], lo, hi]).astype(np.int64))
    return edges, np.searchsorted(edges, lo), np.searchsorted(edges, hi)


def patch_cells(scores: PatchScores) -> Cells:
    """The cells of ``scores``' patches (at most 2N + 1 per axis; patches are clipped to the slide)."""
    if len(scores.coords) and scores.coords.min() < 0:
        raise ZeusError("patch coordinates must be non-negative level-0 px")
    xe, c0, c1 = _axis(scores.coords[:, 0], scores.patch_size, scores.width)
    ye, r0, r1 = _axis(scores.coords[:, 1], scores.patch_size, scores.height)
    return Cells(xe, ye, c0, c1, r0, r1)


def band_sums(cells: Cells, values: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell sums of ``values`` (N, C) over the covering patches, and their counts, for cell rows [lo, hi).

    Returns float64 (hi - lo, nx, C) and int64 (hi - lo, nx); 2-D difference arrays over the patches
    that reach the band only.
    """
    nx = cells.shape[1]
    n_cls = values.shape[1]
    hit = (cells.row0 < hi) & (cells.row1 > lo) & (cells.col1 > cells.col0)
    r0 = np.maximum(cells.row0[hit], lo) - lo
    r1 = np.minimum(cells.row1[hit], hi) - lo
    c0, c1 = cells.col0[hit], cells.col1[hit]
    vals = np.concatenate([values[hit].astype(np.float64), np.ones((int(hit.sum()), 1))], axis=1)
    diff = np.zeros((hi - lo + 1, nx + 1, n_cls + 1), dtype=np.float64)
    for rows, cols, sign in ((r0, c0, 1), (r1, c0, -1), (r0, c1, -1), (r1, c1, 1)):
        np.add.at(diff, (rows, cols), sign * vals)
    acc = diff.cumsum(axis=0).cumsum(axis=1)[: hi - lo, :nx]
    return acc[..., :n_cls], np.rint(acc[..., n_cls]).astype(np.int64)


def positive_argmax(sums: np.ndarray, positive: int) -> np.ndarray:
    """True where the positive class's sum is strictly above every other class's (ties are negative)."""
    others = np.delete(sums, positive, axis=-1)
    return sums[..., positive] > others.max(axis=-1)


def sample_step(width: int, height: int, max_pixels: int = MAX_FINE_PIXELS) -> int:
    """Level-0 px between mask samples: 1 (exact) when the slide fits ``max_pixels``, else the smallest that does."""
    return max(1, math.ceil(math.sqrt(width * height / max_pixels)))


def sample_centres(n_px: int, step: int) -> np.ndarray:
    """Level-0 px sampled along an axis of ``n_px`` pixels: the centre pixel of every ``step``-px mask pixel."""
    n_s = math.ceil(n_px / step)
    return np.minimum(np.arange(n_s, dtype=np.int64) * step + step // 2, n_px - 1)


def reflect101(px: np.ndarray, n_px: int) -> np.ndarray:
    """OpenCV's default border (BORDER_REFLECT_101, ``gfedcb|abcdefgh|gfedcba``), repeated as far as needed."""
    if n_px == 1:
        return np.zeros_like(px)
    period = 2 * (n_px - 1)
    q = np.mod(px, period)
    return np.where(q >= n_px, period - q, q)


def blur_weights(centres: np.ndarray, n_px: int, edges: np.ndarray, patch: int) -> scipy.sparse.csr_matrix:
    """Sparse (samples, cells) weights: the blur, along one axis, of a cell-constant image at ``centres``.

    Row i holds, for level-0 pixel ``centres[i]``, the weight of each cell (``edges``) in OpenCV's
    Gaussian kernel of size 2 * patch + 1 (sigma from OpenCV's rule) with OpenCV's default border. So
    ``Ky @ cells @ Kx.T`` is exactly the full-resolution blur at the sampled pixels. The axis extended by
    the kernel radius on both sides (reflected) is cut into runs of one cell; a sample's weight on a run
    is a difference of the kernel's cumulative sum, so the work is per (sample, run), not per pixel.
    """
    kernel = cv2.getGaussianKernel(2 * patch + 1, 0).ravel()
    cdf = np.concatenate([[0.0], np.cumsum(kernel)])  # cdf[k]: the kernel's first k weights
    # extended axis: index e is level-0 position e - patch; sample c's window is e in [c, c + 2 * patch]
    cell = np.searchsorted(edges, reflect101(np.arange(-patch, n_px + patch), n_px), side="right") - 1
    run_start = np.concatenate([[0], np.flatnonzero(np.diff(cell)) + 1])
    run_end = np.concatenate([run_start[1:], [len(cell)]])
    first = np.searchsorted(run_end, centres, side="right")  # the first run ending after c
    last = np.searchsorted(run_start, centres + 2 * patch, side="right")  # runs starting at or before c + 2p
    counts = last - first
    rows = np.repeat(np.arange(len(centres)), counts)
    run = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
    c = centres[rows]
    lo = np.maximum(run_start[run], c) - c
    hi = np.minimum(run_end[run], c + 2 * patch + 1) - c
    return scipy.sparse.csr_matrix((cdf[hi] - cdf[lo], (rows, cell[run_start[run]])),
                                   shape=(len(centres), len(edges) - 1))  # duplicates (reflections) are summed


def _bands(n_rows: int, n_cols: int) -> Iterator[tuple[int, int]]:
    rows = max(1, BLOCK_SAMPLES // max(n_cols, 1))
    for start in range(0, n_rows, rows):
        yield start, min(start + rows, n_rows)


def _cell_index(edges: np.ndarray, px: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges, px, side="right") - 1


def _sampled_bands(scores: PatchScores, values: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                   reduce: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]],
                   ) -> Iterator[tuple[int, int, tuple[np.ndarray, ...]]]:
    """(a, b, arrays) for bands of sample rows ``ys[a:b]``: ``reduce(sums, counts)`` of the cells, at (ys x xs).

    ``reduce`` maps the per-cell sums of ``values`` and the counts of a band to per-cell arrays (e.g. the
    argmax), which are then read at the sampled pixels: small per-cell work, one lookup per sample.
    """
    cells = patch_cells(scores)
    cols = _cell_index(cells.x_edges, np.clip(xs, 0, scores.width - 1))
    for a, b in _bands(len(ys), len(xs)):
        rows = _cell_index(cells.y_edges, np.clip(ys[a:b], 0, scores.height - 1))
        lo, hi = int(rows.min()), int(rows.max()) + 1
        per_cell = reduce(*band_sums(cells, values, lo, hi))
        yield a, b, tuple(arr[np.ix_(rows - lo, cols)] for arr in per_cell)


def sample_sums(scores: PatchScores, values: np.ndarray, xs: np.ndarray,
                ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel sums of ``values`` (N, C) over the patches covering each level-0 pixel (ys x xs), and the counts.

    Exact at every given pixel; memory follows the patches and ``len(ys) * len(xs)``, not the slide.
    """
    sums = np.zeros((len(ys), len(xs), values.shape[1]))
    counts = np.zeros((len(ys), len(xs)), dtype=np.int64)
    for a, b, (band, n) in _sampled_bands(scores, values, xs, ys, lambda s, n: (s, n)):
        sums[a:b], counts[a:b] = band, n
    return sums, counts


def _probabilities(scores: PatchScores, logit_scale: float | None) -> np.ndarray:
    if logit_scale is None:
        logit_scale = float(scores.meta.get("logit_scale", 100.0))
    z = logit_scale * scores.scores.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs[:, [scores.positive_index]]


def zeus_mask(scores: PatchScores, logit_scale: float | None = None, threshold: Threshold = ZEUS_RULE,
              max_pixels: int = MAX_FINE_PIXELS) -> Mask:
    """The mask of ``threshold``'s rule, sampled every ``sample_step`` px, with memory bounded by the patches."""
    step = sample_step(scores.width, scores.height, max_pixels)
    xs, ys = sample_centres(scores.width, step), sample_centres(scores.height, step)
    mask = np.zeros((len(ys), len(xs)), dtype=bool)
    if len(scores.coords) == 0:
        return Mask(mask, float(step), scores.width, scores.height)
    if threshold.method in ("argmax", "prob"):
        if threshold.method == "prob":
            values = _probabilities(scores, logit_scale)

            def rule(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
                mean = np.divide(sums[..., 0], counts, out=np.zeros(counts.shape), where=counts > 0)
                return (mean > threshold.value,)
        else:
            values = scores.scores

            def rule(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
                return (positive_argmax(sums, scores.positive_index) & (counts > 0),)
        for a, b, (band,) in _sampled_bands(scores, values, xs, ys, rule):
            mask[a:b] = band
        return Mask(mask, float(step), scores.width, scores.height)
    cells = patch_cells(scores)
    kx = blur_weights(xs, scores.width, cells.x_edges, scores.patch_size).astype(np.float32)
    ky = blur_weights(ys, scores.height, cells.y_edges, scores.patch_size).astype(np.float32)
    for a, b in _bands(len(ys), len(xs)):  # bands of sample rows: never a full float raster
        rows = ky[a:b]
        if rows.nnz == 0:
            continue
        lo, hi = int(rows.indices.min()), int(rows.indices.max()) + 1  # the cell rows within the kernel
        sums, counts = band_sums(cells, scores.scores, lo, hi)
        winner = positive_argmax(sums, scores.positive_index) & (counts > 0)
        if not winner.any():
            continue
        right = np.asarray(kx @ winner.T.astype(np.float32)).T  # (band cell rows, sample columns)
        mask[a:b] = np.asarray(rows[:, lo:hi] @ right) > ZEUS_BLUR_THRESHOLD
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
