"""Segment a run's slides in this process: one streaming pipeline for all slides, the model never waiting.

A producer thread prepares slide after slide (opens it, looks its embeddings up in the cache, detects
tissue, plans the patch grid) and submits its block reads to the reading threads; the calling thread
embeds batches as regions arrive; a finishing thread scores, outlines and writes each slide, stores new
embeddings in the cache and writes the slide's state last. So the next slide is read while the current
one's last batches are embedded and while the previous one's polygons are drawn.

The cache (``--cache``) may hold, per model, a complete entry or a partial one (what an adaptive run
embedded, :mod:`..feature_cache`). A slide's patches are then those of the entry (no tissue detection),
and only the patches some model still lacks are read and embedded: all of them left for an exact run,
which then stores complete entries; those the rule asks for for an adaptive run, which stores the
union of what was cached and what it embedded (partial, or complete once nothing is missing).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..embed import SlideEmbedding, StreamEncoder, pin_region, wants_device_cut
from ..embedding_cache import EmbeddingCache, slide_key
from ..feature_cache import DROPPED, KEPT, MISSING, CachedEmbeddings, CacheKey
from ..grid import PatchGeometry, PatchGrid
from ..identity import effective_precision
from ..models.ensemble import RunModels
from ..outputs import SlideReport
from ..reader import PlanFailure, ReadPlan, RegionStream, SlideFailed, plan_blocks
from ..segment import (
    PreparedSlide,
    drop_filtered,
    finish_slide,
    patch_geometry,
    prepare_slide,
)
from ..slide import Slide
from .jobs import Outcome, RunSettings, SlideJob, failure_outcome
from .state import StateStore

MAX_PENDING_FINISH = 2


@dataclass
class _Prepared:
    job: SlideJob
    prepared: PreparedSlide
    cached: list[CachedEmbeddings | None]
    keys: list[CacheKey] | None
    need: list[int]  # the models that lack features of some patch (the ones that run)
    t0: float
    base: PatchGrid  # the slide's grid before the white/black filters (or a complete entry's grid)
    slots: list[np.ndarray]  # per model, per base patch: row in its cached features, -1 missing, -2 dropped
    dropped: np.ndarray  # (N,) bool: base patches some cached entry knows to be white or black
    todo: np.ndarray  # base positions that some model in ``need`` lacks (an exact run embeds these)
    bar: Any = None
    sampled: list[np.ndarray] | None = None  # --sampling adaptive: features of the sampled grid (embedded already)
    sample: Any = None  # --sampling adaptive: the SampledPatches (over ``base``)
    fresh: np.ndarray | None = None  # --sampling adaptive: (N,) bool, the base patches this run read
    sample_seconds: float = 0.0

    @property
    def write(self) -> list[int]:
        """The models whose cache entry was missing or partial (their entries are stored after the run)."""
        return [i for i, c in enumerate(self.cached) if c is None or not c.complete]


class _PatchBar:
    """A slide's progress bar: embedded patches count up; white/black patches left out leave the total, so that
    the bar ends at the patch count the run reports."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def drop(self, n: int) -> None:
        self.bar.total = max(0, self.bar.total - n)
        self.bar.refresh()


class LocalPipeline:
    """Segments slides in this process with overlapping stages (see the module docstring)."""

    def __init__(self, settings: RunSettings, models: RunModels) -> None:
        self.s = settings
        self.m = models
        self.store = StateStore(settings.out_dir)
        # a cohort reads each slide once: the disk tier only (the service adds a memory tier in front of it)
        self.cache = EmbeddingCache(Path(settings.cache_dir), max_entries=0) if settings.cache_dir else None
        self.precisions = [effective_precision(e) for e in models.encoders]

    def _prepare(self, job: SlideJob) -> _Prepared:
        t0 = time.perf_counter()
        params, n = self.s.params, len(self.m.encoders)
        self.store.begin(job.entry.stem)
        with Slide(job.entry.path, mpp=job.entry.mpp or params.mpp) as slide:
            info = slide.info
            keys = None
            cached: list[CachedEmbeddings | None] = [None] * n
            if self.cache is not None:
                keys = [slide_key(job.fingerprint, ident.digest, prec, params, info.mpp)
                        for ident, prec in zip(self.m.identities, self.precisions, strict=True)]
                cached = [self.cache.load(k, info.width, info.height, e.embed_dim, partial=True)
                          for k, e in zip(keys, self.m.encoders, strict=True)]
            found = [c for c in cached if c is not None]
            hit = next((c for c in found if c.complete), found[0] if found else None)  # a complete grid first
            geometry = patch_geometry(params, info.mpp)
            known = (hit.tissue, hit.grid(geometry)) if hit is not None else None
            prepared = prepare_slide(slide, params, known=known, stem=job.entry.stem)
        base = prepared.grid
        slots = [_align(c, base, geometry) for c in cached]
        dropped = np.zeros(len(base), dtype=bool)
        for s in slots:
            dropped |= s == -2
        lacks = [(s == -1) & ~dropped for s in slots]
        need = [i for i in range(n) if lacks[i].any()]
        todo = np.flatnonzero(np.any([lacks[i] for i in need], axis=0)) if need else np.zeros(0, np.int64)
        return _Prepared(job, prepared, cached, keys, need, t0, base, slots, dropped, todo)

    def _plans(self, jobs: Sequence[SlideJob]) -> Iterator[ReadPlan | PlanFailure]:
        for k, job in enumerate(jobs):
            t0 = time.perf_counter()
            try:
                p = self._prepare(job)
                if self.s.params.sampling == "adaptive" and p.need and len(p.prepared.grid):
                    self._sample(p)
            except Exception as exc:
                yield PlanFailure(k, exc, (job, t0))
                continue
            grid, blocks = p.prepared.grid, []
            if p.sampled is None and len(p.todo):  # only the patches some model lacks
                grid = grid if len(p.todo) == len(grid) else grid.take(p.todo)
                blocks = plan_blocks(grid, self.s.block_cells)
            yield ReadPlan(k, job.entry.path, grid, blocks, p)

    def _sample(self, p: _Prepared) -> None:
        """``--sampling adaptive``: embed, round after round, only the patches the rule needs (:mod:`..sampling`).

        Runs in the producer thread, before the slide is planned; the stream then has nothing to embed for it.
        A patch whose features every model has in the cache (complete or partial entries), or that the cache
        knows to be white or black, is served from there; the models that lack any of the others embed those.
        """
        from ..embed import embed_positions
        from ..sampling import SCORE_DIFF_BOUND, SamplingRule, adapter_diff_bound, sample_patches
        from ..scoring import slide_scores

        t0 = time.perf_counter()
        prepared, encoders, params = p.prepared, self.m.encoders, self.s.params
        grid = prepared.grid
        run = [encoders[i] for i in p.need]
        have_all = np.all([s >= 0 for s in p.slots], axis=0)
        p.fresh = np.zeros(len(grid), dtype=bool)

        def embed(positions: np.ndarray) -> tuple[list[np.ndarray], np.ndarray | None]:
            positions = np.asarray(positions, dtype=np.int64)
            kept = ~p.dropped[positions]  # white/black patches the cache knows are not read again
            read = kept & ~have_all[positions]
            got: dict[int, np.ndarray] = {}
            if read.any():
                fresh, fresh_kept = embed_positions(prepared.path, grid, positions[read], run,
                                                    batch_size=params.batch_size, workers=params.workers)
                got = dict(zip(p.need, fresh, strict=True))
                if fresh_kept is not None:
                    kept[read] = fresh_kept
                p.fresh[positions[read]] = True  # type: ignore[index]
            out = []
            for i, encoder in enumerate(encoders):
                rows = p.slots[i][positions]
                f = np.zeros((len(positions), encoder.embed_dim), dtype=np.float32)
                have = rows >= 0
                if have.any():
                    f[have] = p.cached[i].features[rows[have]]  # type: ignore[union-attr]
                if i in got:  # this model's fresh rows, where its cache lacks them
                    f[read & ~have] = got[i][~have[read]]
                out.append(f)
            return out, kept

        def score(features: Sequence[np.ndarray]) -> np.ndarray:
            return slide_scores(list(features), encoders, self.m.prompts, self.m.prototypes,
                                **self.m.score_options)[0]

        rule = SamplingRule(params.sampling)
        adapter = self.m.score_options.get("adapter")
        positive = self.m.prompts.class_names.index(self.m.prompts.positive_class)
        bound = SCORE_DIFF_BOUND if adapter is None else adapter_diff_bound(adapter.weights, adapter.bias, positive)
        result = sample_patches(grid.coords, grid.index, patch_size=grid.geometry.patch_size_l0,
                                stride=grid.geometry.stride_l0, width=grid.width, height=grid.height,
                                classes=self.m.prompts.class_names, positive_class=self.m.prompts.positive_class,
                                embed=embed, score=score, embed_dims=[e.embed_dim for e in encoders], rule=rule,
                                diff_bound=bound)
        if grid.pixel_filter and result.embedded.any() and not result.kept.any():
            prepared.warnings.append(f"{Path(prepared.path).name}: no tissue found (every patch read is white or "
                                     "black); writing an empty FeatureCollection")
        prepared.grid = grid.take(result.kept).filtered(None)
        # "embedded": the patches the rule used; "from_cache": those of them this run did not read
        prepared.sampling = {**result.summary(rule), "from_cache": int(np.count_nonzero(result.embedded & ~p.fresh))}
        p.sample = result
        p.sampled = [f[result.kept] for f in result.features]
        p.sample_seconds = time.perf_counter() - t0

    def _progress(self, plan: ReadPlan) -> Any:
        p: _Prepared = plan.payload
        if not self.s.progress:
            return None
        p.bar = tqdm(total=len(plan.grid), desc=p.job.entry.stem, unit="patch", file=sys.stderr,
                     dynamic_ncols=True, leave=False, position=1)
        return _PatchBar(p.bar)

    def _finish(self, p: _Prepared, embedding: SlideEmbedding) -> SlideReport:
        prepared = p.prepared
        if p.sampled is not None:  # adaptive sampling embedded (and filtered) them already
            features = p.sampled
            fresh = int(np.count_nonzero(p.fresh))
            reused = int(np.count_nonzero(p.sample.kept & ~p.fresh))
            if self.cache is not None and p.keys is not None:
                for i in p.write:
                    entry = _sampled_entry(p, i)
                    if entry is not None:
                        self.cache.store(p.keys[i], entry)
        else:
            features, kept = self._merge(p, embedding)
            features = drop_filtered(prepared, features, None if kept.all() else kept)  # white/black patches
            fresh = len(p.todo)
            reused = int(np.count_nonzero(kept)) - int(np.count_nonzero(kept[p.todo]))
            grid = prepared.grid
            if self.cache is not None and p.keys is not None:
                for i in p.write:
                    self.cache.store(p.keys[i], CachedEmbeddings(features[i], grid.index, grid.rows, grid.cols,
                                                                 grid.width, grid.height, prepared.tissue,
                                                                 grid.origin))
        report = finish_slide(prepared, features, self.m.encoders, self.m.prompts, self.m.prototypes,
                              self.s.params, self.s.out_dir, self.s.meta,
                              {"embed": embedding.seconds + p.sample_seconds},
                              score_options=self.m.score_options)
        report.seconds["total"] = round(time.perf_counter() - p.t0, 3)
        found = any(c is not None for c in p.cached)
        report.cache = "off" if self.cache is None else ("miss" if not found else "hit" if not fresh else "partial")
        report.cache_reused = reused if found else 0
        if found:  # the rate of this run's own embedding, not of the patches the cache gave
            embed_s = report.seconds.get("embed", 0.0)
            report.patches_per_s = round(fresh / embed_s, 1) if fresh and embed_s > 0 else 0.0
        self.store.record(p.job.entry.stem, p.job.state_hash, p.job.fingerprint, report, self.s.parameters)
        return report

    def _merge(self, p: _Prepared, embedding: SlideEmbedding) -> tuple[list[np.ndarray], np.ndarray]:
        """Per model, the features of every base patch (cached rows first, then the ones just embedded), and
        which base patches are kept (not white or black)."""
        n_base = len(p.base)
        kept = ~p.dropped
        if len(p.todo) and embedding.kept is not None:
            kept[p.todo] = embedding.kept
        out = []
        for i, encoder in enumerate(self.m.encoders):
            rows, cached = p.slots[i], p.cached[i]
            if cached is not None and len(cached.features) == n_base and np.array_equal(rows, np.arange(n_base)):
                out.append(cached.features)  # every patch cached, in grid order
                continue
            if i in embedding.features and len(p.todo) == n_base and not np.any(rows >= 0):
                out.append(embedding.features[i])  # nothing cached: the stream's array as it is
                continue
            f = np.zeros((n_base, encoder.embed_dim), dtype=np.float32)
            have = rows >= 0
            if have.any():
                f[have] = cached.features[rows[have]]  # type: ignore[union-attr]
            if i in embedding.features:
                lacks = rows[p.todo] == -1
                f[p.todo[lacks]] = embedding.features[i][lacks]
            out.append(f)
        return out, kept

    def run(self, jobs: Sequence[SlideJob]) -> Iterator[Outcome]:
        """Segment ``jobs``; yields one :class:`Outcome` per slide as it completes."""
        if not jobs:
            return
        if self.cache is not None:
            self.cache.clean_stale()
        encoders = self.m.encoders
        stream = RegionStream(self._plans(jobs), workers=self.s.params.workers, prefetch=self.s.prefetch,
                              transform=pin_region if wants_device_cut(encoders) else None)
        runner = StreamEncoder(encoders, batch_size=self.s.params.batch_size,
                               needs=_stream_needs, progress=self._progress)
        finisher = ThreadPoolExecutor(1, thread_name_prefix="zeus-finish")
        pending: deque[tuple[_Prepared, Future[SlideReport]]] = deque()

        def collect(block: bool) -> Iterator[Outcome]:
            while pending and (block or pending[0][1].done() or len(pending) > MAX_PENDING_FINISH):
                p, fut = pending.popleft()
                try:
                    yield Outcome(p.job, report=fut.result())
                except Exception as exc:
                    yield failure_outcome(p.job, exc, p.t0)

        try:
            for result in runner.run(stream):
                if isinstance(result, SlideFailed):
                    if isinstance(result.payload, _Prepared):
                        p = result.payload
                        if p.bar is not None:
                            p.bar.close()
                        yield failure_outcome(p.job, result.error, p.t0)
                    else:
                        job, t0 = result.payload
                        yield failure_outcome(job, result.error, t0)
                else:
                    p = result.plan.payload
                    if p.bar is not None:
                        p.bar.close()
                    pending.append((p, finisher.submit(self._finish, p, result)))
                yield from collect(block=False)
            yield from collect(block=True)
        finally:
            stream.close()
            finisher.shutdown(wait=True)


def _stream_needs(plan: ReadPlan) -> list[int]:
    """The models the stream runs on a slide: none once adaptive sampling embedded it (or the cache had it)."""
    p: _Prepared = plan.payload
    return [] if p.sampled is not None or not len(p.todo) else p.need


def _align(cached: CachedEmbeddings | None, base: PatchGrid, geometry: PatchGeometry) -> np.ndarray:
    """(N,) int64 per patch of ``base``: its row in ``cached.features``, -1 when it has none, -2 when ``cached``
    knows it is white or black (matched by patch position when the entry's grid is another one)."""
    n = len(base)
    if cached is None:
        return np.full(n, -1, dtype=np.int64)
    own = cached.slots()
    grid = cached.grid(geometry)
    if len(grid) == n and np.array_equal(grid.coords, base.coords):
        return own
    where = {xy: i for i, xy in enumerate(map(tuple, grid.coords.tolist()))}
    at = np.array([where.get(xy, -1) for xy in map(tuple, base.coords.tolist())], dtype=np.int64)
    return np.where(at >= 0, own[np.maximum(at, 0)], -1) if n else np.zeros(0, np.int64)


def _sampled_entry(p: _Prepared, i: int) -> CachedEmbeddings | None:
    """Model ``i``'s cache entry after adaptive sampling: what it had plus what the rule embedded (partial, or
    complete when nothing is missing); None when the run learnt nothing new about its patches."""
    result, rows, cached = p.sample, p.slots[i], p.cached[i]
    before = np.where(rows >= 0, KEPT, np.where(rows == -2, DROPPED, MISSING)).astype(np.int8)
    state = before.copy()
    state[p.dropped | (result.embedded & ~result.kept)] = DROPPED
    state[result.kept] = KEPT
    if np.array_equal(state, before):
        return None
    keep = np.flatnonzero(state == KEPT)
    features = np.zeros((len(keep), result.features[i].shape[1]), dtype=np.float32)
    own = rows[keep] >= 0
    if own.any():
        features[own] = cached.features[rows[keep][own]]  # type: ignore[union-attr]
    features[~own] = result.features[i][keep[~own]]
    return CachedEmbeddings.from_state(p.base, p.prepared.tissue, state, features)


def run_local(jobs: Sequence[SlideJob], settings: RunSettings, models: RunModels) -> Iterator[Outcome]:
    """Segment ``jobs`` in this process (see :class:`LocalPipeline`)."""
    yield from LocalPipeline(settings, models).run(jobs)
