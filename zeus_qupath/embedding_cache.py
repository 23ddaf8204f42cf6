"""One embedding cache, two tiers: slides' patch features in memory (an LRU) in front of the folder on disk.

Both tiers use one key, :class:`~zeus_qupath.feature_cache.CacheKey` (the slide's content fingerprint,
the model's identity, the precision it ran in, the patch geometry and the tissue setting), so
``zeus segment --cache DIR`` and ``zeus serve --cache DIR`` fill and read the same entries: a slide the
command line embedded is served without embedding, and a slide the service embedded in full is on disk
for the next run.

The memory tier holds :class:`SlideEmbeddings`: a slide's grid, tissue mask and the features of the
patches embedded *so far*, so a region request embeds only the patches it lacks and a later request
only the rest. An entry whose every patch is embedded is written to the disk tier once; the service's
partial entries live in memory only. A partial disk entry (what ``zeus segment --sampling adaptive``
wrote) is read into the memory tier as such, so a request embeds only what it lacks; the command line
reads it through :meth:`EmbeddingCache.load` with ``partial=True``. Memory follows the number of
embedded patches, never the slide's pixels.
The tier is bounded by a number of entries and a byte budget (least recently used first); with room
for no entry (``max_entries=0``, what a cohort run uses) only the disk tier is used.

Thread safety: the cache's own lock guards its bookkeeping; each entry has a lock that whoever fills
it holds, so two requests never embed the same patch twice. ``embedded_patches`` counts every patch
embedded through :meth:`EmbeddingCache.record_embedded` (tests read it to prove that nothing was embedded).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from shapely.geometry.base import BaseGeometry

from .feature_cache import DROPPED, KEPT, MISSING, CachedEmbeddings, CacheKey, FeatureCache
from .grid import PatchGeometry, PatchGrid
from .params import SegmentParams
from .segment import patch_geometry
from .tissue import TissueMask

DEFAULT_MAX_ENTRIES = 16
DEFAULT_MAX_BYTES = 2 * 1024**3


@dataclass
class SlideEmbeddings:
    """One slide's grid and the features of the patches embedded so far, for one model.

    ``slots[i]`` is the row of grid patch ``i`` in the feature store, -1 while it is not embedded, or
    -2 when reading it showed a white or black patch (CLAM's filters, applied by the reader as
    ``zeus segment`` applies them): such a patch is neither scored nor stored.
    Mutate only while holding ``lock``.
    """

    key: CacheKey
    width: int
    height: int
    mpp: float | None
    tissue: TissueMask
    grid: PatchGrid
    embed_dim: int
    tissue_outline: BaseGeometry | None = None  # the tissue mask as polygons (level-0 px), to clip results
    on_disk: bool = False  # the disk tier holds this entry's features
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    slots: np.ndarray = field(init=False, repr=False)
    _store: np.ndarray = field(init=False, repr=False)
    _filled: int = field(init=False, default=0)
    _dropped: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.slots = np.full(len(self.grid), -1, dtype=np.int64)
        self._store = np.zeros((0, self.embed_dim), dtype=np.float32)

    @classmethod
    def from_cached(cls, key: CacheKey, cached: CachedEmbeddings, geometry: PatchGeometry, mpp: float | None,
                    tissue_outline: BaseGeometry | None = None) -> SlideEmbeddings:
        """An entry from a disk-tier entry: complete, or partial (its missing patches stay to embed; once they
        are, :meth:`EmbeddingCache.persist` writes the complete entry)."""
        entry = cls(key, cached.width, cached.height, mpp, cached.tissue, cached.grid(geometry),
                    int(cached.features.shape[1]), tissue_outline=tissue_outline, on_disk=cached.complete)
        entry.slots = cached.slots()
        entry._store = np.ascontiguousarray(cached.features, dtype=np.float32)
        entry._filled = int(cached.features.shape[0])
        entry._dropped = int(np.count_nonzero(entry.slots == -2))
        return entry

    @property
    def embedded(self) -> int:
        """How many of the grid's patches have features."""
        return self._filled

    @property
    def complete(self) -> bool:
        """Every patch is embedded (or dropped by the white/black filters)."""
        return self._filled + self._dropped == len(self.grid)

    @property
    def nbytes(self) -> int:
        """Memory held for features and bookkeeping (the grid's index and slots, the tissue mask)."""
        return int(self._store.nbytes + self.slots.nbytes + self.grid.index.nbytes + self.tissue.mask.nbytes)

    def missing(self, indices: np.ndarray) -> np.ndarray:
        """The grid positions among ``indices`` that have no features yet."""
        indices = np.asarray(indices, dtype=np.int64)
        return indices[self.slots[indices] == -1]

    def scored(self, indices: np.ndarray) -> np.ndarray:
        """The grid positions among ``indices`` that have features (not missing, not dropped)."""
        indices = np.asarray(indices, dtype=np.int64)
        return indices[self.slots[indices] >= 0]

    def store(self, indices: np.ndarray, features: np.ndarray, kept: np.ndarray | None = None) -> None:
        """Keep ``features`` (len(indices), D) for grid positions ``indices`` (already-set ones are overwritten).

        ``kept`` (bool per index, None: all) marks the patches the white/black filters let through; the
        others are recorded as dropped.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if features.shape != (len(indices), self.embed_dim):
            raise ValueError(f"features must be ({len(indices)}, {self.embed_dim}), got {features.shape}")
        if kept is not None and not np.all(kept):
            gone = indices[~kept]
            self._dropped += int(np.sum(self.slots[gone] == -1))
            self.slots[gone] = -2
            indices, features = indices[kept], features[kept]
        new = self.slots[indices] == -1
        n_new = int(new.sum())
        need = self._filled + n_new
        if need > self._store.shape[0]:
            capacity = min(len(self.grid), max(need, 2 * self._store.shape[0], 256))
            grown = np.zeros((capacity, self.embed_dim), dtype=np.float32)
            grown[: self._filled] = self._store[: self._filled]
            self._store = grown
        self.slots[indices[new]] = np.arange(self._filled, need, dtype=np.int64)
        self._filled = need
        self._store[self.slots[indices]] = features.astype(np.float32, copy=False)

    def features(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), D) float32 features of grid positions that are all embedded."""
        rows = self.slots[np.asarray(indices, dtype=np.int64)]
        if np.any(rows < 0):
            raise KeyError("some patches are not embedded yet")
        return self._store[rows]

    def to_cached(self, partial: bool = False) -> CachedEmbeddings:
        """The disk-tier form (the kept patches' features, in grid order), as ``zeus segment`` stores it: of a
        complete entry, or with ``partial`` of any entry (partial while some patch is missing)."""
        if not self.complete and not partial:
            raise ValueError("only a complete entry goes to disk")
        kept = self.slots >= 0
        state = np.where(kept, KEPT, np.where(self.slots == -2, DROPPED, MISSING)).astype(np.int8)
        return CachedEmbeddings.from_state(self.grid, self.tissue, state, self._store[self.slots[kept]])


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    hits: int  # memory tier
    disk_hits: int
    misses: int  # neither tier had the slide
    evictions: int
    embedded_patches: int
    folder: str | None


def slide_key(fingerprint: str, model_digest: str, precision: str, params: SegmentParams,
              mpp: float | None) -> CacheKey:
    """The key of one slide's features for one model under ``params`` (what both tiers and both commands use)."""
    return CacheKey.make(fingerprint, model_digest, precision, patch_geometry(params, mpp), params.target_mpp,
                         params.tissue if params.detect_tissue else False)


def usable(cached: CachedEmbeddings | None, width: int, height: int, embed_dim: int) -> CachedEmbeddings | None:
    """``cached`` when it fits a slide of this size and a model of this width, else None."""
    if cached is None:
        return None
    rows = len(cached.index) if cached.state is None else int(np.count_nonzero(cached.state == KEPT))
    ok = (cached.width, cached.height) == (width, height) and cached.features.shape == (rows, embed_dim)
    return cached if ok else None


class EmbeddingCache:
    """The two tiers: an LRU of :class:`SlideEmbeddings` in memory, a :class:`FeatureCache` folder on disk (or none)."""

    def __init__(self, folder: str | Path | None, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("the memory tier's limits must not be negative")
        self.disk = FeatureCache(Path(folder)) if folder is not None else None
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, SlideEmbeddings] = OrderedDict()
        self._lock = threading.Lock()
        self._creating: dict[CacheKey, threading.Lock] = {}
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0
        self.evictions = 0
        self.embedded_patches = 0

    # -- complete slides (a cohort run) ------------------------------------------------------------
    def load(self, key: CacheKey, width: int, height: int, embed_dim: int,
             partial: bool = False) -> CachedEmbeddings | None:
        """Every feature of a slide, from memory (a complete entry) or disk; None when neither tier has them.

        With ``partial`` a partial disk entry (some patches embedded, :class:`CachedEmbeddings` with a
        ``state``) is returned when there is no complete one.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.complete and (entry.width, entry.height, entry.embed_dim) == (
                    width, height, embed_dim):
                self._entries.move_to_end(key)
                self.hits += 1
                with entry.lock:
                    return entry.to_cached()
        cached = (usable(self.disk.load(key, partial=partial), width, height, embed_dim)
                  if self.disk is not None else None)
        with self._lock:
            if cached is None:
                self.misses += 1
            else:
                self.disk_hits += 1
        return cached

    def store(self, key: CacheKey, cached: CachedEmbeddings) -> None:
        """Keep a slide's features on disk (a cohort run reads each slide once: memory would not help); a
        partial entry never replaces a complete one (:meth:`FeatureCache.store`)."""
        if self.disk is not None:
            self.disk.store(key, cached)

    def clean_stale(self) -> int:
        return self.disk.clean_stale() if self.disk is not None else 0

    # -- slides filled on demand (the service) -----------------------------------------------------
    def entry(self, key: CacheKey, width: int, height: int, embed_dim: int, geometry: PatchGeometry,
              mpp: float | None, create: Callable[[], SlideEmbeddings],
              outline: Callable[[TissueMask], BaseGeometry | None] | None = None) -> SlideEmbeddings:
        """The memory entry of ``key``: kept, else from disk (complete or partial), else ``create()`` (empty; once
        per key)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            make_lock = self._creating.setdefault(key, threading.Lock())
        with make_lock:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:  # made by a concurrent request meanwhile
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry
            try:
                cached = (usable(self.disk.load(key, partial=True), width, height, embed_dim)
                          if self.disk is not None else None)
                if cached is not None:
                    entry = SlideEmbeddings.from_cached(key, cached, geometry, mpp,
                                                        outline(cached.tissue) if outline else None)
                else:
                    entry = create()
            finally:
                with self._lock:
                    self._creating.pop(key, None)
            with self._lock:
                if cached is not None:
                    self.disk_hits += 1
                else:
                    self.misses += 1
                if self.max_entries > 0:
                    self._entries[key] = entry
                    self._evict(keep=key)
            return entry

    def record_embedded(self, count: int) -> None:
        """Count ``count`` newly embedded patches and enforce the byte budget."""
        with self._lock:
            self.embedded_patches += int(count)
            self._evict()

    def persist(self, entry: SlideEmbeddings) -> bool:
        """Write a complete entry to the disk tier once (call while holding ``entry.lock``); True when written."""
        if self.disk is None or entry.on_disk or not entry.complete:
            return False
        self.disk.store(entry.key, entry.to_cached())
        entry.on_disk = True
        return True

    def _evict(self, keep: CacheKey | None = None) -> None:
        """Drop least recently used entries beyond the limits (never ``keep`` or the newest entry)."""
        def total() -> int:
            return sum(e.nbytes for e in self._entries.values())

        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or total() > self.max_bytes):
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            del self._entries[oldest]
            self.evictions += 1

    def entries(self) -> list[SlideEmbeddings]:
        with self._lock:
            return list(self._entries.values())

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                entries=len(self._entries),
                bytes=sum(e.nbytes for e in self._entries.values()),
                hits=self.hits,
                disk_hits=self.disk_hits,
                misses=self.misses,
                evictions=self.evictions,
                embedded_patches=self.embedded_patches,
                folder=str(self.disk.root) if self.disk is not None else None,
            )

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
