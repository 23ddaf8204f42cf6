"""The patch grid: overlapping square patches on a regular stride, and which of them are kept.

All coordinates are level-0 pixels. Every patch lies on a lattice of step ``stride_l0``: patch i has
its top-left at ``origin[i] + index[i][::-1] * stride_l0`` (``index`` is (row, col) on that lattice,
``origin`` its offset, 0 <= origin < stride_l0). Two rules choose the patches (``--tissue``):

``zeus`` (default; CLAM's ``process_contour``/``_getPatchGenerator`` as ZEUS runs it, ``contour_fn=
'four_pt'``, ``use_padding=True``): for each tissue contour, a grid anchored at the top-left of its
bounding box, spanning the box (patches may run past the slide's edge, read as white). A patch is
kept when at least one of the four points ``centre +- (patch // 2) // 2`` (``centre = top-left +
patch // 2``) lies inside the contour or on it, and its exact centre (``top-left + patch / 2``) is
not strictly inside one of that contour's holes. A patch chosen by two contours is kept once. The
white/black filters that follow need pixels (:func:`pixel_keep`, applied by the reader).

``coarse`` (the older rule, and ``--no-tissue``): one grid from (0, 0) covering the whole image;
a patch is kept when it touches any pixel of the tissue raster (every patch without tissue detection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np
import shapely

from .errors import ZeusError
from .tissue import TissueMask

WHITE_SATURATION = 5  # CLAM's isWhitePatch: mean HSV saturation below this (ZEUS: white_thresh=5)
BLACK_RGB = 40  # CLAM's isBlackPatch: every channel's mean below this (ZEUS: black_thresh=40)


@dataclass(frozen=True)
class PatchGeometry:
    """Patch size and stride at the pixel size the model sees, and how that maps to level 0."""

    patch_size: int  # px as cut for the model (e.g. 448)
    stride: int  # px at the same scale (e.g. 112)
    scale: float = 1.0  # level-0 px per model px (target_mpp / slide mpp; 1 at level 0)

    @property
    def patch_size_l0(self) -> int:
        return int(round(self.patch_size * self.scale))

    @property
    def stride_l0(self) -> int:
        return int(round(self.stride * self.scale))


@dataclass(frozen=True)
class PatchGrid:
    """The kept patches. ``rows``/``cols`` bound ``index`` (max + 1); ``origin`` None means all (0, 0)."""

    geometry: PatchGeometry
    width: int
    height: int
    rows: int
    cols: int
    index: np.ndarray  # (N, 2) int64 (row, col) of each patch on its lattice
    origin: np.ndarray | None = None  # (N, 2) int64 (x, y) lattice offset of each patch, in [0, stride_l0)
    pixel_filter: bool = False  # the white/black filters are still to apply (by the reader, on its pixels)

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) int64 patch top-left (x, y) in level-0 px."""
        xy = self.index[:, ::-1] * self.geometry.stride_l0
        return xy if self.origin is None else xy + self.origin

    def take(self, indices: np.ndarray) -> PatchGrid:
        """The grid of the patches at ``indices`` (positions or a boolean mask), origins included."""
        return replace(self, index=self.index[indices],
                       origin=None if self.origin is None else self.origin[indices])

    def filtered(self, kept: np.ndarray | None) -> PatchGrid:
        """The grid after the white/black filters: the patches where ``kept`` (None: all) is True."""
        grid = self if kept is None else self.take(kept)
        return replace(grid, pixel_filter=False)

    def __len__(self) -> int:
        return int(self.index.shape[0])


def grid_shape(width: int, height: int, patch: int, stride: int) -> tuple[int, int]:
    """(rows, cols) of a grid whose patches cover a ``width`` x ``height`` image."""
    cols = math.ceil(max(width - patch, 0) / stride) + 1
    rows = math.ceil(max(height - patch, 0) / stride) + 1
    return rows, cols


def _check(geometry: PatchGeometry) -> None:
    if geometry.patch_size <= 0 or geometry.stride <= 0 or geometry.stride_l0 <= 0 or geometry.patch_size_l0 <= 0:
        raise ZeusError("patch size and stride must be positive")
    if geometry.stride > geometry.patch_size:
        raise ZeusError(f"stride {geometry.stride} is larger than the patch size {geometry.patch_size}")


def make_grid(width: int, height: int, geometry: PatchGeometry, tissue: TissueMask | None,
              rule: str = "coarse") -> PatchGrid:
    """The patches of a ``width`` x ``height`` slide kept by ``rule`` ("zeus" or "coarse", see above).

    "zeus" needs a mask from :func:`~zeus_qupath.tissue.clam_tissue` (with contours); a mask without
    contours (``--no-tissue``) or no mask keeps every patch of the (0, 0) grid, as "coarse" does.
    """
    _check(geometry)
    if rule == "zeus" and tissue is not None and (tissue.contours or tissue.mask.size > 1):
        return contour_grid(width, height, geometry, tissue)
    patch, stride = geometry.patch_size_l0, geometry.stride_l0
    rows, cols = grid_shape(width, height, patch, stride)
    r, c = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64), indexing="ij")
    index = np.stack([r.ravel(), c.ravel()], axis=1)
    if tissue is not None:
        index = index[_touches_tissue(index, patch, stride, tissue)]
    return PatchGrid(geometry=geometry, width=width, height=height, rows=rows, cols=cols, index=index)


def _touches_tissue(index: np.ndarray, patch: int, stride: int, tissue: TissueMask) -> np.ndarray:
    table = tissue.integral()
    mh, mw = tissue.mask.shape
    ds = tissue.downsample
    x0 = index[:, 1] * stride
    y0 = index[:, 0] * stride
    c0 = np.clip(np.floor(x0 / ds).astype(np.int64), 0, mw)
    r0 = np.clip(np.floor(y0 / ds).astype(np.int64), 0, mh)
    c1 = np.clip(np.ceil((x0 + patch) / ds).astype(np.int64), 0, mw)
    r1 = np.clip(np.ceil((y0 + patch) / ds).astype(np.int64), 0, mh)
    count = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return count > 0


# ------------------------------------------------------------------------------------ zeus (CLAM) rule


def _ring(points: np.ndarray) -> shapely.Polygon | None:
    """The polygon of a closed pixel outline (self-touching rings are fine for point location)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 3:
        return None
    poly = shapely.Polygon(pts)
    shapely.prepare(poly)
    return poly


def _contour_candidates(contour: np.ndarray, holes: tuple[np.ndarray, ...], patch: int,
                        stride: int) -> np.ndarray:
    """(M, 2) int64 top-left (x, y) of one contour's kept patches, rows then columns."""
    x0, y0 = contour.min(axis=0).astype(np.int64)
    x1, y1 = contour.max(axis=0).astype(np.int64) + 1  # bounding box end (exclusive)
    ys, xs = np.meshgrid(np.arange(y0, y1, stride, dtype=np.int64), np.arange(x0, x1, stride, dtype=np.int64),
                         indexing="ij")
    xs, ys = xs.ravel(), ys.ravel()
    outline = _ring(contour)
    if outline is None or not len(xs):
        return np.zeros((0, 2), np.int64)
    half, shift = patch // 2, (patch // 2) // 2
    cx, cy = xs + half, ys + half
    inside = np.zeros(len(xs), dtype=bool)
    for dx, dy in ((-shift, -shift), (shift, shift), (shift, -shift), (-shift, shift)):
        todo = ~inside
        inside[todo] = shapely.intersects_xy(outline, cx[todo] + dx, cy[todo] + dy)  # inside or on the outline
    fx, fy = xs + patch / 2, ys + patch / 2
    for hole in holes:
        ring = _ring(hole)
        if ring is None:
            continue
        todo = np.flatnonzero(inside)
        inside[todo] &= ~shapely.contains_xy(ring, fx[todo], fy[todo])  # strictly inside the hole
    return np.stack([xs[inside], ys[inside]], axis=1)


def contour_grid(width: int, height: int, geometry: PatchGeometry, tissue: TissueMask) -> PatchGrid:
    """The "zeus" rule: per-contour grids and the four-point / hole test (see the module docstring)."""
    patch, stride = geometry.patch_size_l0, geometry.stride_l0
    holes = tissue.holes or tuple(() for _ in tissue.contours)
    parts = [_contour_candidates(c, h, patch, stride) for c, h in zip(tissue.contours, holes, strict=True)]
    xy = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    if len(xy):
        _, first = np.unique(xy, axis=0, return_index=True)
        xy = xy[np.sort(first)]  # a patch two contours chose, once, in the first contour's place
    origin = xy % stride
    index = ((xy - origin) // stride)[:, ::-1]
    rows = int(index[:, 0].max()) + 1 if len(index) else 0
    cols = int(index[:, 1].max()) + 1 if len(index) else 0
    return PatchGrid(geometry=geometry, width=width, height=height, rows=rows, cols=cols,
                     index=np.ascontiguousarray(index), origin=origin, pixel_filter=True)


# --------------------------------------------------------------------------------- white / black patches


def pixel_keep(patches: np.ndarray) -> np.ndarray:
    """(B,) bool: which of (B, P, P, 3) uint8 RGB patches are neither white nor black (CLAM's filters)."""
    if not len(patches):
        return np.zeros(0, dtype=bool)
    b, p = patches.shape[0], patches.shape[1]
    flat = np.ascontiguousarray(patches).reshape(b * p, p, 3)
    sat = cv2.cvtColor(flat, cv2.COLOR_RGB2HSV)[:, :, 1].reshape(b, p * p)
    white = sat.mean(axis=1) < WHITE_SATURATION
    black = np.all(patches.reshape(b, p * p, 3).mean(axis=1) < BLACK_RGB, axis=1)
    return ~(white | black)


def region_keep(region: np.ndarray, geometry: PatchGeometry, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """:func:`pixel_keep` for the patches at (``rows``, ``cols``) (stride steps) of one decoded region.

    Each pixel of the region is converted once; the per-patch means come from sums over g x g cells
    (g = gcd(patch, stride)), so the extra memory is a few bytes per cell, not per pixel.
    """
    p, s = geometry.patch_size, geometry.stride
    if not len(rows):
        return np.zeros(0, dtype=bool)
    g = math.gcd(p, s)
    h, w = (region.shape[0] // g) * g, (region.shape[1] // g) * g
    rgb = np.ascontiguousarray(region[:h, :w])
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
    cells = np.empty((h // g, w // g, 4), dtype=np.int64)
    cells[:, :, 0] = sat.reshape(h // g, g, w // g, g).sum(axis=(1, 3), dtype=np.int64)
    cells[:, :, 1:] = rgb.reshape(h // g, g, w // g, g, 3).sum(axis=(1, 3), dtype=np.int64)
    table = np.zeros((h // g + 1, w // g + 1, 4), dtype=np.int64)
    np.cumsum(np.cumsum(cells, axis=0), axis=1, out=table[1:, 1:])
    a, y0, x0 = p // g, rows * (s // g), cols * (s // g)
    sums = table[y0 + a, x0 + a] - table[y0, x0 + a] - table[y0 + a, x0] + table[y0, x0]
    means = sums / float(p * p)
    white = means[:, 0] < WHITE_SATURATION
    black = np.all(means[:, 1:] < BLACK_RGB, axis=1)
    return ~(white | black)
