"""Synthetic H&E-like whole-slide images with a known tumor mask, written tile by tile.

Layout. A slide is described by one low-resolution *label map* at ``mask_downsample`` (default 32):
0 = background, 1 = normal tissue, 2 = tumor. Tissue is a few smooth random blobs on a near-white
background; tumor is a set of smooth blobs inside the tissue, each a few thousand level-0 pixels
across at the demo size (large relative to a 448 px patch). The maps are written next to the slide
as ``<stem>.tissue.png`` and ``<stem>.tumor.png`` (0/255, one pixel per ``mask_downsample`` x
``mask_downsample`` block of level 0).

Ground truth. The label of level-0 pixel ``(x, y)`` is exactly ``label_map[y // ds, x // ds]``,
i.e. the nearest-neighbour upsampling of the mask PNGs; the renderer uses that very rule for
level 0, so the pixels are painted with the class the masks say.

Pixels. Every tile is a deterministic function of (level, tile x, tile y, seed): textures are
evaluated at the level-0 coordinates of the tile's pixel centres from hashed lattices (value noise,
jittered-grid nuclei), so tiles join seamlessly and nothing depends on having seen other tiles.
Normal tissue is pink eosinophilic stroma with wavy collagen fibres and sparse small elongated
nuclei; tumor is densely cellular with large dark purple-blue (haematoxylin) nuclei on a bluish
cytoplasm; background is ~(240, 240, 240) grey with slight luminance-only noise (HSV saturation
about 0, as CLAM-style tissue detection expects). Lower pyramid levels are rendered at their own
resolution (with 4 x 4 supersampling from downsample 16 on), so they look like a downsampled
level 0 without being computed from it.

File. A tiled, JPEG-compressed (YCbCr 4:2:0) pyramidal OME-TIFF: level 0 in the main IFD, lower
levels (downsample 4 each) in SubIFDs until the smallest level is under 2000 px; the pixel size is
stored both in the XResolution/YResolution tags (unit centimetre, which tiffslide turns into
``tiffslide.mpp-x``/``mpp-y``) and as OME ``PhysicalSizeX``/``PhysicalSizeY`` in micrometres.
Tiles are JPEG-encoded here and handed to tifffile as pre-compressed bytes; a background tile is
encoded once per level and reused, so mostly-empty giant slides are cheap. Memory is the label map
(a few MB even at 100k x 80k px) plus one row of tiles, independent of the slide's pixel count.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from zeus_qupath.errors import ZeusError
from zeus_qupath.output_set import atomic_path

BACKGROUND = 0
NORMAL = 1
TUMOR = 2
CONFOUNDER = 3  # only with confounder_fraction > 0: a necrosis-like third texture (see label_map)

_BG_LEVEL = 240.0
_JPEG_QUALITY = 85
_LEVEL_FACTOR = 4
_MIN_LEVEL_SIZE = 2000

__all__ = [
    "BACKGROUND",
    "CONFOUNDER",
    "NORMAL",
    "TUMOR",
    "SyntheticSlide",
    "label_map",
    "main",
    "make_synthetic_slide",
    "read_label_map",
]


@dataclass(frozen=True)
class SyntheticSlide:
    """A written synthetic slide and its ground-truth masks (PNG, 0/255, at ``mask_downsample``)."""

    path: Path
    tumor_mask_path: Path
    tissue_mask_path: Path
    mask_downsample: int
    width: int
    height: int
    mpp: float
    confounder_mask_path: Path | None = None  # written only when the slide has a confounder


# --------------------------------------------------------------------------- hashing and noise


def _hash(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    """A well-mixed uint32 hash of integer lattice coordinates (broadcasting) and a key."""
    k = np.uint32(key & 0xFFFFFFFF)
    h = (np.asarray(ix).astype(np.uint32) * np.uint32(0x8DA6B343)) ^ (
        np.asarray(iy).astype(np.uint32) * np.uint32(0xD8163841)
    )
    h = h ^ k
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    h ^= np.uint32((key * 0x9E3779B9) & 0xFFFFFFFF)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    return h


def _uniform(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    """Uniform floats in [0, 1) hashed from lattice coordinates."""
    return (_hash(ix, iy, key) >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _key(seed: int, salt: int) -> int:
    return (seed * 0x27D4EB2F + salt * 0x165667B1 + 0x3C6EF372) & 0xFFFFFFFF


def _interp_taps(coords: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Two-tap smoothstep interpolation from lattice nodes ``spacing`` apart to ``coords``.

    Returns (lower node index relative to the first node, weight of the upper node, first node,
    node count).
    """
    f = coords / spacing
    i = np.floor(f).astype(np.int64)
    t = (f - i).astype(np.float32)
    g0 = int(i.min())
    return i - g0, t * t * (3.0 - 2.0 * t), g0, int(i.max()) - g0 + 2


def _value_noise(xs: np.ndarray, ys: np.ndarray, spacing: float, key: int) -> np.ndarray:
    """Smooth value noise in [-1, 1] on the grid ``ys x xs`` (level-0 px); separable, so cheap.

    Interpolated with gathers rather than matrix products: BLAS threads on tiny matrices cost
    more than they save.
    """
    ix, tx, gx0, nx = _interp_taps(xs, spacing)
    iy, ty, gy0, ny = _interp_taps(ys, spacing)
    gx = gx0 + np.arange(nx)
    gy = gy0 + np.arange(ny)
    lattice = 2.0 * _uniform(gx[None, :], gy[:, None], key) - 1.0  # (ny, nx)
    cols = lattice[:, ix] + (lattice[:, ix + 1] - lattice[:, ix]) * tx[None, :]  # (ny, n)
    lo = cols[iy]
    return lo + (cols[iy + 1] - lo) * ty[:, None]


def _fbm(xs: np.ndarray, ys: np.ndarray, spacing: float, key: int, octaves: int = 3) -> np.ndarray:
    """A few octaves of value noise, normalised to roughly unit amplitude."""
    total = np.zeros((ys.size, xs.size), dtype=np.float32)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        total += amp * _value_noise(xs, ys, spacing / (2.2**o), key + 7919 * o)
        norm += amp
        amp *= 0.5
    return total / norm


# --------------------------------------------------------------------------- layout (label map)


def label_map(
    width: int,
    height: int,
    *,
    seed: int = 0,
    mask_downsample: int = 32,
    tissue_fraction: float = 0.45,
    tumor_fraction: float = 0.3,
    confounder_fraction: float = 0.0,
) -> np.ndarray:
    """The slide's layout as a uint8 map (0 background, 1 normal, 2 tumor) at ``mask_downsample``.

    ``tissue_fraction`` is the share of the slide covered by tissue, ``tumor_fraction`` the share
    of the tissue that is tumor (both approximate: tiny fragments are dropped).
    ``confounder_fraction`` > 0 adds label 3 (``CONFOUNDER``, a necrosis-like texture): smooth blobs
    of another random field over roughly that share of the non-tumor tissue (0: the map is unchanged).
    """
    ds = mask_downsample
    mh, mw = math.ceil(height / ds), math.ceil(width / ds)
    xs = (np.arange(mw, dtype=np.float64) + 0.5) * ds
    ys = (np.arange(mh, dtype=np.float64) + 0.5) * ds
    short = min(width, height)

    # tissue: smooth blobs kept away from the slide border
    tissue_scale = max(short / 2.2, 1024.0)
    field = _fbm(xs, ys, tissue_scale, _key(seed, 1), octaves=3)
    margin = max(0.08 * short, 2.0 * ds)
    edge = np.minimum.outer(np.minimum(ys, height - ys), np.minimum(xs, width - xs))
    field -= 2.0 * np.clip(1.0 - edge / margin, 0.0, 1.0).astype(np.float32)
    tissue = field > np.quantile(field, 1.0 - tissue_fraction)
    tissue = _drop_small(tissue, min_cells=(1000.0 / ds) ** 2)
    tissue = ndimage.binary_fill_holes(tissue)

    labels = tissue.astype(np.uint8)
    if tumor_fraction > 0 and tissue.any():
        # tumor: smooth blobs inside the tissue, each a few thousand px across at the demo size
        tumor_scale = min(max(1500.0, 0.35 * tissue_scale), 12000.0)
        tfield = _fbm(xs, ys, tumor_scale, _key(seed, 2), octaves=2)
        thr = np.quantile(tfield[tissue], 1.0 - tumor_fraction)
        tumor = tissue & (tfield > thr)
        tumor = _drop_small(tumor, min_cells=(700.0 / ds) ** 2)
        labels[tumor] = TUMOR
    if confounder_fraction > 0 and tissue.any():
        cscale = min(max(1500.0, 0.35 * tissue_scale), 12000.0)
        cfield = _fbm(xs, ys, cscale, _key(seed, 3), octaves=2)
        free = labels == NORMAL
        if free.any():
            conf = free & (cfield > np.quantile(cfield[free], 1.0 - confounder_fraction))
            labels[_drop_small(conf, min_cells=(700.0 / ds) ** 2) & free] = CONFOUNDER
    return labels


def _drop_small(mask: np.ndarray, min_cells: float) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_cells
    keep[0] = False
    if not keep.any():  # never drop everything: keep the largest component
        keep[int(np.argmax(sizes[1:])) + 1] = True
    return keep[lab]


def read_label_map(slide: SyntheticSlide) -> np.ndarray:
    """The label map (0/1/2) of a written slide, rebuilt from its mask PNGs."""
    tissue = np.asarray(Image.open(slide.tissue_mask_path)) > 127
    tumor = np.asarray(Image.open(slide.tumor_mask_path)) > 127
    labels = tissue.astype(np.uint8)
    labels[tumor] = TUMOR
    if slide.confounder_mask_path is not None:
        labels[np.asarray(Image.open(slide.confounder_mask_path)) > 127] = CONFOUNDER
    return labels


# --------------------------------------------------------------------------- textures

_STROMA_BASE = np.array([236.0, 180.0, 210.0], dtype=np.float32)
_STROMA_FIBRE = np.array([34.0, 78.0, 48.0], dtype=np.float32)  # subtracted along fibres
_STROMA_LOOSE = np.array([8.0, 36.0, 20.0], dtype=np.float32)  # added in loose areas
_STROMA_NUCLEUS = np.array([104.0, 66.0, 146.0], dtype=np.float32)
_TUMOR_CYTO = np.array([190.0, 138.0, 200.0], dtype=np.float32)
_TUMOR_NUCLEUS = np.array([66.0, 40.0, 118.0], dtype=np.float32)
_NECROSIS_BASE = np.array([228.0, 128.0, 160.0], dtype=np.float32)  # bright eosinophilic, no fibres
_NECROSIS_DUST = np.array([92.0, 52.0, 110.0], dtype=np.float32)  # karyorrhectic nuclear dust


def _nuclei(
    xx: np.ndarray,
    yy: np.ndarray,
    *,
    cell: float,
    offset: float,
    key: int,
    presence: float,
    rx: tuple[float, float],
    ry: tuple[float, float],
    angle: float | None,
    angle_jitter: float = 0.0,
) -> np.ndarray:
    """Coverage (0..1) of nuclei on a jittered grid: at most one ellipse per cell, inside it.

    ``xx``, ``yy`` are (possibly warped) level-0 coordinates, broadcastable to the output shape.
    """
    xx, yy = np.broadcast_arrays(xx, yy)
    gx = np.floor((xx - offset) / cell).astype(np.int64)
    gy = np.floor((yy - offset) / cell).astype(np.int64)
    gx0, gy0 = int(gx.min()), int(gy.min())
    cx = gx0 + np.arange(int(gx.max()) - gx0 + 1)
    cy = gy0 + np.arange(int(gy.max()) - gy0 + 1)
    cxx, cyy = cx[None, :], cy[:, None]

    def u(salt: int) -> np.ndarray:
        return _uniform(cxx, cyy, key + salt)

    present = (u(1) < presence).astype(np.float32)
    a = u(2) * (rx[1] - rx[0]) + rx[0]
    b = u(3) * (ry[1] - ry[0]) + ry[0]
    if angle is None:
        theta = u(4) * np.float32(np.pi)
    else:
        theta = angle + (u(4) - 0.5) * 2.0 * angle_jitter
    room = max(cell - 2.0 * rx[1], 0.0)
    px = (cxx * cell + offset + cell / 2.0) + (u(5) - 0.5) * room
    py = (cyy * cell + offset + cell / 2.0) + (u(6) - 0.5) * room
    params = np.stack(
        np.broadcast_arrays(px, py, np.cos(theta), np.sin(theta), 1.0 / a, 1.0 / b, present, np.sqrt(a * b)),
        axis=-1,
    ).astype(np.float32)
    idx = (gy - gy0) * cx.size + (gx - gx0)
    p = params.reshape(-1, params.shape[-1])[idx]
    dx = xx - p[..., 0]
    dy = yy - p[..., 1]
    c, s = p[..., 2], p[..., 3]
    uu = (dx * c + dy * s) * p[..., 4]
    vv = (dy * c - dx * s) * p[..., 5]
    r2 = uu * uu + vv * vv
    cov = np.clip((1.0 - r2) * p[..., 7] * 0.5 + 0.5, 0.0, 1.0)
    return cov * p[..., 6]


class _Renderer:
    """Paints RGB float pixels for given level-0 pixel-centre coordinates and labels."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        rng = np.random.default_rng([seed, 0x5EED])
        self.fibre_angle = float(rng.uniform(0.0, np.pi))

    def stroma(self, xs: np.ndarray, ys: np.ndarray, spacing: float) -> np.ndarray:
        k = self.seed
        a = self.fibre_angle
        xx = xs[None, :].astype(np.float32)
        yy = ys[:, None].astype(np.float32)
        bundle = np.clip(0.55 + 0.6 * _value_noise(xs, ys, 160.0, _key(k, 13)), 0.0, 1.0)
        if spacing <= 3.0:
            warp = (
                140.0 * _value_noise(xs, ys, 320.0, _key(k, 11))
                + 30.0 * _value_noise(xs, ys, 95.0, _key(k, 12))
                + 5.0 * _value_noise(xs, ys, 30.0, _key(k, 16))
            )
            phase = (xx * math.sin(a) + yy * math.cos(a) + warp) * np.float32(2 * np.pi / 12.0)
            strand = np.clip(0.7 + 0.6 * _value_noise(xs, ys, 55.0, _key(k, 17)), 0.0, 1.0)
            fibre = (0.5 + 0.5 * np.sin(phase)) ** 4 * strand
        else:  # fibres are finer than the sampling: use their mean instead of aliasing them
            fibre = np.float32(0.27 * 0.85)
        shade = _value_noise(xs, ys, 420.0, _key(k, 14))
        img = _STROMA_BASE + (shade * 6.0)[..., None]
        img = img - (fibre * bundle)[..., None] * _STROMA_FIBRE + ((1.0 - bundle) ** 2)[..., None] * _STROMA_LOOSE
        # fibroblast nuclei: sparse, small, elongated along the fibres
        nuc = _nuclei(
            xx, yy, cell=38.0, offset=0.0, key=_key(k, 15), presence=0.28,
            rx=(6.5, 10.0), ry=(2.0, 3.2), angle=-a, angle_jitter=0.35,
        )
        return img + nuc[..., None] * 0.9 * (_STROMA_NUCLEUS - img)

    def tumor(self, xs: np.ndarray, ys: np.ndarray, spacing: float) -> np.ndarray:
        k = self.seed
        shade = _value_noise(xs, ys, 45.0, _key(k, 21)) * 0.6 + _value_noise(xs, ys, 300.0, _key(k, 22)) * 0.4
        img = _TUMOR_CYTO + (shade * 12.0)[..., None]
        # warp the nucleus grid so that it does not show
        xx = xs[None, :].astype(np.float32) + 9.0 * _value_noise(xs, ys, 26.0, _key(k, 26))
        yy = ys[:, None].astype(np.float32) + 9.0 * _value_noise(xs, ys, 26.0, _key(k, 27))
        cov = _nuclei(
            xx, yy, cell=19.0, offset=0.0, key=_key(k, 23), presence=0.8,
            rx=(5.5, 8.0), ry=(4.5, 6.5), angle=None,
        )
        cov2 = _nuclei(
            xx, yy, cell=23.0, offset=9.5, key=_key(k, 24), presence=0.5,
            rx=(5.0, 7.5), ry=(4.0, 6.0), angle=None,
        )
        cov = np.maximum(cov, cov2)
        chroma = 1.0 + 0.18 * _value_noise(xs, ys, max(3.0, spacing), _key(k, 25))
        nucleus = _TUMOR_NUCLEUS * chroma[..., None]
        return img + cov[..., None] * 0.95 * (nucleus - img)

    def necrosis(self, xs: np.ndarray, ys: np.ndarray, spacing: float) -> np.ndarray:
        k = self.seed
        shade = _value_noise(xs, ys, 80.0, _key(k, 31)) * 0.7 + _value_noise(xs, ys, 350.0, _key(k, 32)) * 0.3
        img = _NECROSIS_BASE + (shade * 18.0)[..., None]
        xx = xs[None, :].astype(np.float32)
        yy = ys[:, None].astype(np.float32)
        dust = _nuclei(xx, yy, cell=14.0, offset=3.0, key=_key(k, 33), presence=0.45,
                       rx=(1.5, 3.0), ry=(1.5, 3.0), angle=None)
        return img + dust[..., None] * 0.8 * (_NECROSIS_DUST - img)

    def paint(self, xs: np.ndarray, ys: np.ndarray, labels: np.ndarray, spacing: float = 1.0) -> np.ndarray:
        """RGB floats at pixel centres ``ys x xs`` (level-0 px, ``spacing`` apart) for ``labels``."""
        img = np.full((ys.size, xs.size, 3), _BG_LEVEL, dtype=np.float32)
        is_normal = labels == NORMAL
        is_tumor = labels == TUMOR
        if is_normal.any():
            img = np.where(is_normal[..., None], self.stroma(xs, ys, spacing), img)
        if is_tumor.any():
            img = np.where(is_tumor[..., None], self.tumor(xs, ys, spacing), img)
        is_conf = labels == CONFOUNDER
        if is_conf.any():
            img = np.where(is_conf[..., None], self.necrosis(xs, ys, spacing), img)
        return img


# --------------------------------------------------------------------------- writer


def _level_sizes(width: int, height: int, levels: int | None) -> list[tuple[int, int]]:
    sizes = [(width, height)]
    while True:
        w, h = sizes[-1]
        if levels is None and max(w, h) < _MIN_LEVEL_SIZE:
            break
        if levels is not None and len(sizes) >= levels:
            break
        if min(w, h) < _LEVEL_FACTOR:
            break
        sizes.append((math.ceil(width / _LEVEL_FACTOR ** len(sizes)), math.ceil(height / _LEVEL_FACTOR ** len(sizes))))
    return sizes


def _encode(tile: np.ndarray) -> bytes:
    """JPEG exactly as tifffile writes RGB tiles with compression='jpeg' (YCbCr, 4:2:0)."""
    return imagecodecs.jpeg_encode(
        tile, level=_JPEG_QUALITY, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
    )


def _tiles(
    renderer: _Renderer,
    labels: np.ndarray,
    ds: int,
    level: int,
    size: tuple[int, int],
    tile: int,
    seed: int,
) -> Iterator[bytes]:
    """Encoded tiles of one level, row-major, as a deterministic function of (level, tx, ty, seed)."""
    factor = _LEVEL_FACTOR**level
    sub = 1 if factor <= 4 else 4  # supersampling per axis
    width, height = size
    mh, mw = labels.shape
    padded = np.zeros((mh + 1, mw + 1), dtype=np.uint8)  # an extra background row/column
    padded[:mh, :mw] = labels
    grain_rng = np.random.default_rng([seed, level, 0x6A41])
    grain = grain_rng.normal(0.0, 1.0, size=(tile, tile, 1)).astype(np.float32)
    bg_tile = np.clip(_BG_LEVEL + 1.2 * grain, 0, 255).round().astype(np.uint8)
    bg_tile = np.ascontiguousarray(np.broadcast_to(bg_tile, (tile, tile, 3)))
    bg_bytes = _encode(bg_tile)
    offs = (np.arange(tile * sub, dtype=np.float64) + 0.5) / sub
    for ty in range(math.ceil(height / tile)):
        ys = (ty * tile + offs) * factor
        rows = np.minimum(np.floor(ys / ds).astype(np.int64), mh)
        for tx in range(math.ceil(width / tile)):
            xs = (tx * tile + offs) * factor
            cols = np.minimum(np.floor(xs / ds).astype(np.int64), mw)
            if not padded[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].any():
                yield bg_bytes
                continue
            lab = padded[rows[:, None], cols[None, :]]
            img = renderer.paint(xs, ys, lab, factor / sub)
            if sub > 1:
                img = img.reshape(tile, sub, tile, sub, 3).mean(axis=(1, 3))
                lab = lab[sub // 2 :: sub, sub // 2 :: sub]
            amp = np.where(lab[..., None] == BACKGROUND, np.float32(1.2), np.float32(3.0))
            img = img + amp * grain
            yield _encode(np.clip(img, 0, 255).round().astype(np.uint8))


def make_synthetic_slide(
    path: str | Path,
    width: int = 6144,
    height: int = 4096,
    *,
    seed: int = 0,
    mpp: float = 0.5,
    tile: int = 256,
    tumor_fraction: float = 0.3,
    tissue_fraction: float = 0.45,
    levels: int | None = None,
    mask_downsample: int = 32,
    confounder_fraction: float = 0.0,
) -> SyntheticSlide:
    """Write a synthetic H&E-like pyramidal OME-TIFF at ``path`` plus its tumor and tissue masks.

    ``tumor_fraction`` is the share of the tissue that is tumor; ``tissue_fraction`` the share of the
    slide covered by tissue. ``levels`` fixes the number of pyramid levels (default: downsample 4
    per level until the smallest is under 2000 px). ``confounder_fraction`` > 0 adds a necrosis-like
third texture (see :func:`label_map`) and its mask ``<stem>.confounder.png``. All outputs are
written atomically.
    """
    path = Path(path)
    if width < 1 or height < 1:
        raise ZeusError(f"synthetic slide size must be positive, got {width} x {height}")
    if tile < 16 or tile % 16:
        raise ZeusError(f"tile size must be a positive multiple of 16, got {tile}")
    if not 0.0 < tissue_fraction <= 1.0:
        raise ZeusError(f"tissue_fraction must be in (0, 1], got {tissue_fraction}")
    if not 0.0 <= tumor_fraction < 1.0:
        raise ZeusError(f"tumor_fraction must be in [0, 1), got {tumor_fraction}")
    if not 0.0 <= confounder_fraction < 1.0:
        raise ZeusError(f"confounder_fraction must be in [0, 1), got {confounder_fraction}")
    if not mpp > 0:
        raise ZeusError(f"mpp must be positive, got {mpp}")
    if mask_downsample < 1:
        raise ZeusError(f"mask_downsample must be >= 1, got {mask_downsample}")
    if levels is not None and levels < 1:
        raise ZeusError(f"levels must be >= 1, got {levels}")

    labels = label_map(
        width, height, seed=seed, mask_downsample=mask_downsample,
        tissue_fraction=tissue_fraction, tumor_fraction=tumor_fraction, confounder_fraction=confounder_fraction,
    )
    stem = path.name.split(".")[0]
    tumor_path = path.with_name(f"{stem}.tumor.png")
    tissue_path = path.with_name(f"{stem}.tissue.png")
    conf_path = path.with_name(f"{stem}.confounder.png") if confounder_fraction > 0 else None

    renderer = _Renderer(seed)
    sizes = _level_sizes(width, height, levels)
    res = 1e4 / mpp  # pixels per centimetre
    common = dict(
        dtype=np.uint8, photometric="rgb", tile=(tile, tile), compression="jpeg",
        subsampling=(2, 2), resolutionunit="CENTIMETER",
    )
    bigtiff = width * height > 2**28
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=True) as tif:
            tif.write(
                _tiles(renderer, labels, mask_downsample, 0, sizes[0], tile, seed),
                shape=(height, width, 3),
                subifds=len(sizes) - 1,
                resolution=(res, res),
                metadata={
                    "axes": "YXS",
                    "Name": stem,
                    "PhysicalSizeX": mpp,
                    "PhysicalSizeXUnit": "µm",
                    "PhysicalSizeY": mpp,
                    "PhysicalSizeYUnit": "µm",
                },
                software="zeus-qupath synthetic",
                **common,
            )
            for level, (w, h) in enumerate(sizes[1:], start=1):
                tif.write(
                    _tiles(renderer, labels, mask_downsample, level, (w, h), tile, seed),
                    shape=(h, w, 3),
                    subfiletype=1,
                    resolution=(res * w / width, res * h / height),
                    **common,
                )
        with atomic_path(tumor_path) as tmp:
            Image.fromarray(np.where(labels == TUMOR, 255, 0).astype(np.uint8)).save(tmp, format="PNG")
        with atomic_path(tissue_path) as tmp:
            Image.fromarray(np.where(labels != BACKGROUND, 255, 0).astype(np.uint8)).save(tmp, format="PNG")
        if conf_path is not None:
            with atomic_path(conf_path) as tmp:
                Image.fromarray(np.where(labels == CONFOUNDER, 255, 0).astype(np.uint8)).save(tmp, format="PNG")
    return SyntheticSlide(
        path=path, tumor_mask_path=tumor_path, tissue_mask_path=tissue_path,
        mask_downsample=mask_downsample, width=width, height=height, mpp=mpp, confounder_mask_path=conf_path,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m zeus_qupath.samples.synthetic OUT.tif --width W --height H --seed S``."""
    p = argparse.ArgumentParser(
        prog="python -m zeus_qupath.samples.synthetic",
        description="Write a synthetic H&E-like pyramidal TIFF with known tumor/tissue masks.",
    )
    p.add_argument("out", type=Path, help="output .tif (masks go next to it as <stem>.tumor.png/.tissue.png)")
    p.add_argument("--width", type=int, default=6144)
    p.add_argument("--height", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mpp", type=float, default=0.5, help="micrometres per pixel at level 0")
    p.add_argument("--tumor-fraction", type=float, default=0.3, help="share of the tissue that is tumor")
    p.add_argument("--tissue-fraction", type=float, default=0.45, help="share of the slide that is tissue")
    p.add_argument("--tile", type=int, default=256)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        s = make_synthetic_slide(
            args.out, args.width, args.height, seed=args.seed, mpp=args.mpp, tile=args.tile,
            tumor_fraction=args.tumor_fraction, tissue_fraction=args.tissue_fraction,
        )
    except ZeusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {s.path} ({s.width} x {s.height} px, {s.mpp} um/px) with {s.tumor_mask_path.name} and "
        f"{s.tissue_mask_path.name} at 1/{s.mask_downsample} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
