"""Slide access: whole-slide images through tiffslide, plain RGB images through Pillow.

``Slide`` is a small read-only surface in level-0 pixel coordinates. Regions always come back as
``uint8`` RGB arrays of the requested size; RGBA is composited on white, greyscale is repeated,
and areas outside the image are filled with white (background, never mistaken for tissue).
"""

from __future__ import annotations

import errno
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import SlideError

PLAIN_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")  # read through Pillow, the others through tiffslide
# every file suffix zeus reads, compound ones first (stripping the first that matches leaves the stem)
SLIDE_SUFFIXES = (".ome.tiff", ".ome.tif", ".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff",
                  *PLAIN_IMAGE_SUFFIXES)
QUPATH_ONLY_SUFFIXES = (".mrxs", ".vsi", ".czi")  # slides QuPath opens (OpenSlide, Bio-Formats) and zeus does not
WHITE = 255


@dataclass(frozen=True)
class SlideInfo:
    """What the rest of the pipeline needs to know about a slide."""

    path: str
    width: int
    height: int
    mpp: float | None  # micrometres per level-0 pixel; None when unknown
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    vendor: str


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """Convert a decoded array (H, W[, C]) of any common layout to uint8 RGB."""
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        elif arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        else:
            raise SlideError(f"unsupported pixel type {arr.dtype} (expected 8-bit RGB)")
    if arr.ndim == 2:
        arr = arr[..., None]
    channels = arr.shape[2]
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 2:  # grey + alpha
        grey, alpha = arr[..., :1].astype(np.uint16), arr[..., 1:2].astype(np.uint16)
        comp = (grey * alpha + WHITE * (255 - alpha)) // 255
        return np.repeat(comp.astype(np.uint8), 3, axis=2)
    if channels == 4:
        rgb, alpha = arr[..., :3].astype(np.uint16), arr[..., 3:4].astype(np.uint16)
        return ((rgb * alpha + WHITE * (255 - alpha)) // 255).astype(np.uint8)
    if channels == 3:
        return arr
    raise SlideError(f"unsupported channel count {channels} (expected RGB)")


def check_slide_file(path: Path) -> None:
    """A slide must be a regular file: a FIFO or a device would block or never end (one-line SlideError)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SlideError(f"slide not found: {path}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SlideError(f"{path}: a symbolic link loop, not a slide") from None
        raise SlideError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SlideError(f"not a file: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise SlideError(f"{path}: not a regular file (a pipe, socket or device cannot be a slide)")


MAX_PIXELS_PER_BYTE = 10_000  # level 0 declares at most this many px per byte of image data the file holds


def check_tiff_tables(path: Path) -> None:
    """Refuse a TIFF whose header declares more than the file holds (one-line :class:`SlideError`).

    Every level's tile (or strip) table must list a tile for each tile its size declares, every tile must lie
    inside the file, and level 0 must hold at least one byte of image data per ``MAX_PIXELS_PER_BYTE`` px
    it declares (a white 256^2 px JPEG tile holds about one per 100). All of it is read from the header.
    """
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.series:
                return
            levels = tf.series[0].levels
            for n, level in enumerate(levels):
                data = 0
                for page in level.pages:
                    if page is None or not hasattr(page, "dataoffsets"):
                        continue
                    keyframe = page.keyframe
                    offsets, counts = page.dataoffsets, page.databytecounts
                    width, length = int(keyframe.imagewidth), int(keyframe.imagelength)
                    if keyframe.is_tiled:
                        tw, tl = int(keyframe.tilewidth), int(keyframe.tilelength)
                        expected = math.ceil(width / max(tw, 1)) * math.ceil(length / max(tl, 1))
                    else:
                        rows = int(getattr(keyframe, "rowsperstrip", 0) or length)
                        expected = math.ceil(length / max(min(rows, length), 1)) if length else 0
                    if int(keyframe.planarconfig) == 2:
                        expected *= int(keyframe.samplesperpixel)
                    what = "tiles" if keyframe.is_tiled else "strips"
                    if len(offsets) < expected:
                        raise SlideError(f"{path.name}: level {n} declares {width} x {length} px in {expected:,} "
                                         f"{what}, but its table lists {len(offsets):,}: a damaged or crafted file")
                    ends = [o + c for o, c in zip(offsets, counts, strict=False) if c]
                    if ends and max(ends) > size:
                        raise SlideError(f"{path.name}: level {n} has {what} beyond the end of the "
                                         f"{size:,}-byte file (a truncated copy?)")
                    data += int(sum(counts))
                if n == 0:
                    shape = level.shape
                    axes = level.axes
                    pixels = int(shape[axes.index("Y")]) * int(shape[axes.index("X")]) \
                        if "Y" in axes and "X" in axes else 0
                    if pixels > MAX_PIXELS_PER_BYTE * max(data, 1):
                        raise SlideError(f"{path.name}: declares {pixels:,} px but holds only {data:,} bytes of "
                                         f"image data: a damaged or crafted file")
    except SlideError:
        raise
    except Exception:  # tifffile cannot parse it: tiffslide says why
        return


class Slide:
    """A read-only slide. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None) -> None:
        self.path = Path(path)
        check_slide_file(self.path)
        self._ts = None
        self._image: np.ndarray | None = None
        suffix = self.path.suffix.lower()
        try:
            if suffix in PLAIN_IMAGE_SUFFIXES:
                self._open_plain()
            else:
                self._open_tiffslide()
        except SlideError:
            raise
        except Exception as exc:  # any decoder failure is the slide's fault, not a bug
            raise SlideError(f"cannot open slide {self.path.name}: {_reason(exc)}") from exc
        if mpp is not None:
            if not (math.isfinite(mpp) and mpp > 0):
                raise SlideError(f"--mpp must be a positive number, got {mpp}")
            self._mpp = float(mpp)

    # -- opening ---------------------------------------------------------------------------
    def _open_plain(self) -> None:
        Image.MAX_IMAGE_PIXELS = None  # plain exports are ZEUS's own input; size is the user's choice
        with Image.open(self.path) as im:
            im.load()
            self._image = _to_rgb(np.asarray(im))
        h, w = self._image.shape[:2]
        self._dims: tuple[tuple[int, int], ...] = ((w, h),)
        self._downsamples: tuple[float, ...] = (1.0,)
        self._mpp = None
        self._vendor = "plain-image"

    def _open_tiffslide(self) -> None:
        import tiffslide

        check_tiff_tables(self.path)  # a header that lies would otherwise cost hours, or end "no tissue"
        ts = tiffslide.TiffSlide(self.path)
        self._ts = ts
        self._dims = tuple((int(w), int(h)) for w, h in ts.level_dimensions)
        self._downsamples = tuple(float(d) for d in ts.level_downsamples)
        if ts.properties.get("tiffslide.series-axes") not in ("YXS", "YX", "CYX"):
            raise SlideError(f"unsupported image layout {ts.properties.get('tiffslide.series-axes')}")
        mpp = ts.properties.get("tiffslide.mpp-x")
        self._mpp = float(mpp) if mpp and math.isfinite(float(mpp)) and float(mpp) > 0 else None
        self._vendor = str(ts.properties.get("tiffslide.vendor") or "generic-tiff")
        # decode the smallest level now: a truncated or corrupt file fails here, before any work
        w, h = self._dims[-1]
        self.read_region(0, 0, min(w, 64), min(h, 64), level=len(self._dims) - 1)

    # -- properties ------------------------------------------------------------------------
    @property
    def info(self) -> SlideInfo:
        return SlideInfo(
            path=str(self.path),
            width=self._dims[0][0],
            height=self._dims[0][1],
            mpp=self._mpp,
            level_dimensions=self._dims,
            level_downsamples=self._downsamples,
            vendor=self._vendor,
        )

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._dims[0]

    @property
    def mpp(self) -> float | None:
        return self._mpp

    @property
    def level_count(self) -> int:
        return len(self._dims)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    def best_level_for_downsample(self, downsample: float) -> int:
        """The level with the largest downsample not above ``downsample`` (OpenSlide's rule)."""
        best = 0
        for i, d in enumerate(self._downsamples):
            if d <= downsample * (1 + 1e-6):
                best = i
        return best

    # -- pixels ----------------------------------------------------------------------------
    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """RGB uint8 array (height, width, 3) of the region whose top-left is (x, y) in level-0 px.

        ``width``/``height`` are in pixels of ``level``. Parts outside the image are white.
        """
        lw, lh = self._dims[level]
        ds = self._downsamples[level]
        lx, ly = int(x // ds), int(y // ds)
        out = np.full((height, width, 3), WHITE, dtype=np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, lw), min(ly + height, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            if self._image is not None:
                arr = self._image[y0:y1, x0:x1]
            else:
                assert self._ts is not None
                arr = self._ts.read_region(
                    (int(round(x0 * ds)), int(round(y0 * ds))), level, (x1 - x0, y1 - y0), as_array=True, padding=False
                )
                arr = _to_rgb(np.asarray(arr))
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(f"cannot read {self.path.name} at ({x}, {y}) level {level}: {_reason(exc)}") from exc
        out[y0 - ly : y0 - ly + arr.shape[0], x0 - lx : x0 - lx + arr.shape[1]] = arr
        return out

    def read_downsampled(self, downsample: float, block: int = 4096) -> np.ndarray:
        """The whole slide at about ``downsample`` (level-0 px per output px), from the best level.

        The level is read in blocks of ``block`` px and each block is shrunk on its own, so memory
        stays proportional to the output, even for a slide without a pyramid.
        """
        import cv2  # here: opening a slide (export, publish) does not need OpenCV

        level = self.best_level_for_downsample(downsample)
        lw, lh = self._dims[level]
        ds_level = self._downsamples[level]
        out_w = max(1, int(round(self._dims[0][0] / downsample)))
        out_h = max(1, int(round(self._dims[0][1] / downsample)))
        fx, fy = out_w / lw, out_h / lh  # output px per level px
        out = np.full((out_h, out_w, 3), WHITE, dtype=np.uint8)
        for by in range(0, lh, block):
            for bx in range(0, lw, block):
                bw, bh = min(block, lw - bx), min(block, lh - by)
                ox0, oy0 = int(round(bx * fx)), int(round(by * fy))
                ox1, oy1 = int(round((bx + bw) * fx)), int(round((by + bh) * fy))
                if ox1 <= ox0 or oy1 <= oy0:
                    continue
                arr = self.read_region(int(round(bx * ds_level)), int(round(by * ds_level)), bw, bh, level=level)
                if (ox1 - ox0, oy1 - oy0) != (bw, bh):
                    arr = cv2.resize(arr, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
                out[oy0:oy1, ox0:ox1] = arr
        return out

    def close(self) -> None:
        if self._ts is not None:
            self._ts.close()
            self._ts = None
        self._image = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
