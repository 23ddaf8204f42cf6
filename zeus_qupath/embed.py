"""Patch embeddings: the regions of a :class:`~zeus_qupath.reader.RegionStream` through one or more encoders.

Patches are cut as late as possible. On the CPU they are copied out of numpy window views of the
decoded region straight into a batch. On CUDA each decoded region travels to the device once, as
uint8 (16x fewer bytes than its overlapping 448 px patches at stride 112), and the patches are cut
there with ``unfold`` and a gather, then resized and normalised by the model's own
:class:`~zeus_qupath.models.base.ImagePreprocess` on the device. Results come back asynchronously:
batch *k*'s features are copied to the host while batch *k+1* is already queued on the device, so
the device never waits for Python between batches. With several encoders (an ensemble) each batch
is cut once and embedded by each of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .grid import PatchGeometry, PatchGrid
from .models.base import Encoder, autocast_dtype
from .reader import (
    PatchBatcher,
    ReadPlan,
    RegionRead,
    RegionStream,
    SlideEnd,
    SlideFailed,
    SlideStart,
    StreamEvent,
    patch_windows,
)

ProgressFn = Callable[[int], None]


def image_features(encoder: Encoder, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, D) float32 unit features on the encoder's device for a (B, H, W, 3) uint8 batch (any device)."""
    dtype = autocast_dtype(encoder.device, encoder.precision)
    with torch.inference_mode(), torch.autocast(encoder.device.type, dtype=dtype, enabled=dtype is not None):
        feats = encoder.image_features(encoder.preprocess(pixels, encoder.device))
        return F.normalize(feats.float(), dim=-1)


def cut_patches_torch(region: torch.Tensor, geometry: PatchGeometry, rows: torch.Tensor,
                      cols: torch.Tensor) -> torch.Tensor:
    """Patches (n, P, P, 3) uint8 at local cells (rows, cols) of an (H, W, 3) region tensor (on its device)."""
    p, s = geometry.patch_size, geometry.stride
    windows = region.unfold(0, p, s).unfold(1, p, s)  # (rows, cols, 3, P, P), a view
    return windows[rows, cols].permute(0, 2, 3, 1)  # one gather, laid out (n, P, P, 3) like the region


def pin_region(region: np.ndarray) -> torch.Tensor:
    """A decoded region in page-locked memory, so that its upload to the GPU is asynchronous."""
    return torch.from_numpy(region).pin_memory()


def wants_device_cut(encoders: Sequence[Encoder]) -> bool:
    return encoders[0].device.type == "cuda"


@dataclass
class SlideEmbedding:
    """The features of one slide's grid patches, per encoder index (grid order)."""

    plan: ReadPlan
    features: dict[int, np.ndarray]
    seconds: float
    patches: int
    kept: np.ndarray | None = None  # (N,) bool: not dropped as white/black (None: every patch); see PatchGrid.filtered


@dataclass
class _Current:
    plan: ReadPlan
    need: list[int]
    features: dict[int, np.ndarray]
    progress: ProgressFn | None
    t0: float
    batcher: PatchBatcher | None = None
    device_parts: list[tuple[np.ndarray, torch.Tensor]] = field(default_factory=list)
    device_count: int = 0
    kept: np.ndarray | None = None


@dataclass
class _InFlight:
    slide: _Current
    indices: np.ndarray
    host: list[tuple[int, torch.Tensor]]
    event: torch.cuda.Event | None


class StreamEncoder:
    """Turns stream events into :class:`SlideEmbedding` (or passes :class:`SlideFailed` through).

    ``needs(plan)`` says which encoders (indices) a slide needs (default: all; an empty list skips the
    model, e.g. when every feature came from the cache); ``progress(plan)`` makes a per-patch callback.
    ``cut_on_device`` (default: on CUDA) cuts patches from uploaded regions with torch instead of numpy.
    """

    def __init__(
        self,
        encoders: Sequence[Encoder],
        *,
        batch_size: int = 64,
        cut_on_device: bool | None = None,
        needs: Callable[[ReadPlan], Sequence[int]] | None = None,
        progress: Callable[[ReadPlan], ProgressFn | None] | None = None,
    ) -> None:
        if not encoders:
            raise ValueError("at least one encoder is needed")
        self.encoders = list(encoders)
        self.device = self.encoders[0].device
        self.batch_size = max(1, batch_size)
        self.cut_on_device = wants_device_cut(self.encoders) if cut_on_device is None else cut_on_device
        self._needs = needs or (lambda plan: range(len(self.encoders)))
        self._progress = progress or (lambda plan: None)
        self._inflight: _InFlight | None = None

    # -- batches ----------------------------------------------------------------------------------------
    def _encode(self, cur: _Current, indices: np.ndarray, pixels: np.ndarray | torch.Tensor) -> None:
        if self.device.type != "cuda":
            for i in cur.need:
                cur.features[i][indices] = image_features(self.encoders[i], pixels).cpu().numpy()
            if cur.progress:
                cur.progress(len(indices))
            return
        host = []
        for i in cur.need:
            feats = image_features(self.encoders[i], pixels)
            buf = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
            buf.copy_(feats, non_blocking=True)
            host.append((i, buf))
        event = torch.cuda.Event()
        event.record()
        self._resolve()  # the previous batch's results, while this one runs on the device
        self._inflight = _InFlight(cur, indices, host, event)

    def _resolve(self) -> None:
        job, self._inflight = self._inflight, None
        if job is None:
            return
        if job.event is not None:
            job.event.synchronize()
        for i, buf in job.host:
            job.slide.features[i][job.indices] = buf.numpy()
        if job.slide.progress:
            job.slide.progress(len(job.indices))

    def _device_batches(self, cur: _Current, final: bool = False) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        while cur.device_count >= self.batch_size or (final and cur.device_count):
            take = min(self.batch_size, cur.device_count)
            idx_parts, px_parts, got = [], [], 0
            while got < take:
                idx, px = cur.device_parts[0]
                n = min(take - got, len(idx))
                idx_parts.append(idx[:n])
                px_parts.append(px[:n])
                if n == len(idx):
                    cur.device_parts.pop(0)
                else:
                    cur.device_parts[0] = (idx[n:], px[n:])
                got += n
            cur.device_count -= take
            yield np.concatenate(idx_parts), px_parts[0] if len(px_parts) == 1 else torch.cat(px_parts)

    def _on_region(self, cur: _Current, event: RegionRead) -> None:
        grid: PatchGrid = cur.plan.grid
        geo = grid.geometry
        rows, cols = event.block.local_cells(grid)
        indices = event.block.indices
        if event.keep is not None:  # white/black patches (CLAM's filters): not embedded, dropped later
            if cur.kept is None:
                cur.kept = np.ones(len(grid), dtype=bool)
            cur.kept[indices[~event.keep]] = False
            drop = getattr(cur.progress, "drop", None)  # a bar that counts patches: they leave its total
            if drop is not None and (~event.keep).any():
                drop(int(np.count_nonzero(~event.keep)))
            indices, rows, cols = indices[event.keep], rows[event.keep], cols[event.keep]
            if not len(indices):
                return
        if not self.cut_on_device:
            windows = patch_windows(np.asarray(event.pixels), geo)
            for batch in cur.batcher.add(indices, windows, rows, cols):
                self._encode(cur, batch.indices, batch.pixels)
            return
        region = torch.as_tensor(event.pixels).to(self.device, non_blocking=True)
        cells = torch.from_numpy(np.stack([rows, cols]))
        if self.device.type == "cuda":  # a pageable upload would wait for the batches queued on the device
            cells = cells.pin_memory()
        rows_t, cols_t = cells.to(self.device, non_blocking=True)
        for start in range(0, len(rows), self.batch_size):
            sl = slice(start, start + self.batch_size)
            cur.device_parts.append((indices[sl], cut_patches_torch(region, geo, rows_t[sl], cols_t[sl])))
            cur.device_count += len(indices[sl])
            for indices, pixels in self._device_batches(cur):
                self._encode(cur, indices, pixels)

    def _finish(self, cur: _Current) -> SlideEmbedding:
        if cur.batcher is not None:
            for batch in cur.batcher.flush():
                self._encode(cur, batch.indices, batch.pixels)
        for indices, pixels in self._device_batches(cur, final=True):
            self._encode(cur, indices, pixels)
        self._resolve()
        return SlideEmbedding(cur.plan, cur.features, time.perf_counter() - cur.t0, len(cur.plan.grid), cur.kept)

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, events: Iterable[StreamEvent]) -> Iterator[SlideEmbedding | SlideFailed]:
        cur: _Current | None = None
        for event in events:
            if isinstance(event, SlideStart):
                plan = event.plan
                need = sorted(set(self._needs(plan)))
                n = len(plan.grid)
                cur = _Current(plan, need, {i: np.zeros((n, self.encoders[i].embed_dim), np.float32) for i in need},
                               self._progress(plan) if need and n else None, time.perf_counter(),
                               batcher=None if self.cut_on_device else PatchBatcher(self.batch_size, reuse=True))
                if not need and isinstance(events, RegionStream):
                    events.abandon(plan.key)  # nothing to embed: drop the reads (if any were planned)
                    embedding, cur = SlideEmbedding(plan, {}, 0.0, n), None
                    yield embedding
            elif isinstance(event, RegionRead):
                if cur is not None and event.plan.key == cur.plan.key:
                    self._on_region(cur, event)
            elif isinstance(event, SlideEnd):
                if cur is not None and event.plan.key == cur.plan.key:
                    embedding, cur = self._finish(cur), None
                    yield embedding
            elif isinstance(event, SlideFailed):
                if cur is not None and event.key == cur.plan.key:
                    self._resolve()
                    cur = None
                yield event
        self._resolve()


def embed_positions(
    slide_path: str,
    grid: PatchGrid,
    positions: np.ndarray,
    encoders: Sequence[Encoder],
    *,
    batch_size: int = 64,
    workers: int = 2,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Features of the grid patches at ``positions`` (one (len, D_i) array per encoder) and the white/black verdict.

    The verdict is a (len,) bool array (False: dropped by CLAM's filters, its rows are zeros) or None
    when every patch was kept. Used by adaptive sampling (:mod:`zeus_qupath.sampling`), one call per round.
    """
    sub = grid.take(np.asarray(positions, dtype=np.int64))
    if len(sub) == 0:
        return [np.zeros((0, e.embed_dim), np.float32) for e in encoders], None
    plan = ReadPlan.for_grid(0, slide_path, sub)
    stream = RegionStream([plan], workers=workers, transform=pin_region if wants_device_cut(encoders) else None)
    runner = StreamEncoder(encoders, batch_size=batch_size)
    try:
        for result in runner.run(stream):
            if isinstance(result, SlideFailed):
                raise result.error
            return [result.features[i] for i in range(len(encoders))], result.kept
    finally:
        stream.close()
    raise RuntimeError("the region stream ended without the slide")  # pragma: no cover
