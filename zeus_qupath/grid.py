"""The patch grid: overlapping square patches on a regular stride, kept where they touch tissue.

All coordinates are level-0 pixels. Patch (row, col) has its top-left at (col*stride, row*stride);
the grid has enough columns and rows that the patches cover the whole image (the last ones may
run past the edge, where the slide reads as white).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ZeusError
from .tissue import TissueMask


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
    geometry: PatchGeometry
    width: int
    height: int
    rows: int
    cols: int
    index: np.ndarray  # (N, 2) int64 (row, col) of the kept patches, row-major order

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) int64 patch top-left (x, y) in level-0 px."""
        return self.index[:, ::-1] * self.geometry.stride_l0

    def __len__(self) -> int:
        return int(self.index.shape[0])


def grid_shape(width: int, height: int, patch: int, stride: int) -> tuple[int, int]:
    """(rows, cols) of a grid whose patches cover a ``width`` x ``height`` image."""
    cols = math.ceil(max(width - patch, 0) / stride) + 1
    rows = math.ceil(max(height - patch, 0) / stride) + 1
    return rows, cols


def make_grid(width: int, height: int, geometry: PatchGeometry, tissue: TissueMask | None) -> PatchGrid:
    """The patches of a ``width`` x ``height`` slide that touch tissue (all of them without a mask)."""
    patch, stride = geometry.patch_size_l0, geometry.stride_l0
    if geometry.patch_size <= 0 or geometry.stride <= 0 or stride <= 0 or patch <= 0:
        raise ZeusError("patch size and stride must be positive")
    if geometry.stride > geometry.patch_size:
        raise ZeusError(f"stride {geometry.stride} is larger than the patch size {geometry.patch_size}")
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
