"""Tissue detection as CLAM (and so ZEUS) does it, on a low-resolution view of the slide.

HSV saturation -> median blur (k=7) -> Otsu threshold -> morphological closing (k=12) -> drop
small tissue regions and fill small holes. Otsu on a blank slide would split noise, so the
threshold never goes below ``min_saturation``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from .slide import Slide

DEFAULT_MAX_SIDE = 2048


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue raster; pixel (r, c) covers level-0 px [c*ds, (c+1)*ds) x [r*ds, (r+1)*ds)."""

    mask: np.ndarray
    downsample: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def integral(self) -> np.ndarray:
        """Summed-area table with a zero first row/column, for rectangle counts."""
        table = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.int64)
        np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.int64), axis=1, out=table[1:, 1:])
        return table


@dataclass(frozen=True)
class TissueParams:
    median_kernel: int = 7
    close_kernel: int = 12
    min_saturation: int = 15
    min_region_fraction: float = 1e-4  # of the mask's pixels
    max_hole_fraction: float = 1e-4


def segment_tissue(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image (CLAM's saturation + Otsu method)."""
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
    saturation = cv2.medianBlur(saturation, params.median_kernel)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(float(otsu), float(params.min_saturation))
    mask = (saturation > threshold).astype(np.uint8)
    if params.close_kernel > 0:
        kernel = np.ones((params.close_kernel, params.close_kernel), np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    mask = mask.astype(bool)
    n_px = mask.size
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(1, params.min_region_fraction * n_px)
        keep[0] = False
        mask = keep[labels]
    holes, n = ndimage.label(~mask)
    if n:
        sizes = np.bincount(holes.ravel())
        border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        fill = sizes < params.max_hole_fraction * n_px
        fill[0] = False
        fill[border] = False  # background touching the border is not a hole
        mask |= fill[holes]
    return mask


def view_downsample(width: int, height: int, max_side: int = DEFAULT_MAX_SIDE) -> float:
    """Downsample of the low-resolution view that tissue detection (and the overlay) read."""
    return max(1.0, max(width, height) / max_side)


def tissue_from_view(view: np.ndarray, width: int, params: TissueParams = TissueParams()) -> TissueMask:
    """Tissue mask from an RGB view of the whole slide (level-0 ``width`` px wide)."""
    # the view's size is rounded: use the exact per-pixel scale so coordinates stay true
    return TissueMask(mask=segment_tissue(view, params), downsample=width / view.shape[1])


def detect_tissue(
    slide: Slide, max_side: int = DEFAULT_MAX_SIDE, params: TissueParams = TissueParams()
) -> TissueMask:
    """Tissue mask of ``slide`` computed on a view whose longest side is at most ``max_side``."""
    width, height = slide.dimensions
    return tissue_from_view(slide.read_downsampled(view_downsample(width, height, max_side)), width, params)


def full_tissue(width: int, height: int) -> TissueMask:
    """A mask that counts the whole image as tissue (``--no-tissue``)."""
    return TissueMask(mask=np.ones((1, 1), dtype=bool), downsample=float(max(width, height)))
