"""Segment a slide, or a region of it, on request: the engine behind ``zeus serve``.

The steps are ``zeus segment``'s own: :func:`~zeus_qupath.segment.prepare_slide` (tissue and patch grid),
the embedding stream (:func:`embed_patches`, through :class:`~zeus_qupath.embed.StreamEncoder`), and
:func:`~zeus_qupath.outline.outline_patches` (scores, mask, polygons), with the same cache key
(:func:`~zeus_qupath.embedding_cache.slide_key`). What differs is reuse: the two-tier
:class:`~zeus_qupath.embedding_cache.EmbeddingCache` keeps each slide's features between requests, so
a request embeds only the patches that neither a previous request nor a ``zeus segment`` run with the
same cache folder embedded; models stay loaded in a :class:`~zeus_qupath.models.pool.ModelPool`.

A region (level-0 polygon) selects the grid patches whose area meets it; its mask is computed on a
window around it (see :mod:`zeus_qupath.outline`). ``max_patches`` caps the patches one request may
score, so that one request cannot occupy the machine for hours.

Sampling (``zeus serve --sampling``, or a request's own): ``exact`` embeds every patch of the request (the
region's, or the slide's); ``adaptive`` runs :func:`~zeus_qupath.sampling.sample_patches` over the request's
patches only (their coordinates and lattice indices, so cells at a region's edge are judged with the region's
patches, as the exact request judges them) and outlines the patches it chose. Its rounds embed through the
cache entry as any request does: patches another request embedded cost nothing, and the ones embedded stay
for the next request (an exact request on the same region then embeds only the rest). A request whose
patches are all in the cache already is answered exactly (nothing to save), as ``zeus segment`` does with
a complete cache entry.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from .adapter import Adapter, applied_identity
from .embed import StreamEncoder, pin_region, wants_device_cut
from .embedding_cache import EmbeddingCache, SlideEmbeddings, slide_key
from .errors import ZeusError
from .geometry import polygonal_or_empty
from .grid import PatchGrid
from .identity import StatGuard, file_fingerprint
from .models.base import Encoder
from .models.pool import LoadedModel, ModelPool
from .models.specs import ModelSpec
from .outline import SlideOutline, outline_patches, patches_in_region
from .params import SegmentParams, Threshold
from .polygons import tissue_geometry
from .prompts import PromptSet, load_prompts
from .reader import ReadPlan, RegionStream, SlideFailed
from .sampling import SCORE_DIFF_BOUND, SampledPatches, SamplingRule, adapter_diff_bound, sample_patches
from .scoring import slide_scores
from .segment import patch_geometry, prepare_slide
from .slide import Slide, SlideInfo

log = logging.getLogger(__name__)

SLIDE_MEMO_SIZE = 256


def embed_patches(path: Path, grid: PatchGrid, encoder: Encoder, params: SegmentParams,
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """(features in grid order, kept) of ``grid``'s patches, through ``zeus segment``'s reading and embedding stream.

    ``kept`` (None: all) marks the patches the reader's white/black filters let through.
    """
    plan = ReadPlan.for_grid(0, str(path), grid)
    stream = RegionStream([plan], workers=params.workers,
                          transform=pin_region if wants_device_cut([encoder]) else None)
    try:
        for result in StreamEncoder([encoder], batch_size=params.batch_size).run(stream):
            if isinstance(result, SlideFailed):
                raise result.error
            return result.features[0], result.kept
    finally:
        stream.close()
    raise RuntimeError("the region stream ended without the slide")  # pragma: no cover


class LimitError(ZeusError):
    """A request over one of the segmenter's compute limits."""


@dataclass(frozen=True)
class SegmentRequest:
    """One slide (and optionally a region of it, level-0 px) to segment with ``models`` and ``prompts``."""

    slide: Path
    models: tuple[ModelSpec, ...]
    prompts: str | Path
    positive_class: str | None = None
    threshold: Threshold | None = None  # None: the segmenter's default (its params' threshold)
    region: BaseGeometry | None = None
    adapter: Adapter | None = None  # zeus learn's adapter (one model): its scores replace the zero-shot ones
    sampling: str | None = None  # "exact" or "adaptive"; None: the segmenter's default (its params' sampling)


@dataclass
class SegmentResult:
    """The outline of a request, and what it cost."""

    outline: SlideOutline
    width: int
    height: int
    patches: int  # patches scored
    embedded: int  # patches embedded for this request (0 when the cache had every one)
    seconds: dict[str, float] = field(default_factory=dict)
    covered: int = 0  # grid patches the request covers (the region's, or the slide's)
    sampling: dict[str, Any] = field(default_factory=lambda: {"mode": "exact"})  # what the sampling rule did


class OnDemandSegmenter:
    """Segments requests with shared models and a shared two-tier embedding cache (thread-safe)."""

    def __init__(self, params: SegmentParams, cache: EmbeddingCache, models: ModelPool,
                 max_patches: int | None = None) -> None:
        self.params = params
        self.cache = cache
        self.models = models
        self.max_patches = max_patches
        self._slides: OrderedDict[tuple[object, ...], tuple[str, SlideInfo]] = OrderedDict()
        self._slides_lock = threading.Lock()

    def slide_identity(self, path: Path) -> tuple[str, SlideInfo]:
        """(content fingerprint, info) of a slide file, remembered while the file is unchanged."""
        real = os.path.realpath(path)
        try:  # the identity zeus segment checks (identity.StatGuard): any write to the file changes its ctime
            guard = StatGuard.of(Path(real))
        except OSError as exc:
            raise ZeusError(f"cannot read {Path(path).name}: {exc.strerror or exc}") from None
        memo = (real, guard, self.params.mpp)
        with self._slides_lock:
            hit = self._slides.get(memo)
            if hit is not None:
                self._slides.move_to_end(memo)
                return hit
        fingerprint = file_fingerprint(real)
        with Slide(real, mpp=self.params.mpp) as slide:
            info = slide.info
        with self._slides_lock:
            self._slides[memo] = (fingerprint, info)
            while len(self._slides) > SLIDE_MEMO_SIZE:
                self._slides.popitem(last=False)
        return fingerprint, info

    def slide_entry(self, path: Path, fingerprint: str, info: SlideInfo, model: LoadedModel) -> SlideEmbeddings:
        """The cache entry of this slide version and model (tissue and grid made once, as ``zeus segment`` does)."""
        params = self.params
        key = slide_key(fingerprint, model.identity.digest, model.precision, params, info.mpp)
        embed_dim = model.encoder.embed_dim

        def create() -> SlideEmbeddings:
            with Slide(path, mpp=params.mpp) as slide:
                prepared = prepare_slide(slide, params)
            return SlideEmbeddings(key, info.width, info.height, info.mpp, prepared.tissue, prepared.grid, embed_dim,
                                   tissue_outline=tissue_geometry(prepared.tissue))

        return self.cache.entry(key, info.width, info.height, embed_dim, patch_geometry(params, info.mpp), info.mpp,
                                create, outline=tissue_geometry)

    def embed_missing(self, path: Path, entry: SlideEmbeddings, indices: np.ndarray, model: LoadedModel) -> int:
        """Embed the patches among ``indices`` that the entry lacks; returns how many were embedded."""
        with entry.lock:
            missing = entry.missing(indices)
            if len(missing):
                with model.lock:
                    features, kept = embed_patches(path, entry.grid.take(missing), model.encoder, self.params)
                entry.store(missing, features, kept)
                self.cache.record_embedded(len(missing))
            self.cache.persist(entry)  # a slide embedded in full goes to disk, for the next run or restart
            return len(missing)

    def segment(self, request: SegmentRequest) -> SegmentResult:
        """Answer one request, embedding only what the cache lacks (and, sampling adaptively, what the rule needs)."""
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        rule = SamplingRule.parse(request.sampling or self.params.sampling)
        prompts = load_prompts(request.prompts, request.positive_class)
        models = [self.models.get(spec) for spec in request.models]
        if request.adapter is not None:  # checked before anything is embedded
            if len(models) != 1:
                raise ZeusError("an adapter applies to one model, not an ensemble")
            request.adapter.check(applied_identity(models[0].identity, models[0].precision, self.params, prompts))
        fingerprint, info = self.slide_identity(request.slide)
        region = None
        if request.region is not None:
            region = polygonal_or_empty(request.region.intersection(box(0, 0, info.width, info.height)))
            if region.is_empty or region.area <= 0:
                raise ZeusError(f"the region lies outside the image ({info.width} x {info.height} px)")
        entries = [self.slide_entry(request.slide, fingerprint, info, m) for m in models]
        first = entries[0]
        indices = patches_in_region(first.grid, region)
        if self.max_patches is not None and len(indices) > self.max_patches:
            raise LimitError(f"this request covers {len(indices)} patches, over the limit of {self.max_patches}; "
                             "select a smaller region (or start the service with a higher --max-patches)")
        for entry in entries:
            if len(entry.grid) != len(first.grid):
                raise ZeusError(f"{request.slide.name}: the models' cached patch grids differ; clear the cache")
        covered = len(indices)
        protos = [self.models.prototypes(m, prompts) for m in models]
        options: dict[str, Any] = {"model_specs": [m.spec.spec for m in models]}
        if request.adapter is not None:
            options["adapter"] = request.adapter
        seconds["prepare"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        sampling: dict[str, Any] = rule.to_dict()
        if rule.adaptive and covered and not self._all_cached(entries, indices):
            sampled, embedded = self._sample(request.slide, entries, models, indices, prompts, protos, options,
                                             info, rule)
            indices = indices[sampled.kept]
            features = [f[sampled.kept] for f in sampled.features]
            sampling = {**sampled.summary(rule), "embedded_now": embedded}
        else:
            if rule.adaptive:  # nothing to save: every patch of the request is cached
                sampling = {"mode": "exact", "requested": "adaptive",
                            "why": "every patch of the request was embedded already"}
            embedded = 0
            for entry, model in zip(entries, models, strict=True):
                embedded += self.embed_missing(request.slide, entry, indices, model)
            with first.lock:
                indices = first.scored(indices)  # without the patches the white/black filters dropped
            features = []
            for entry in entries:
                with entry.lock:
                    features.append(entry.features(indices))
        seconds["embed"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        outline = outline_patches(
            first.grid.coords[indices], features, [m.encoder for m in models], prompts, protos,
            geometry=first.grid.geometry, width=info.width, height=info.height, mpp=info.mpp, params=self.params,
            threshold=request.threshold or self.params.threshold, clip=first.tissue_outline, region=region,
            score_options=options,
            meta={"slide": request.slide.name, "model": ",".join(m.spec.spec for m in models)})
        seconds["polygons"] = time.perf_counter() - t2
        seconds["total"] = time.perf_counter() - t0
        how = (f"; adaptive sampling read {sampling['embedded']} of {covered}" if "embedded" in sampling else "")
        log.info("segment %s%s: %d patches (%d embedded now%s), %d regions, %.2f s", request.slide.name,
                 " (region)" if region is not None else "", len(indices), embedded, how, len(outline.polygons),
                 seconds["total"])
        return SegmentResult(outline, info.width, info.height, len(indices), embedded, seconds, covered, sampling)

    @staticmethod
    def _all_cached(entries: Sequence[SlideEmbeddings], indices: np.ndarray) -> bool:
        """Whether every entry has every patch of ``indices`` (embedded or dropped as white/black)."""
        for entry in entries:
            with entry.lock:
                if len(entry.missing(indices)):
                    return False
        return True

    def _sample(self, path: Path, entries: Sequence[SlideEmbeddings], models: Sequence[LoadedModel],
                indices: np.ndarray, prompts: PromptSet, protos: Sequence[np.ndarray], options: dict[str, Any],
                info: SlideInfo, rule: SamplingRule) -> tuple[SampledPatches, int]:
        """Adaptive sampling over the request's patches (grid positions ``indices``), embedding through the entries.

        Returns what the rule chose (positions relative to ``indices``) and how many patches were embedded now.
        """
        grid = entries[0].grid
        encoders = [m.encoder for m in models]
        count = 0

        def embed(positions: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
            nonlocal count
            at = indices[positions]
            for entry, model in zip(entries, models, strict=True):  # an ensemble: one embedding per model
                count += self.embed_missing(path, entry, at, model)
            keep = np.ones(len(at), dtype=bool)
            for entry in entries:  # white/black patches are dropped (slot -2), for every model alike
                with entry.lock:
                    keep &= np.isin(at, entry.scored(at))
            out = []
            for entry in entries:
                rows = np.zeros((len(at), entry.embed_dim), dtype=np.float32)
                with entry.lock:
                    rows[keep] = entry.features(at[keep])
                out.append(rows)
            return out, keep

        def score(features: Sequence[np.ndarray]) -> np.ndarray:
            return slide_scores(list(features), encoders, prompts, list(protos), **options)[0]

        adapter = options.get("adapter")
        positive = prompts.class_names.index(prompts.positive_class)
        bound = (SCORE_DIFF_BOUND if adapter is None else
                 adapter_diff_bound(adapter.weights, adapter.bias, positive))
        sampled = sample_patches(grid.coords[indices], grid.index[indices], patch_size=grid.geometry.patch_size_l0,
                                 stride=grid.geometry.stride_l0, width=info.width, height=info.height,
                                 classes=prompts.class_names, positive_class=prompts.positive_class, embed=embed,
                                 score=score, embed_dims=[e.embed_dim for e in entries], rule=rule, diff_bound=bound)
        return sampled, count
