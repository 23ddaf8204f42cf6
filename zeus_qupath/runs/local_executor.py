"""Segment a run's slides in this process: one streaming pipeline for all slides, the model never waiting.

A producer thread prepares slide after slide (opens it, looks its embeddings up in the cache, detects
tissue, plans the patch grid) and submits its block reads to the reading threads; the calling thread
embeds batches as regions arrive; a finishing thread scores, outlines and writes each slide, stores new
embeddings in the cache and writes the slide's state last. So the next slide is read while the current
one's last batches are embedded and while the previous one's polygons are drawn.
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
from ..feature_cache import CachedEmbeddings, CacheKey
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
    need: list[int]
    t0: float
    bar: Any = None
    sampled: list[np.ndarray] | None = None  # --sampling adaptive: features of the sampled grid (embedded already)
    sample_seconds: float = 0.0


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
                cached = [self.cache.load(k, info.width, info.height, e.embed_dim)
                          for k, e in zip(keys, self.m.encoders, strict=True)]
            hit = next((c for c in cached if c is not None), None)
            known = (hit.tissue, hit.grid(patch_geometry(params, info.mpp))) if hit is not None else None
            prepared = prepare_slide(slide, params, known=known, stem=job.entry.stem)
        need = [i for i in range(n) if cached[i] is None]
        return _Prepared(job, prepared, cached, keys, need, t0)

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
            grid = p.prepared.grid
            blocks = plan_blocks(grid, self.s.block_cells) if p.need and len(grid) and p.sampled is None else []
            yield ReadPlan(k, job.entry.path, grid, blocks, p)

    def _sample(self, p: _Prepared) -> None:
        """``--sampling adaptive``: embed, round after round, only the patches the rule needs (:mod:`..sampling`).

        Runs in the producer thread, before the slide is planned; the stream then has nothing to embed for it.
        Models whose features are cached (complete entries) give theirs; the others embed the chosen patches.
        """
        from ..embed import embed_positions
        from ..sampling import SCORE_DIFF_BOUND, SamplingRule, adapter_diff_bound, sample_patches
        from ..scoring import slide_scores

        t0 = time.perf_counter()
        prepared, encoders, params = p.prepared, self.m.encoders, self.s.params
        grid = prepared.grid
        run = [encoders[i] for i in p.need]

        def embed(positions: np.ndarray) -> tuple[list[np.ndarray], np.ndarray | None]:
            fresh, kept = embed_positions(prepared.path, grid, positions, run, batch_size=params.batch_size,
                                          workers=params.workers)
            by_model = dict(zip(p.need, fresh, strict=True))
            return [by_model[i] if i in by_model else p.cached[i].features[positions]  # type: ignore[union-attr]
                    for i in range(len(encoders))], kept

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
                                pending_filter=grid.pixel_filter, diff_bound=bound)
        if grid.pixel_filter and result.embedded.any() and not result.kept.any():
            prepared.warnings.append(f"{Path(prepared.path).name}: no tissue found (every patch read is white or "
                                     "black); writing an empty FeatureCollection")
        prepared.grid = grid.take(result.kept).filtered(None)
        prepared.sampling = result.summary(rule)
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
        n = len(self.m.encoders)
        prepared = p.prepared
        if p.sampled is not None:  # adaptive sampling embedded (and filtered) them already
            features = p.sampled
        else:
            features = [p.cached[i].features if p.cached[i] is not None else embedding.features[i] for i in range(n)]
            features = drop_filtered(prepared, features, embedding.kept)  # white/black patches (fresh grids only)
        grid = prepared.grid
        if self.cache is not None and p.keys is not None and p.sampled is None:  # complete entries only
            for i in p.need:
                self.cache.store(p.keys[i], CachedEmbeddings(features[i], grid.index, grid.rows, grid.cols,
                                                             grid.width, grid.height, prepared.tissue, grid.origin))
        report = finish_slide(prepared, features, self.m.encoders, self.m.prompts, self.m.prototypes,
                              self.s.params, self.s.out_dir, self.s.meta,
                              {"embed": embedding.seconds + p.sample_seconds},
                              score_options=self.m.score_options)
        report.seconds["total"] = round(time.perf_counter() - p.t0, 3)
        report.cache = "off" if self.cache is None else ("hit" if not p.need else
                                                         "miss" if len(p.need) == n else "partial")
        self.store.record(p.job.entry.stem, p.job.state_hash, p.job.fingerprint, report, self.s.parameters)
        return report

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
    return [] if p.sampled is not None else p.need


def run_local(jobs: Sequence[SlideJob], settings: RunSettings, models: RunModels) -> Iterator[Outcome]:
    """Segment ``jobs`` in this process (see :class:`LocalPipeline`)."""
    yield from LocalPipeline(settings, models).run(jobs)
