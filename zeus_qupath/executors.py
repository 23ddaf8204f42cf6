"""Where a cohort's slides run: this process (a streaming pipeline) or Ray tasks. Same outputs and state.

Local: one pipeline for all slides. A producer thread prepares slide after slide (opens it, looks its
embeddings up in the cache, detects tissue, plans the patch grid) and submits its block reads to
the reading threads; the calling thread embeds batches as regions arrive; a finishing thread scores,
outlines and writes each slide, stores new embeddings in the cache and writes the slide's state
last. So the next slide is read while the current one's last batches are embedded and while the
previous one's polygons are drawn: the model does not wait between slides.

Ray: each slide is a Ray task (one GPU per task when the cluster has GPUs, else one CPU) that runs
the same local pipeline on its slide, writing the same outputs, cache entries and state files (the
output folder must be shared by the workers). Ray is optional (``pip install ray``); a local Ray
instance listens on the loopback interface only.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .cohort import SlideEntry, SlideFailure, StateStore
from .embed import SlideEmbedding, StreamEncoder, pin_region, wants_device_cut
from .embedding_cache import EmbeddingCache, slide_key
from .errors import ZeusError
from .feature_cache import CachedEmbeddings, CacheKey
from .identity import effective_precision
from .models.ensemble import RunModels, load_run_models
from .models.specs import ModelSpec
from .reader import DEFAULT_BLOCK_CELLS, PlanFailure, ReadPlan, RegionStream, SlideFailed, plan_blocks
from .segment import (
    PreparedSlide,
    SegmentParams,
    SlideReport,
    drop_filtered,
    finish_slide,
    patch_geometry,
    prepare_slide,
)
from .slide import Slide

MAX_PENDING_FINISH = 2


@dataclass(frozen=True)
class RunSettings:
    """Everything a worker needs to segment slides exactly like the run that planned them (picklable)."""

    models: tuple[ModelSpec, ...]
    prompts: str
    positive_class: str | None
    out_dir: str
    params: SegmentParams
    device: str = "auto"
    precision: str = "auto"
    cache_dir: str | None = None  # None: no embedding cache
    prefetch: int = 2
    block_cells: int = DEFAULT_BLOCK_CELLS
    progress: bool = True
    screening_k: int | None = None  # KEEP's prompt screening: keep each model's top-k prompt classifiers per slide
    meta: dict[str, Any] = field(default_factory=dict)  # recorded in every scores file
    parameters: dict[str, Any] = field(default_factory=dict)  # recorded in every state file


def load_settings_models(settings: RunSettings) -> RunModels:
    """The models ``settings`` name, loaded on its device (see :func:`~zeus_qupath.models.ensemble.load_run_models`)."""
    return load_run_models(settings.models, settings.prompts, settings.positive_class, settings.device,
                           settings.precision, settings.screening_k)


@dataclass(frozen=True)
class SlideJob:
    """One slide to segment, its content fingerprint and the state hash its outputs will be recorded with."""

    entry: SlideEntry
    fingerprint: str
    state_hash: str


@dataclass
class Outcome:
    """A slide's result: a report, or a failure (and, in this process, the exception behind it)."""

    job: SlideJob
    report: SlideReport | None = None
    failure: SlideFailure | None = None
    error: BaseException | None = None


def reason(exc: BaseException) -> str:
    """One line for a failed slide (the ZeusError's message, else the exception's first line)."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return text if isinstance(exc, ZeusError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def _failure(job: SlideJob, exc: BaseException, t0: float) -> Outcome:
    fail = SlideFailure(job.entry.path, job.entry.stem, reason(exc), type(exc).__name__,
                        round(time.perf_counter() - t0, 3))
    return Outcome(job, failure=fail, error=exc)


@dataclass
class _Prepared:
    job: SlideJob
    prepared: PreparedSlide
    cached: list[CachedEmbeddings | None]
    keys: list[CacheKey] | None
    need: list[int]
    t0: float
    bar: Any = None


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
            except Exception as exc:
                yield PlanFailure(k, exc, (job, t0))
                continue
            grid = p.prepared.grid
            blocks = plan_blocks(grid, self.s.block_cells) if p.need and len(grid) else []
            yield ReadPlan(k, job.entry.path, grid, blocks, p)

    def _progress(self, plan: ReadPlan) -> Any:
        p: _Prepared = plan.payload
        if not self.s.progress:
            return None
        p.bar = tqdm(total=len(plan.grid), desc=p.job.entry.stem, unit="patch", file=sys.stderr,
                     dynamic_ncols=True, leave=False, position=1)
        return p.bar.update

    def _finish(self, p: _Prepared, embedding: SlideEmbedding) -> SlideReport:
        n = len(self.m.encoders)
        prepared = p.prepared
        features = [p.cached[i].features if p.cached[i] is not None else embedding.features[i] for i in range(n)]
        features = drop_filtered(prepared, features, embedding.kept)  # white/black patches (fresh grids only)
        grid = prepared.grid
        if self.cache is not None and p.keys is not None:
            for i in p.need:
                self.cache.store(p.keys[i], CachedEmbeddings(features[i], grid.index, grid.rows, grid.cols,
                                                             grid.width, grid.height, prepared.tissue, grid.origin))
        report = finish_slide(prepared, features, self.m.encoders, self.m.prompts, self.m.prototypes,
                              self.s.params, self.s.out_dir, self.s.meta, {"embed": embedding.seconds},
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
                               needs=lambda plan: plan.payload.need, progress=self._progress)
        finisher = ThreadPoolExecutor(1, thread_name_prefix="zeus-finish")
        pending: deque[tuple[_Prepared, Future[SlideReport]]] = deque()

        def collect(block: bool) -> Iterator[Outcome]:
            while pending and (block or pending[0][1].done() or len(pending) > MAX_PENDING_FINISH):
                p, fut = pending.popleft()
                try:
                    yield Outcome(p.job, report=fut.result())
                except Exception as exc:
                    yield _failure(p.job, exc, p.t0)

        try:
            for result in runner.run(stream):
                if isinstance(result, SlideFailed):
                    if isinstance(result.payload, _Prepared):
                        p = result.payload
                        if p.bar is not None:
                            p.bar.close()
                        yield _failure(p.job, result.error, p.t0)
                    else:
                        job, t0 = result.payload
                        yield _failure(job, result.error, t0)
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


def run_local(jobs: Sequence[SlideJob], settings: RunSettings, models: RunModels) -> Iterator[Outcome]:
    """Segment ``jobs`` in this process (see :class:`LocalPipeline`)."""
    yield from LocalPipeline(settings, models).run(jobs)


# ---------------------------------------------------------------------------------------------- Ray


def _ray_segment(settings: RunSettings, job: SlideJob) -> Outcome:
    """A Ray task: load the models, segment one slide with the local pipeline, return its outcome."""
    from dataclasses import replace

    settings = replace(settings, progress=False)
    t0 = time.perf_counter()
    try:
        models = load_settings_models(settings)
        outcome = next(iter(run_local([job], settings, models)))
    except Exception as exc:
        outcome = _failure(job, exc, t0)
    outcome.error = None  # exceptions stay in the worker; the failure's reason travels
    return outcome


def _init_ray(address: str | None) -> tuple[Any, bool]:
    """Connect to ``address`` or start a local instance on the loopback interface; (ray, started)."""
    if address is None:
        # Ray picks a routable address unless told this is a single-machine instance
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise ZeusError("--executor ray needs Ray: pip install 'zeus-qupath[ray]' (or pip install ray)") from None
    if ray.is_initialized():
        return ray, False
    ray_log = logging.getLogger("ray")
    level = ray_log.level
    ray_log.setLevel(logging.ERROR)  # Ray's start-up notices are not the user's business
    # the environment switch above is read when Ray is imported; if it was imported earlier, set its value
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    cluster_switch = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if address is None and cluster_switch:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        if address is None:
            ray.init(num_cpus=min(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as exc:
        raise ZeusError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {reason(exc)}") from exc
    finally:
        ray_log.setLevel(level)
        if address is None and cluster_switch:
            constants.ENABLE_RAY_CLUSTER = cluster_switch
    return ray, True


def run_ray(jobs: Sequence[SlideJob], settings: RunSettings, address: str | None = None) -> Iterator[Outcome]:
    """Segment ``jobs`` as Ray tasks (one GPU each when the cluster has GPUs); outcomes as they complete."""
    if not jobs:
        return
    ray, started = _init_ray(address)
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0)) > 0
        task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=0)(_ray_segment)
        refs = {task.remote(settings, job): job for job in jobs}
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                job = refs.pop(ready[0])
                try:
                    yield ray.get(ready[0])
                except Exception as exc:  # the worker died (e.g. out of memory): the slide failed
                    yield Outcome(job, failure=SlideFailure(job.entry.path, job.entry.stem, reason(exc),
                                                            type(exc).__name__))
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()
