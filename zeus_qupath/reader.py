"""Read each pixel about once: decode one region per block of grid cells, in background threads.

One ``read_region`` per patch (the CLAM/ZEUS way) decodes every pixel up to 16 times at 75 %
overlap. Here the grid is split into blocks of ``block_cells`` x ``block_cells`` patch positions;
each block's bounding region is read once (at the best pyramid level, resampled to the model's
pixel size) and its patches are cut from it later, as late as possible (numpy views on the CPU,
``unfold`` on the device, see :mod:`zeus_qupath.embed`).

:class:`RegionStream` reads the blocks of a *sequence* of slides with a pool of threads, each
with its own slide handle per slide (tiffslide/tifffile handles are not thread-safe). A producer
thread walks the slides (preparing the next one is the caller's iterator, run there) and submits
block reads; at most ``workers + prefetch`` decoded or in-flight regions exist at any time, so
memory is bounded by the queue, not by the slide. The next slide's blocks are submitted as soon as
the current slide's last blocks are, so its reading overlaps the end of the current one.
:class:`RegionReader` is the one-slide form that yields patch batches (numpy, uint8).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import SlideError
from .grid import PatchGeometry, PatchGrid, region_keep
from .slide import PLAIN_IMAGE_SUFFIXES, WHITE, Slide

DEFAULT_BLOCK_CELLS = 24


@dataclass(frozen=True)
class PatchBatch:
    """Patches ready for a model: ``pixels`` (B, P, P, 3) uint8 RGB; ``indices`` into the grid's rows."""

    indices: np.ndarray
    pixels: np.ndarray


@dataclass(frozen=True)
class Block:
    """A rectangle of grid cells read as one region; ``indices`` are positions in ``grid.index``."""

    indices: np.ndarray
    row0: int
    col0: int
    rows: int
    cols: int
    x0: int = 0  # level-0 origin of the cells' lattice (PatchGrid.origin; per-contour grids)
    y0: int = 0

    def local_cells(self, grid: PatchGrid) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of the block's patches relative to its top-left cell."""
        return grid.index[self.indices, 0] - self.row0, grid.index[self.indices, 1] - self.col0


_Block = Block  # the name used before blocks were public


def plan_blocks(grid: PatchGrid, block_cells: int = DEFAULT_BLOCK_CELLS) -> list[Block]:
    """The grid's patches grouped into blocks of at most ``block_cells`` x ``block_cells`` cells, row-major."""
    idx = grid.index
    if len(idx) == 0:
        return []
    b = max(1, block_cells)
    keys = (idx[:, 0] // b) * (grid.cols // b + 1) + idx[:, 1] // b
    origins = np.zeros((1, 2), np.int64)
    if grid.origin is not None:  # one set of blocks per lattice origin
        origins, lattice = np.unique(grid.origin, axis=0, return_inverse=True)
        keys = lattice.reshape(-1) * ((grid.rows // b + 1) * (grid.cols // b + 1)) + keys
    order = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    out = []
    for part in np.split(order, bounds):
        rows, cols = idx[part, 0], idx[part, 1]
        r0, c0 = int(rows.min()), int(cols.min())
        x0, y0 = (int(v) for v in (origins[0] if grid.origin is None else grid.origin[part[0]]))
        out.append(Block(part, r0, c0, int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1, x0, y0))
    return out


class _Unsupported(Exception):
    """This level or region is read through tiffslide instead."""


class TiledLevel:
    """One pyramid level read straight from its tiles: tifffile's own decoder, no region assembly layer.

    tiffslide (through zarr) decodes every tile on one event-loop thread shared by the whole process,
    so reading threads do not add up; decoding the tiles here, in the calling thread, scales with them.
    Only plain tiled uint8 RGB levels qualify; :class:`RegionSource` checks the pixels against tiffslide
    before it uses one.
    """

    def __init__(self, page: Any, fh: Any) -> None:
        if not page.is_tiled or page.dtype != np.uint8 or page.samplesperpixel != 3 or page.planarconfig != 1:
            raise _Unsupported("not a plain tiled RGB level")
        if getattr(page, "tiledepth", 1) != 1 or page.imagedepth != 1:
            raise _Unsupported("volumetric tiles")
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.across = -(-self.width // self.tile_w)
        self._decode = page.decode
        self._tables = page.jpegtables
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        self._fh = fh

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Level pixels [y0, y1) x [x0, x1), inside the level, as (H, W, 3) uint8."""
        tw, th = self.tile_w, self.tile_h
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                i = ty * self.across + tx
                count = int(self._counts[i])
                if count == 0:
                    raise _Unsupported("sparse tile")
                self._fh.seek(int(self._offsets[i]))
                tile = self._decode(self._fh.read(count), i, jpegtables=self._tables)[0]
                tile = tile.reshape(tile.shape[-3:]) if tile.ndim == 4 else tile
                ax0, ax1 = max(x0, tx * tw), min(x1, tx * tw + tw)
                ay0, ay1 = max(y0, ty * th), min(y1, ty * th + th)
                part = tile[ay0 - ty * th: ay1 - ty * th, ax0 - tx * tw: ax1 - tx * tw]
                if part.shape != (ay1 - ay0, ax1 - ax0, 3):
                    raise _Unsupported("unexpected tile shape")
                out[ay0 - y0: ay1 - y0, ax0 - x0: ax1 - x0] = part
        return out


class RegionSource:
    """A slide opened for region reads by one thread: :class:`Slide` for metadata and anything unusual,
    :class:`TiledLevel` for plain tiled RGB levels (same pixels, decoded in this thread)."""

    def __init__(self, path: str | Path, *, direct: bool = True) -> None:
        self.slide = Slide(path)
        self.path = Path(path)
        self._direct = direct and self.path.suffix.lower() not in PLAIN_IMAGE_SUFFIXES
        self._tf: Any = None
        self._fh: Any = None
        self._levels: dict[int, TiledLevel | None] = {}

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.slide.level_downsamples

    def best_level_for_downsample(self, downsample: float) -> int:
        return self.slide.best_level_for_downsample(downsample)

    def _open_level(self, level: int) -> TiledLevel | None:
        import tifffile

        try:
            if self._tf is None:
                self._tf = tifffile.TiffFile(self.path)
                self._fh = open(self.path, "rb")  # closed in close()
            series = self._tf.series[0]
            if series.axes != "YXS" or level >= len(series.levels) or len(series.levels[level].pages) != 1:
                return None
            lvl = series.levels[level]
            if (int(lvl.shape[1]), int(lvl.shape[0])) != self.slide.level_dimensions[level]:
                return None
            tiled = TiledLevel(lvl.keyframe, self._fh)
            # the same pixels as tiffslide, checked once on a window of the level's middle
            w, h = min(64, tiled.width), min(64, tiled.height)
            x, y = (tiled.width - w) // 2, (tiled.height - h) // 2
            ds = self.slide.level_downsamples[level]
            ref = self.slide.read_region(int(round(x * ds)), int(round(y * ds)), w, h, level=level)
            if not np.array_equal(self._region(tiled, level, int(round(x * ds)), int(round(y * ds)), w, h), ref):
                return None
            return tiled
        except Exception:
            return None

    def _region(self, tiled: TiledLevel, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        # exactly Slide.read_region's geometry, with tiffslide's level-coordinate rounding
        lw, lh = self.slide.level_dimensions[level]
        ds = self.slide.level_downsamples[level]
        lx, ly = int(x // ds), int(y // ds)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, lw), min(ly + height, lh)
        if x1 <= x0 or y1 <= y0:
            return np.full((height, width, 3), WHITE, dtype=np.uint8)
        rx0, ry0 = int(int(round(x0 * ds)) / ds), int(int(round(y0 * ds)) / ds)
        rx1, ry1 = min(rx0 + x1 - x0, lw), min(ry0 + y1 - y0, lh)
        arr = tiled.read(rx0, ry0, rx1, ry1)
        if arr.shape[:2] == (height, width):
            return arr
        out = np.full((height, width, 3), WHITE, dtype=np.uint8)
        out[y0 - ly: y0 - ly + arr.shape[0], x0 - lx: x0 - lx + arr.shape[1]] = arr
        return out

    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """The same pixels as :meth:`Slide.read_region` (level-0 coordinates, white outside the image)."""
        if self._direct:
            if level not in self._levels:
                self._levels[level] = self._open_level(level)
            tiled = self._levels[level]
            if tiled is not None:
                try:
                    return self._region(tiled, level, x, y, width, height)
                except _Unsupported:
                    pass
                except Exception as exc:
                    raise SlideError(f"cannot read {self.path.name} at ({x}, {y}) level {level}: "
                                     f"{type(exc).__name__}: {exc}") from exc
        return self.slide.read_region(x, y, width, height, level=level)

    def close(self) -> None:
        self.slide.close()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tf is not None:
            self._tf.close()
            self._tf = None


def read_block_region(slide: Slide | RegionSource, geometry: PatchGeometry, block: Block) -> np.ndarray:
    """The block's bounding region, decoded once, at the model's pixel size: (H, W, 3) uint8."""
    p, s = geometry.patch_size, geometry.stride
    region_w = (block.cols - 1) * s + p  # in model px
    region_h = (block.rows - 1) * s + p
    x0 = block.x0 + block.col0 * geometry.stride_l0
    y0 = block.y0 + block.row0 * geometry.stride_l0
    if geometry.scale == 1.0:
        return slide.read_region(x0, y0, region_w, region_h, level=0)
    level = slide.best_level_for_downsample(geometry.scale)
    ds = slide.level_downsamples[level]
    lw = int(round(region_w * geometry.scale / ds))
    lh = int(round(region_h * geometry.scale / ds))
    raw = slide.read_region(x0, y0, lw, lh, level=level)
    interp = cv2.INTER_AREA if geometry.scale / ds > 1 else cv2.INTER_CUBIC
    return cv2.resize(raw, (region_w, region_h), interpolation=interp)


def patch_windows(region: np.ndarray, geometry: PatchGeometry) -> np.ndarray:
    """Every patch position of a block region as a view (rows, cols, P, P, 3): nothing is copied."""
    p, s = geometry.patch_size, geometry.stride
    return sliding_window_view(region, (p, p, 3))[::s, ::s, 0]


# ---------------------------------------------------------------------------------------------- stream


@dataclass(frozen=True)
class ReadPlan:
    """One slide to read: its grid, the blocks to read, and whatever the caller attaches (``payload``)."""

    key: Hashable
    path: str
    grid: PatchGrid
    blocks: list[Block]
    payload: Any = None

    @classmethod
    def for_grid(cls, key: Hashable, path: str, grid: PatchGrid, *, block_cells: int = DEFAULT_BLOCK_CELLS,
                 payload: Any = None) -> ReadPlan:
        return cls(key, path, grid, plan_blocks(grid, block_cells), payload)


@dataclass(frozen=True)
class PlanFailure:
    """A slide that could not be planned (e.g. it does not open); passed through as :class:`SlideFailed`."""

    key: Hashable
    error: BaseException
    payload: Any = None


@dataclass(frozen=True)
class SlideStart:
    plan: ReadPlan


@dataclass(frozen=True)
class RegionRead:
    plan: ReadPlan
    block: Block
    pixels: Any  # (H, W, 3) uint8: numpy, or what the stream's ``transform`` made of it
    keep: np.ndarray | None = None  # per block.indices: not white/black (when plan.grid.pixel_filter)


@dataclass(frozen=True)
class SlideEnd:
    plan: ReadPlan


@dataclass(frozen=True)
class SlideFailed:
    key: Hashable
    error: BaseException
    payload: Any = None


StreamEvent = SlideStart | RegionRead | SlideEnd | SlideFailed


@dataclass
class _Handles:
    """Slide handles per (thread, slide key); closed when the slide is done."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    open: dict[tuple[int, Hashable], RegionSource] = field(default_factory=dict)
    direct: bool = True

    def get(self, plan: ReadPlan) -> RegionSource:
        k = (threading.get_ident(), plan.key)
        with self.lock:
            handle = self.open.get(k)
        if handle is None:
            handle = RegionSource(plan.path, direct=self.direct)
            with self.lock:
                self.open[k] = handle
        return handle

    def release(self, key: Hashable | None = None) -> None:
        with self.lock:
            keys = [k for k in self.open if key is None or k[1] == key]
            handles = [self.open.pop(k) for k in keys]
        for h in handles:
            h.close()


_DONE = object()


class RegionStream:
    """Decoded block regions of a sequence of slides, in order, with bounded read-ahead.

    Iterating yields, per slide, :class:`SlideStart`, its :class:`RegionRead` events in block order and
    :class:`SlideEnd`; or :class:`SlideFailed` (planning or reading failed; the slide's remaining
    reads are dropped) and then nothing more for that slide. ``plans`` is consumed in a background
    thread, so preparing the next slide overlaps the current one. ``transform`` runs in the reading
    threads on each decoded region (e.g. copy it into pinned memory for the GPU). ``direct=False``
    reads every region through tiffslide (see :class:`TiledLevel`).
    """

    def __init__(
        self,
        plans: Iterable[ReadPlan | PlanFailure],
        *,
        workers: int = 2,
        prefetch: int = 2,
        transform: Callable[[np.ndarray], Any] | None = None,
        direct: bool = True,
    ) -> None:
        self.workers = max(1, workers)
        self.prefetch = max(0, prefetch)
        self._plans = plans
        self._transform = transform
        self._queue: queue.Queue = queue.Queue(maxsize=self.workers + self.prefetch)
        self._stop = threading.Event()
        self._handles = _Handles(direct=direct)
        self._pool: ThreadPoolExecutor | None = None
        self._producer: threading.Thread | None = None
        self._abandoned: set[Hashable] = set()

    @property
    def max_regions(self) -> int:
        """Most regions decoded or being decoded at once (plus the one the consumer holds)."""
        return self.workers + self.prefetch + 1

    def _read(self, plan: ReadPlan, block: Block) -> tuple[Any, np.ndarray | None]:
        region = read_block_region(self._handles.get(plan), plan.grid.geometry, block)
        keep = None
        if plan.grid.pixel_filter:  # CLAM's white/black filters, on the pixels just decoded
            keep = region_keep(region, plan.grid.geometry, *block.local_cells(plan.grid))
        return (self._transform(region) if self._transform is not None else region), keep

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        assert self._pool is not None
        try:
            for item in self._plans:
                if self._stop.is_set():
                    return
                if isinstance(item, PlanFailure):
                    if not self._put(("failed", item)):
                        return
                    continue
                if not self._put(("start", item)):
                    return
                for block in item.blocks:
                    if self._stop.is_set():
                        return
                    fut = self._pool.submit(self._read, item, block)
                    if not self._put(("region", item, block, fut)):
                        fut.cancel()
                        return
                if not self._put(("end", item)):
                    return
        except BaseException as exc:  # a bug in the caller's plan iterator: re-raised in the consumer
            self._put(("crash", exc))
        finally:
            self._put((_DONE,))

    def abandon(self, key: Hashable) -> None:
        """Drop the remaining reads of slide ``key`` (the consumer failed on it); no SlideEnd follows."""
        self._abandoned.add(key)

    def __iter__(self) -> Iterator[StreamEvent]:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="zeus-read")
        self._producer = threading.Thread(target=self._produce, name="zeus-plan", daemon=True)
        self._producer.start()
        try:
            while True:
                item = self._queue.get()
                kind = item[0]
                if kind is _DONE:
                    return
                if kind == "crash":
                    raise item[1]
                if kind == "failed":
                    yield SlideFailed(item[1].key, item[1].error, item[1].payload)
                elif kind == "start":
                    yield SlideStart(item[1])
                elif kind == "region":
                    plan, block, fut = item[1], item[2], item[3]
                    if plan.key in self._abandoned:
                        _wait_quietly(fut)
                        continue
                    try:
                        pixels, keep = fut.result()
                    except Exception as exc:
                        self._abandoned.add(plan.key)
                        yield SlideFailed(plan.key, exc, plan.payload)
                        continue
                    yield RegionRead(plan, block, pixels, keep)
                    del pixels
                elif kind == "end":
                    plan = item[1]
                    self._handles.release(plan.key)
                    if plan.key in self._abandoned:
                        self._abandoned.discard(plan.key)
                        continue
                    yield SlideEnd(plan)
        finally:
            self.close()

    def close(self) -> None:
        """Stop reading, drop what was read ahead, close every slide handle."""
        self._stop.set()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item[0] == "region":
                item[3].cancel()
        if self._producer is not None:
            self._producer.join()
            self._producer = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._handles.release()


def _wait_quietly(fut: Future) -> None:
    try:
        fut.result()
    except BaseException:
        pass


# ---------------------------------------------------------------------------------------------- one slide


class RegionReader:
    """Iterates one slide's grid as patch batches, decoding each block's region once."""

    def __init__(
        self,
        slide_path: str,
        grid: PatchGrid,
        *,
        mpp: float | None = None,
        batch_size: int = 64,
        block_cells: int = DEFAULT_BLOCK_CELLS,
        workers: int = 2,
        prefetch: int = 2,
    ) -> None:
        self.slide_path = slide_path
        self.grid = grid
        self.mpp = mpp  # kept for callers; the pixels do not depend on it
        self.batch_size = max(1, batch_size)
        self.block_cells = max(1, block_cells)
        self.workers = max(1, workers)
        self.prefetch = max(0, prefetch)
        self._stream: RegionStream | None = None

    def blocks(self) -> list[Block]:
        return plan_blocks(self.grid, self.block_cells)

    def read_block(self, block: Block) -> tuple[Block, np.ndarray]:
        """Decode one block's region (with a handle of its own)."""
        with Slide(self.slide_path, mpp=self.mpp) as slide:
            return block, read_block_region(slide, self.grid.geometry, block)

    def __iter__(self) -> Iterator[PatchBatch]:
        plan = ReadPlan(0, self.slide_path, self.grid, self.blocks())
        self._stream = RegionStream([plan], workers=self.workers, prefetch=self.prefetch)
        batcher = PatchBatcher(self.batch_size)
        try:
            for event in self._stream:
                if isinstance(event, SlideFailed):
                    raise event.error
                if isinstance(event, RegionRead):
                    rows, cols = event.block.local_cells(self.grid)
                    indices = event.block.indices
                    if event.keep is not None:  # white/black patches are dropped (not yielded)
                        indices, rows, cols = indices[event.keep], rows[event.keep], cols[event.keep]
                    windows = patch_windows(event.pixels, self.grid.geometry)
                    yield from batcher.add(indices, windows, rows, cols)
            yield from batcher.flush()
        finally:
            self.close()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class PatchBatcher:
    """Copies patches out of window views straight into batches of ``batch_size`` (the last may be short).

    Each patch is copied once, into its batch; nothing is gathered per block first. With ``reuse`` every
    batch is the same buffer (no fresh pages to fault in per batch): for a consumer that is done with a
    batch before it asks for the next.
    """

    def __init__(self, batch_size: int, reuse: bool = False) -> None:
        self.batch_size = max(1, batch_size)
        self.reuse = reuse
        self._spare: np.ndarray | None = None
        self._buf: np.ndarray | None = None
        self._idx = np.zeros(self.batch_size, dtype=np.int64)
        self._pending = 0

    def add(self, indices: np.ndarray, windows: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> Iterator[PatchBatch]:
        """Patches ``windows[rows[i], cols[i]]`` (grid positions ``indices[i]``); yields each batch when full."""
        for i in range(len(indices)):
            if self._buf is None:
                shape = (self.batch_size, *windows.shape[2:])
                spare, self._spare = self._spare, None
                ok = spare is not None and spare.shape == shape and spare.dtype == windows.dtype
                self._buf = spare if ok else np.empty(shape, dtype=windows.dtype)
            self._buf[self._pending] = windows[rows[i], cols[i]]
            self._idx[self._pending] = indices[i]
            self._pending += 1
            if self._pending == self.batch_size:
                yield self._emit()

    def flush(self) -> Iterator[PatchBatch]:
        if self._pending:
            yield self._emit()

    def _emit(self) -> PatchBatch:
        assert self._buf is not None
        batch = PatchBatch(self._idx[: self._pending].copy(), self._buf[: self._pending])
        if self.reuse:
            self._spare = self._buf
        self._buf, self._pending = None, 0
        return batch
