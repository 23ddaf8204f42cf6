"""Read each pixel about once: decode one region per block of grid cells, cut its patches in memory.

One ``read_region`` per patch (the CLAM/ZEUS way) decodes every pixel up to 16 times at 75 %
overlap. Here the grid is split into blocks of ``block_cells`` x ``block_cells`` patch positions;
each block's bounding region is read once (at the best pyramid level, resampled to the model's
pixel size) and its patches are views into it. Blocks are decoded by background threads, each
with its own slide handle (tiffslide/tifffile handles are not thread-safe), with a bounded
prefetch so that decoding overlaps the model.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .grid import PatchGrid
from .slide import Slide


@dataclass(frozen=True)
class PatchBatch:
    """Patches ready for a model: ``pixels`` (B, P, P, 3) uint8 RGB; ``indices`` into the grid's rows."""

    indices: np.ndarray
    pixels: np.ndarray


@dataclass(frozen=True)
class _Block:
    indices: np.ndarray  # positions in grid.index
    row0: int
    col0: int
    rows: int
    cols: int


class RegionReader:
    """Iterates a grid's patches as batches, decoding each block's region once."""

    def __init__(
        self,
        slide_path: str,
        grid: PatchGrid,
        *,
        mpp: float | None = None,
        batch_size: int = 64,
        block_cells: int = 24,
        workers: int = 2,
        prefetch: int = 2,
    ) -> None:
        self.slide_path = slide_path
        self.grid = grid
        self.mpp = mpp
        self.batch_size = max(1, batch_size)
        self.block_cells = max(1, block_cells)
        self.workers = max(1, workers)
        self.prefetch = max(1, prefetch)
        self._local = threading.local()
        self._handles: list[Slide] = []
        self._lock = threading.Lock()

    def blocks(self) -> list[_Block]:
        idx = self.grid.index
        if len(idx) == 0:
            return []
        b = self.block_cells
        keys = (idx[:, 0] // b) * (self.grid.cols // b + 1) + idx[:, 1] // b
        order = np.argsort(keys, kind="stable")
        bounds = np.flatnonzero(np.diff(keys[order])) + 1
        out = []
        for part in np.split(order, bounds):
            rows, cols = idx[part, 0], idx[part, 1]
            r0, c0 = int(rows.min()), int(cols.min())
            out.append(_Block(part, r0, c0, int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1))
        return out

    def _slide(self) -> Slide:
        handle = getattr(self._local, "slide", None)
        if handle is None:
            handle = Slide(self.slide_path, mpp=self.mpp)
            self._local.slide = handle
            with self._lock:
                self._handles.append(handle)
        return handle

    def read_block(self, block: _Block) -> tuple[_Block, np.ndarray]:
        """Decode the block's bounding region once, at the model's pixel size."""
        geo = self.grid.geometry
        p, s = geo.patch_size, geo.stride
        region_w = (block.cols - 1) * s + p  # in model px
        region_h = (block.rows - 1) * s + p
        x0 = block.col0 * geo.stride_l0
        y0 = block.row0 * geo.stride_l0
        slide = self._slide()
        if geo.scale == 1.0:
            return block, slide.read_region(x0, y0, region_w, region_h, level=0)
        level = slide.best_level_for_downsample(geo.scale)
        ds = slide.level_downsamples[level]
        lw = int(round(region_w * geo.scale / ds))
        lh = int(round(region_h * geo.scale / ds))
        raw = slide.read_region(x0, y0, lw, lh, level=level)
        interp = cv2.INTER_AREA if geo.scale / ds > 1 else cv2.INTER_CUBIC
        return block, cv2.resize(raw, (region_w, region_h), interpolation=interp)

    def _patches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices, patches) pieces, each at most one batch long, in block order."""
        geo = self.grid.geometry
        p, s = geo.patch_size, geo.stride
        blocks = iter(self.blocks())
        with ThreadPoolExecutor(self.workers, thread_name_prefix="zeus-read") as pool:
            queue: deque[Future[tuple[_Block, np.ndarray]]] = deque()
            try:
                for block in blocks:
                    queue.append(pool.submit(self.read_block, block))
                    if len(queue) >= self.workers + self.prefetch:
                        break
                while queue:
                    block, region = queue.popleft().result()
                    nxt = next(blocks, None)
                    if nxt is not None:
                        queue.append(pool.submit(self.read_block, nxt))
                    windows = sliding_window_view(region, (p, p, 3))[::s, ::s, 0]  # views, no copy
                    rows = self.grid.index[block.indices, 0] - block.row0
                    cols = self.grid.index[block.indices, 1] - block.col0
                    for i in range(0, len(rows), self.batch_size):
                        sl = slice(i, i + self.batch_size)
                        yield block.indices[sl], windows[rows[sl], cols[sl]]
            finally:
                for fut in queue:
                    fut.cancel()

    def __iter__(self) -> Iterator[PatchBatch]:
        idx_parts: list[np.ndarray] = []
        px_parts: list[np.ndarray] = []
        pending = 0
        try:
            for indices, pixels in self._patches():
                while len(indices):
                    take = min(self.batch_size - pending, len(indices))
                    idx_parts.append(indices[:take])
                    px_parts.append(pixels[:take])
                    indices, pixels = indices[take:], pixels[take:]
                    pending += take
                    if pending == self.batch_size:
                        yield PatchBatch(np.concatenate(idx_parts), np.concatenate(px_parts))
                        idx_parts, px_parts, pending = [], [], 0
            if pending:
                yield PatchBatch(np.concatenate(idx_parts), np.concatenate(px_parts))
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            for handle in self._handles:
                handle.close()
            self._handles.clear()
