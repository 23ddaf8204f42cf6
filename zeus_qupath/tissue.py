"""Tissue detection: CLAM's method with ZEUS's parameters (the default), or the older coarse mask.

ZEUS (``preprocess/patching/extract_patches_features.py``) runs CLAM's ``segmentTissue`` with
``seg_level=-1, mthresh=7, close=12, use_otsu=True`` and ``a_t=2, a_h=16, max_n_holes=8``. The rule,
as :func:`clam_tissue` implements it:

1. the slide is read at the pyramid level OpenSlide picks for a 64x downsample (the level with the
   largest downsample not above 64; level 0 for a slide without a pyramid). Its per-axis scale is
   level-0 size / level size. A level larger than ``max_view_pixels`` is replaced by a view of the
   slide just small enough to fit (CLAM would read it whole; memory stays bounded here);
2. HSV saturation, median blur (k=7), Otsu's threshold (pixels strictly above it; no floor),
   morphological closing with a 12 x 12 square;
3. outer contours and their holes (``cv2.RETR_CCOMP``, every boundary pixel kept). A contour is kept
   when its area minus the area of all its holes is above ``a_t`` reference patches; of its holes,
   the 8 largest are considered and those larger than ``a_h`` reference patches kept. A reference
   patch is 512 x 512 level-0 px, i.e. ``int(512**2 / (sx * sy))`` px at the segmentation scale;
4. contours and holes are scaled to level 0 (each vertex times the scale, truncated to int).

The tissue mask of the result (kept contours filled, kept holes cleared, at the segmentation scale)
is what the overlay, the polygon clip and the caches store; patch selection uses the level-0 contours
(:mod:`zeus_qupath.grid`).

The older rule (``coarse``): a view of at most 2048 px, Otsu with a floor of 15, closing, regions and
holes filtered by their share of the view; patches are kept when they touch any of its pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage

from .slide import Slide

DEFAULT_MAX_SIDE = 2048


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue raster; pixel (r, c) covers level-0 px [c*ds, (c+1)*ds) x [r*ds, (r+1)*ds).

    ``contours`` / ``holes`` (CLAM's rule only): the level-0 outlines the raster was drawn from, one
    (K, 2) int32 (x, y) array per tissue region, and per region a tuple of its kept holes.
    """

    mask: np.ndarray
    downsample: float
    contours: tuple[np.ndarray, ...] = ()
    holes: tuple[tuple[np.ndarray, ...], ...] = ()

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def integral(self) -> np.ndarray:
        """Summed-area table with a zero first row/column, for rectangle counts."""
        table = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.int64)
        np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.int64), axis=1, out=table[1:, 1:])
        return table


# ------------------------------------------------------------------------------------------- CLAM / ZEUS


@dataclass(frozen=True)
class ClamParams:
    """CLAM's ``segmentTissue`` settings as ZEUS runs them (areas in 512 x 512 level-0 px units)."""

    seg_downsample: float = 64.0
    median_kernel: int = 7
    close_kernel: int = 12
    area_tissue: float = 2.0  # a_t
    area_hole: float = 16.0  # a_h
    max_holes: int = 8  # max_n_holes
    ref_patch: int = 512  # ref_patch_size
    max_view_pixels: int = 1 << 26  # bound on the segmentation view (CLAM has none)


@dataclass(frozen=True)
class ClamTissue:
    """Kept contours and holes in level-0 px, and the segmentation view's scale (sx, sy)."""

    contours: tuple[np.ndarray, ...]
    holes: tuple[tuple[np.ndarray, ...], ...]
    view_contours: list[np.ndarray] = field(repr=False)  # the same at the view's scale, for the raster
    view_holes: list[np.ndarray] = field(repr=False)
    view_shape: tuple[int, int]
    scale: tuple[float, float]


def clam_view(slide: Slide, params: ClamParams = ClamParams()) -> tuple[np.ndarray, tuple[float, float]]:
    """The RGB view CLAM segments (see the module docstring, step 1) and its per-axis scale."""
    width, height = slide.dimensions
    level = slide.best_level_for_downsample(params.seg_downsample)
    lw, lh = slide.level_dimensions[level]
    if lw * lh <= params.max_view_pixels:
        view = slide.read_region(0, 0, lw, lh, level=level)
    else:
        view = slide.read_downsampled(math.sqrt(width * height / params.max_view_pixels) * 1.001)
    return view, (width / view.shape[1], height / view.shape[0])


def _contour_area(c: np.ndarray) -> float:
    return float(cv2.contourArea(c))


def clam_contours(rgb: np.ndarray, scale: tuple[float, float], params: ClamParams = ClamParams()) -> ClamTissue:
    """CLAM's tissue contours and holes of an RGB uint8 view whose pixels are ``scale`` level-0 px."""
    saturation = cv2.medianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1], params.median_kernel)
    _, binary = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if params.close_kernel > 0:
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((params.close_kernel,) * 2, np.uint8))
    ref_area = int(params.ref_patch**2 / (scale[0] * scale[1]))  # one reference patch, in view px^2
    min_tissue, min_hole = params.area_tissue * ref_area, params.area_hole * ref_area

    found, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    outer_view: list[np.ndarray] = []
    holes_view: list[list[np.ndarray]] = []
    if hierarchy is not None:
        parent = hierarchy[0][:, 3]
        children: dict[int, list[int]] = {}
        for i, p in enumerate(parent):
            if p >= 0:
                children.setdefault(int(p), []).append(i)
        for i in np.flatnonzero(parent < 0):
            own = [found[j] for j in children.get(int(i), [])]
            area = _contour_area(found[i]) - sum(_contour_area(h) for h in own)
            if area == 0 or not area > min_tissue:
                continue
            largest = sorted(own, key=_contour_area, reverse=True)[: params.max_holes]
            outer_view.append(found[i])
            holes_view.append([h for h in largest if _contour_area(h) > min_hole])

    factor = np.array(scale, dtype=np.float64)

    def to_level0(c: np.ndarray) -> np.ndarray:
        return (c.reshape(-1, 2) * factor).astype(np.int32)

    return ClamTissue(
        contours=tuple(to_level0(c) for c in outer_view),
        holes=tuple(tuple(to_level0(h) for h in hs) for hs in holes_view),
        view_contours=outer_view,
        view_holes=[h for hs in holes_view for h in hs],
        view_shape=binary.shape[:2],
        scale=scale,
    )


def clam_raster(tissue: ClamTissue) -> np.ndarray:
    """Kept contours filled and kept holes cleared, at the segmentation view's scale (bool)."""
    canvas = np.zeros(tissue.view_shape, dtype=np.uint8)
    if tissue.view_contours:
        cv2.drawContours(canvas, tissue.view_contours, -1, 1, thickness=cv2.FILLED)
    if tissue.view_holes:
        cv2.drawContours(canvas, tissue.view_holes, -1, 0, thickness=cv2.FILLED)
    return canvas.astype(bool)


def clam_tissue(slide: Slide, params: ClamParams = ClamParams()) -> TissueMask:
    """ZEUS's (CLAM's) tissue of ``slide``: level-0 contours and holes, and their raster."""
    view, scale = clam_view(slide, params)
    found = clam_contours(view, scale, params)
    # the raster's rows/cols scale by sx/sy; TissueMask has one downsample: use the x scale (they differ
    # only by the rounding of the level's size, well under one level-0 px per view px)
    return TissueMask(mask=clam_raster(found), downsample=scale[0], contours=found.contours, holes=found.holes)


# ---------------------------------------------------------------------------------------- coarse (old)


@dataclass(frozen=True)
class TissueParams:
    median_kernel: int = 7
    close_kernel: int = 12
    min_saturation: int = 15
    min_region_fraction: float = 1e-4  # of the mask's pixels
    max_hole_fraction: float = 1e-4


def segment_tissue(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image (saturation + Otsu with a floor; the ``coarse`` rule)."""
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
    """Tissue mask from an RGB view of the whole slide (level-0 ``width`` px wide), ``coarse`` rule."""
    # the view's size is rounded: use the exact per-pixel scale so coordinates stay true
    return TissueMask(mask=segment_tissue(view, params), downsample=width / view.shape[1])


def detect_tissue(
    slide: Slide, max_side: int = DEFAULT_MAX_SIDE, params: TissueParams = TissueParams(), rule: str = "coarse"
) -> TissueMask:
    """Tissue mask of ``slide``: ``rule`` "zeus" (CLAM's method) or "coarse" (a view of at most ``max_side``)."""
    if rule == "zeus":
        return clam_tissue(slide)
    width, height = slide.dimensions
    return tissue_from_view(slide.read_downsampled(view_downsample(width, height, max_side)), width, params)


def full_tissue(width: int, height: int) -> TissueMask:
    """A mask that counts the whole image as tissue (``--no-tissue``)."""
    return TissueMask(mask=np.ones((1, 1), dtype=bool), downsample=float(max(width, height)))


def tissue_method(rule: str) -> dict[str, object]:
    """What a tissue rule depends on, for cache keys."""
    if rule == "zeus":
        return {"rule": "zeus", "params": repr(ClamParams())}
    return {"params": repr(TissueParams()), "max_side": DEFAULT_MAX_SIDE}
