"""Adaptive sampling: the ZEUS mask from fewer embedded patches (``--sampling adaptive``).

ZEUS's mask at a pixel is the argmax of the summed class scores of the patches covering it, blurred
and thresholded (:mod:`zeus_qupath.reconstruct`). The plane splits into *cells* (between consecutive
patch edges) on which the covering patches, and so the decision, are constant. A cell's decision
needs all its covering patches only near a class boundary: deep inside a homogeneous region the
patches that are not embedded cannot change it.

The rule (:func:`sample_patches`):

1. Embed a coarse lattice of the same patch grid: the patches whose lattice (row, col) are both
   multiples of ``coarse_step`` (default 4: one patch in 16; grids are per tissue contour, each on its
   own lattice; the test is on each patch's own lattice index).
2. For every patch not embedded yet, bound what it could add to each difference ``s_pos - s_j``
   (positive class minus each other class): the *envelope* ``[lo, hi]``.
   ``bound="neighbours"`` (the default): the range of that difference over its *surrounding* embedded
   patches: those at most ``r`` px away in x and in y, for the smallest ``r`` (a whole number of strides,
   at most ``reach``: :func:`neighbour_reach`, 3 strides at step 4) at which embedded patches lie on both
   sides of it (or level with it) in x and in y; a patch never surrounded within ``reach`` (at the edge of
   its contour) takes every embedded patch within ``reach``. The range is widened by ``slack`` times
   itself on both sides. A patch with no embedded neighbour gets the score bound below.
   ``bound="scores"``: ``[-2, 2]``, the widest a difference of two cosine similarities (or of two means
   of them, an ensemble) can be. When the white/black filters run on the patches as they are read
   (``--tissue zeus``), a read patch they dropped is a neighbour that contributes nothing (0 joins the
   range of the skipped patches next to it: they may be dropped too); a skipped patch among kept
   neighbours is assumed kept, as its differences are assumed within their range.
3. The mask is drawn from the embedded patches only (the scores file holds only those rows). A cell
   is *settled* when the decision from its embedded patches equals the decision that all its patches
   must reach whatever the missing ones add within their envelopes:
   positive from the embedded sums and ``E_j + L_j > 0`` for every other class j, or not positive and
   ``E_j + H_j <= 0`` for some j (``E``: the embedded patches' summed differences; ``L``/``H``: the
   missing patches' summed envelope ends). Ties go to the non-positive classes, as in ZEUS.
4. The missing patches that cover an unsettled cell are embedded, finer lattice first: after the
   coarse round only those on the lattice of half the step (step 4: every other position), then all
   (step 1); envelopes and cells are evaluated again; repeat until every cell is settled (or
   ``max_rounds``: then the score bound, so every patch that covers an unsettled cell, round after
   round, until none is left, which in the worst case is all of them).

What it guarantees: with ``bound="scores"`` every cell's argmax equals the exact run's (so the
mask, a function of the argmax only, is identical) given the same embedded features; that bound is
loose enough that it falls back to (nearly) every patch. With ``bound="neighbours"`` the mask equals
the exact run's wherever a skipped patch's score differences lie within the range of its embedded
neighbours' (widened by ``slack``): an assumption about the model and slide, measured
(``bench/sampling.py``), not proved. Mask pixels are exact wherever all cells within the blur's reach
are settled, which at the end is every cell. Prompt screening (``--prompt-screening``) ranks prompts
on the embedded patches only, so its prototypes can differ from an exact run's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from .errors import ZeusError
from .outputs import PatchScores
from .reconstruct import (
    BLOCK_SAMPLES,
    ZEUS_BLUR_THRESHOLD,
    Cells,
    band_sums,
    blur_weights,
    patch_cells,
    sample_centres,
    sample_step,
)

SAMPLING_MODES = ("exact", "adaptive")
BOUNDS = ("neighbours", "scores")
SCORE_DIFF_BOUND = 2.0  # cosine similarities lie in [-1, 1]: a difference of two lies in [-2, 2]
BAND_CELLS = 1_000_000  # cells evaluated at once (cell rows x columns of one band)
BLUR_TOLERANCE = 1e-4  # blurred values this close to the threshold count as undecided (float32 rounding)


@dataclass(frozen=True)
class SamplingRule:
    """How patches are chosen: ``exact`` (every grid patch, ZEUS) or ``adaptive`` (see the module docstring)."""

    mode: str = "exact"
    coarse_step: int = 4  # first round: every coarse_step-th lattice position in x and in y; then halved
    bound: str = "neighbours"  # envelope of a skipped patch: its embedded neighbours' range, or the score bound
    slack: float = 0.0  # widen the neighbours' range by this fraction of it on both sides
    reach: float | None = None  # neighbours' largest reach in level-0 px (None: see neighbour_reach)
    mask_aware: bool = False  # resolve only the unsettled cells that could change a mask pixel (no gain measured)
    max_rounds: int = 8  # after these, the remaining rounds embed every patch over an unsettled cell

    def __post_init__(self) -> None:
        if self.mode not in SAMPLING_MODES:
            raise ZeusError(f"--sampling must be one of {', '.join(SAMPLING_MODES)}, got {self.mode!r}")
        if self.bound not in BOUNDS:
            raise ZeusError(f"sampling bound must be one of {', '.join(BOUNDS)}, got {self.bound!r}")
        if self.coarse_step < 1 or self.max_rounds < 1 or not self.slack >= 0:
            raise ZeusError("sampling: coarse_step and max_rounds must be >= 1, slack >= 0")

    @classmethod
    def parse(cls, text: str) -> SamplingRule:
        return cls(mode=text.strip().lower())

    @property
    def adaptive(self) -> bool:
        return self.mode == "adaptive"

    def to_dict(self) -> dict[str, Any]:
        if not self.adaptive:
            return {"mode": "exact"}
        return {"mode": self.mode, "coarse_step": self.coarse_step, "bound": self.bound, "slack": self.slack,
                "reach": self.reach, "mask_aware": self.mask_aware, "max_rounds": self.max_rounds}


@dataclass
class SampledPatches:
    """Which grid patches an adaptive run embedded, their features, and how it got there."""

    embedded: np.ndarray  # (N,) bool over the grid: read and embedded (or dropped as white/black)
    kept: np.ndarray  # (N,) bool: embedded and not dropped as white/black (the patches that are scored)
    features: list[np.ndarray]  # per encoder, (N, D) rows valid where ``kept``
    rounds: list[int] = field(default_factory=list)  # patches read per round
    unsettled: int = 0  # cells left unsettled when sampling stopped (0: every cell settled)

    def summary(self, rule: SamplingRule) -> dict[str, Any]:
        n = len(self.embedded)
        return {**rule.to_dict(), "grid_patches": n, "embedded": int(self.embedded.sum()),
                "scored": int(self.kept.sum()), "skipped": int(n - self.embedded.sum()),
                "fraction_embedded": round(float(self.embedded.sum()) / n, 4) if n else 0.0,
                "rounds": list(self.rounds), "unsettled_cells": int(self.unsettled)}


def adapter_diff_bound(weights: np.ndarray, bias: np.ndarray, positive: int) -> float:
    """The largest ``|s_pos - s_j|`` of a linear adapter's scores ``W f + b`` on unit features ``f``:
    ``max_j ||w_pos - w_j|| + |b_pos - b_j|`` (Cauchy-Schwarz; reached with f along w_pos - w_j)."""
    w = np.asarray(weights, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64).ravel()
    dw = np.linalg.norm(np.delete(w[[positive]] - w, positive, axis=0), axis=1)
    db = np.abs(np.delete(b[positive] - b, positive))
    return float((dw + db).max()) if len(dw) else 0.0


def coarse_lattice(index: np.ndarray, step: int) -> np.ndarray:
    """(N,) bool: patches whose lattice row and column (``PatchGrid.index``) are multiples of ``step``."""
    index = np.asarray(index).reshape(-1, 2)
    return (index[:, 0] % step == 0) & (index[:, 1] % step == 0)


def class_differences(scores: np.ndarray, positive: int) -> np.ndarray:
    """(N, C - 1) float64: the positive class's score minus each other class's."""
    s = np.asarray(scores, dtype=np.float64)
    return s[:, [positive]] - np.delete(s, positive, axis=1)


def envelopes(coords: np.ndarray, reach: float, embedded: np.ndarray, diffs: np.ndarray, rule: SamplingRule,
              diff_bound: float = SCORE_DIFF_BOUND, step: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), each (M, C - 1): what each patch not read yet (``~embedded``, grid order) could add.

    ``diffs`` (K, C - 1) are the read patches' differences (:func:`class_differences`), in grid order
    of ``embedded``'s True entries; zeros for a patch the white/black filters dropped (it adds nothing,
    so a skipped patch next to one may add nothing too). ``step``: the rings (level-0 px) in which
    neighbours are searched (:func:`surrounding_pairs`; None: ``reach``, one ring).
    """
    missing = np.flatnonzero(~embedded)
    k = diffs.shape[1]
    lo = np.full((len(missing), k), -diff_bound)
    hi = np.full((len(missing), k), diff_bound)
    if rule.bound == "neighbours" and len(missing) and embedded.any():
        have = np.flatnonzero(embedded)
        tree_missing = cKDTree(coords[missing].astype(np.float64))
        tree_have = cKDTree(coords[have].astype(np.float64))
        pairs = tree_missing.sparse_distance_matrix(tree_have, reach, p=np.inf, output_type="coo_matrix")
        rows, cols = pairs.row, pairs.col  # (missing, embedded) pairs at most ``reach`` apart in x and in y
        if len(rows):
            rows, cols = surrounding_pairs(coords[missing], coords[have], rows, cols, pairs.data, step)
        if len(rows):
            nlo = np.full((len(missing), k), np.inf)
            nhi = np.full((len(missing), k), -np.inf)
            np.minimum.at(nlo, rows, diffs[cols])
            np.maximum.at(nhi, rows, diffs[cols])
            seen = np.isfinite(nlo[:, 0])
            spread = nhi[seen] - nlo[seen]
            lo[seen] = np.maximum(nlo[seen] - rule.slack * spread, -diff_bound)
            hi[seen] = np.minimum(nhi[seen] + rule.slack * spread, diff_bound)
    return lo, hi


def surrounding_pairs(missing_xy: np.ndarray, have_xy: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                      dist: np.ndarray, step: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The (missing, embedded) pairs each missing patch's envelope uses: its nearest surrounding neighbours.

    Pairs are grouped in rings of ``step`` px (Chebyshev distance ``dist``, ring k: (k - 1) * step < d <= k * step).
    A missing patch keeps the pairs of rings 1..k for the smallest k at which its neighbours so far lie on
    both sides of it (or level with it) in x and in y; never surrounded: every pair given (all rings).
    """
    n = int(rows.max()) + 1
    ring = (np.ones(len(rows), dtype=np.int64) if not step
            else np.maximum(np.ceil(dist / step - 1e-9), 1).astype(np.int64))
    d = have_xy[cols] - missing_xy[rows]
    limit = np.full(n, ring.max(), dtype=np.int64)
    open_ = np.ones(n, dtype=bool)
    lo = np.full((n, 2), np.iinfo(np.int64).max)
    hi = np.full((n, 2), np.iinfo(np.int64).min)
    for k in range(1, int(ring.max()) + 1):
        sel = ring == k
        np.minimum.at(lo, rows[sel], d[sel])
        np.maximum.at(hi, rows[sel], d[sel])
        done = open_ & np.all((lo <= 0) & (hi >= 0), axis=1)
        limit[done] = k
        open_ &= ~done
        if not open_.any():
            break
    keep = ring <= limit[rows]
    return rows[keep], cols[keep]


def neighbour_reach(patch: int, stride: int | None, rule: SamplingRule) -> float:
    """How far (level-0 px, in x and in y) an embedded patch counts as a skipped one's neighbour.

    By default ``(coarse_step - 1) * stride``: far enough to reach the coarse lattice positions around any
    skipped patch (at ZEUS's 448 / 112 px and step 4, 3 strides; the envelope itself uses the nearest ring
    that surrounds the patch, :func:`surrounding_pairs`, so after refinement mostly patches one stride away,
    which share at least 9/16 of its pixels), never beyond overlapping patches.
    """
    if rule.reach is not None:
        return float(min(rule.reach, patch - 0.5))
    return float(min(max(rule.coarse_step - 1, 1) * (stride or patch), patch - 0.5))


def _bands(cells: Cells) -> list[tuple[int, int]]:
    ny, nx = cells.shape
    rows = max(1, BAND_CELLS // max(nx, 1))
    return [(a, min(a + rows, ny)) for a in range(0, ny, rows)]


def _integral(flags: np.ndarray) -> np.ndarray:
    table = np.zeros((flags.shape[0] + 1, flags.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(flags, axis=0, dtype=np.int64), axis=1, out=table[1:, 1:])
    return table


def _box_any(table: np.ndarray, r0: np.ndarray, r1: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    return (table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]) > 0


def cell_decisions(scores: PatchScores, grid_coords: np.ndarray, embedded_rows: np.ndarray, lo: np.ndarray,
                   hi: np.ndarray) -> tuple[Cells, np.ndarray, np.ndarray]:
    """The grid's cells, each cell's decision from the embedded patches (positive wins) and whether it is settled.

    ``scores`` holds the embedded patches' scores (rows at grid positions ``embedded_rows``); ``lo``/``hi``
    the envelopes of every other grid patch (grid order). Returns (cells, winner, settled), (ny, nx) bools.
    """
    n = len(grid_coords)
    pos = scores.positive_index
    c = len(scores.classes)
    missing = np.ones(n, dtype=bool)
    missing[embedded_rows] = False
    # per patch: its class scores if embedded (else 0), and its envelope ends if missing (else 0)
    values = np.zeros((n, c + 2 * (c - 1)))
    values[embedded_rows, :c] = scores.scores
    values[missing, c:2 * c - 1] = lo
    values[missing, 2 * c - 1:] = hi
    full = PatchScores(coords=np.asarray(grid_coords, np.int64), scores=np.zeros((n, c), np.float32),
                       classes=scores.classes, positive_class=scores.positive_class, patch_size=scores.patch_size,
                       stride=scores.stride, width=scores.width, height=scores.height, mpp=scores.mpp)
    cells = patch_cells(full)
    winner = np.zeros(cells.shape, dtype=bool)
    settled = np.zeros(cells.shape, dtype=bool)
    for a, b in _bands(cells):
        sums, _ = band_sums(cells, values, a, b)
        s = sums[..., :c]
        e = s[..., [pos]] - np.delete(s, pos, axis=-1)  # embedded differences, computed as reconstruct's argmax is
        low, high = sums[..., c:2 * c - 1], sums[..., 2 * c - 1:]
        win = np.all(e > 0, axis=-1)
        winner[a:b] = win
        settled[a:b] = np.where(win, np.all(e + low > 0, axis=-1), np.any(e + high <= 0, axis=-1))
    return cells, winner, settled


def mask_relevant(cells: Cells, winner: np.ndarray, settled: np.ndarray, width: int, height: int,
                  patch: int) -> np.ndarray:
    """(ny, nx) bool: the cells within the blur's reach of a mask pixel that the unsettled cells could change.

    A mask pixel is ``blur(positive cells) > 0.1``. With the settled positive cells only, its blurred value
    is a lower bound; with every unsettled cell positive too, an upper bound. Where both bounds fall on the
    same side of 0.1 (on the sample grid :func:`~zeus_qupath.reconstruct.zeus_mask` uses), no outcome of the
    unsettled cells changes the pixel. A cell matters if such an undecided pixel lies within ``patch`` px of it
    (the kernel's radius), counted per cell, so slightly more cells matter than strictly need to.
    """
    step = sample_step(width, height)
    xs, ys = sample_centres(width, step), sample_centres(height, step)
    kx = blur_weights(xs, width, cells.x_edges, patch).astype(np.float32)
    ky = blur_weights(ys, height, cells.y_edges, patch).astype(np.float32)
    lower = (winner & settled).astype(np.float32)
    upper = (winner | ~settled).astype(np.float32)
    col_cell = np.searchsorted(cells.x_edges, xs, side="right") - 1
    undecided_cells = np.zeros(cells.shape, dtype=bool)
    for a, b in _sample_bands(len(ys), len(xs)):
        rows = ky[a:b]
        if rows.nnz == 0:
            continue
        lo, hi = int(rows.indices.min()), int(rows.indices.max()) + 1
        if not (upper[lo:hi].any() and (upper[lo:hi] != lower[lo:hi]).any()):
            continue  # no unsettled cell within reach of this band
        band = rows[:, lo:hi]
        b_lo = np.asarray(band @ np.asarray(kx @ lower[lo:hi].T).T)
        b_hi = np.asarray(band @ np.asarray(kx @ upper[lo:hi].T).T)
        t = ZEUS_BLUR_THRESHOLD
        r, cidx = np.nonzero((b_lo <= t + BLUR_TOLERANCE) & (b_hi > t - BLUR_TOLERANCE))
        if len(r):
            row_cell = np.searchsorted(cells.y_edges, ys[a:b][r], side="right") - 1
            undecided_cells[row_cell, col_cell[cidx]] = True
    if not undecided_cells.any():
        return undecided_cells
    table = _integral(undecided_cells)
    ye, xe = cells.y_edges, cells.x_edges
    r0 = np.searchsorted(ye[1:], ye[:-1] - patch, side="right")  # first cell row ending after y0 - patch
    r1 = np.searchsorted(ye[:-1], ye[1:] + patch, side="left")  # cell rows starting before y1 + patch
    c0 = np.searchsorted(xe[1:], xe[:-1] - patch, side="right")
    c1 = np.searchsorted(xe[:-1], xe[1:] + patch, side="left")
    rr0, cc0 = np.meshgrid(r0, c0, indexing="ij")
    rr1, cc1 = np.meshgrid(r1, c1, indexing="ij")
    return _box_any(table, rr0, rr1, cc0, cc1)


def _sample_bands(n_rows: int, n_cols: int) -> list[tuple[int, int]]:
    rows = max(1, BLOCK_SAMPLES // max(n_cols, 1))
    return [(a, min(a + rows, n_rows)) for a in range(0, n_rows, rows)]


def unsettled_patches(scores: PatchScores, grid_coords: np.ndarray, embedded_rows: np.ndarray,
                      lo: np.ndarray, hi: np.ndarray, mask_aware: bool = False) -> tuple[np.ndarray, int]:
    """The grid patches to embed next (bool over ``grid_coords``) and how many cells need them.

    Every patch not embedded that covers a cell that is not settled (:func:`cell_decisions`); with
    ``mask_aware`` only cells that could change a mask pixel (:func:`mask_relevant`).
    """
    cells, winner, settled = cell_decisions(scores, grid_coords, embedded_rows, lo, hi)
    bad = ~settled
    if mask_aware and bad.any():
        bad &= mask_relevant(cells, winner, settled, scores.width, scores.height, scores.patch_size)
    n = len(grid_coords)
    take = np.zeros(n, dtype=bool)
    count = int(bad.sum())
    if not count:
        return take, 0
    missing = np.ones(n, dtype=bool)
    missing[embedded_rows] = False
    idx = np.flatnonzero(missing & (cells.col1 > cells.col0) & (cells.row1 > cells.row0))
    table = _integral(bad)
    take[idx[_box_any(table, cells.row0[idx], cells.row1[idx], cells.col0[idx], cells.col1[idx])]] = True
    return take, count


EmbedFn = Callable[[np.ndarray], tuple[Sequence[np.ndarray], np.ndarray | None]]
ScoreFn = Callable[[Sequence[np.ndarray]], np.ndarray]


def sample_patches(
    coords: np.ndarray,
    index: np.ndarray,
    *,
    patch_size: int,
    width: int,
    height: int,
    classes: Sequence[str],
    positive_class: str,
    embed: EmbedFn,
    score: ScoreFn,
    embed_dims: Sequence[int],
    rule: SamplingRule,
    stride: int | None = None,
    diff_bound: float = SCORE_DIFF_BOUND,
) -> SampledPatches:
    """Embed the grid patches (``coords``, lattice ``index``) that the adaptive rule needs (module docstring).

    ``embed(positions)`` embeds the grid patches at ``positions`` (sorted) and returns one (len, D_i)
    feature array per encoder and the white/black filter's verdict (bool (len,), or None: all kept).
    ``score(features)`` turns per-encoder feature arrays of some patches into their (n, C) class scores
    (over the same patches, so prompt screening sees every patch embedded so far). ``diff_bound``: the
    largest ``|s_pos - s_j|`` any patch can have (2 for cosine scores; see :func:`adapter_diff_bound`).
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    n = len(coords)
    embedded = np.zeros(n, dtype=bool)
    kept = np.zeros(n, dtype=bool)
    features = [np.zeros((n, d), dtype=np.float32) for d in embed_dims]
    out = SampledPatches(embedded, kept, features)
    if n == 0:
        return out
    classes = tuple(classes)
    positive = classes.index(positive_class)
    todo = coarse_lattice(index, rule.coarse_step) if rule.adaptive else np.ones(n, dtype=bool)
    reach = neighbour_reach(patch_size, stride, rule)
    rounds = 0
    while True:
        positions = np.flatnonzero(todo)
        if len(positions):
            feats, keep = embed(positions)
            keep = np.ones(len(positions), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
            embedded[positions] = True
            kept[positions[keep]] = True
            for f, got in zip(features, feats, strict=True):
                f[positions[keep]] = np.asarray(got)[keep]
            out.rounds.append(int(len(positions)))
            rounds += 1
        if embedded.all():
            out.unsettled = 0  # every patch embedded: every cell is decided as in an exact run
            break
        rows = np.flatnonzero(kept)
        values = np.asarray(score([f[rows] for f in features]), dtype=np.float32)
        # every patch read so far is a neighbour: a scored one adds its differences, a dropped one nothing
        read_diffs = np.zeros((n, len(classes) - 1))
        read_diffs[rows] = class_differences(values, positive)
        read_diffs = read_diffs[embedded]
        fallback = rounds >= rule.max_rounds  # give up on the envelopes: only the score bound
        lo, hi = envelopes(coords, reach, embedded, read_diffs,
                           SamplingRule("adaptive", bound="scores") if fallback else rule, diff_bound, stride)
        # dropped (white/black) patches are known to add nothing: neither missing nor scored
        lo_all = np.zeros((n, read_diffs.shape[1]))
        hi_all = np.zeros((n, read_diffs.shape[1]))
        lo_all[~embedded], hi_all[~embedded] = lo, hi
        miss = ~kept
        emb_scores = PatchScores(coords=coords[rows], scores=values, classes=classes, positive_class=positive_class,
                                 patch_size=patch_size, stride=1, width=width, height=height, mpp=None)
        take, out.unsettled = unsettled_patches(emb_scores, coords, rows, lo_all[miss], hi_all[miss],
                                                mask_aware=rule.mask_aware)
        todo = take & ~embedded
        if not todo.any():
            break
        finer = todo & coarse_lattice(index, max(rule.coarse_step >> rounds, 1))  # halve the step per round
        if finer.any():
            todo = finer
    return out

