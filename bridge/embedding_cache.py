"""Patch embeddings kept in memory between service requests, so a slide is embedded at most once.

An entry belongs to one slide file *version* (real path, size, modification time), one model
(spec + pretrained) and one patch geometry. It holds what the slide's later requests need without
touching the model again: the slide's size and pixel size, its tissue mask, the tissue patch grid,
and the features of the patches embedded so far. A region request embeds only the patches it lacks;
a later full-slide request embeds only the rest. Features are stored compactly (one row per embedded
patch), so memory follows the number of embedded patches, never the slide's pixel count.

The cache is a thread-safe LRU bounded by a number of entries and a byte budget. Each entry has its
own lock: the service holds it while filling missing patches, so two requests on the same slide never
embed the same patch twice. ``EmbeddingCache.embedded_patches`` counts every patch ever embedded
(tests use it to prove that a second request did not embed again).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from shapely.geometry.base import BaseGeometry

from zeus_qupath.grid import PatchGrid
from zeus_qupath.tissue import TissueMask

DEFAULT_MAX_ENTRIES = 16
DEFAULT_MAX_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class SlideKey:
    """Which slide file version, model and patch geometry an entry's features belong to."""

    realpath: str
    size: int
    mtime_ns: int
    model: str  # model spec as loaded (e.g. "quiltnet-b32", "open_clip:/x/cfg.json")
    pretrained: str | None
    patch_size: int  # px as cut for the model
    stride: int  # px at the same scale
    target_mpp: float | None  # pixel size the model sees (None: level 0)
    mpp: float | None  # the slide's pixel size when overridden, else None
    tissue: bool  # patches restricted to detected tissue

    @classmethod
    def for_file(cls, path: str, model: str, pretrained: str | None, patch_size: int, stride: int,
                 target_mpp: float | None = None, mpp: float | None = None, tissue: bool = True) -> SlideKey:
        """The key of ``path`` as the file is on disk now."""
        real = os.path.realpath(path)
        st = os.stat(real)
        return cls(real, int(st.st_size), int(st.st_mtime_ns), model, pretrained, patch_size, stride,
                   target_mpp, mpp, tissue)


@dataclass
class SlideEmbeddings:
    """One slide's grid and the features of the patches embedded so far.

    ``slots[i]`` is the row of grid patch ``i`` in ``_store``, or -1 while it is not embedded.
    Mutate only while holding ``lock``.
    """

    key: SlideKey
    width: int
    height: int
    mpp: float | None
    tissue: TissueMask
    grid: PatchGrid
    embed_dim: int
    tissue_outline: BaseGeometry | None = None  # the tissue mask as polygons (level-0 px), to clip results
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    slots: np.ndarray = field(init=False, repr=False)
    _store: np.ndarray = field(init=False, repr=False)
    _filled: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.slots = np.full(len(self.grid), -1, dtype=np.int64)
        self._store = np.zeros((0, self.embed_dim), dtype=np.float32)

    @property
    def embedded(self) -> int:
        """How many of the grid's patches have features."""
        return self._filled

    @property
    def nbytes(self) -> int:
        """Memory held for features and bookkeeping (the grid's index and slots, the tissue mask)."""
        return int(self._store.nbytes + self.slots.nbytes + self.grid.index.nbytes + self.tissue.mask.nbytes)

    def missing(self, indices: np.ndarray) -> np.ndarray:
        """The grid positions among ``indices`` that have no features yet."""
        indices = np.asarray(indices, dtype=np.int64)
        return indices[self.slots[indices] < 0]

    def store(self, indices: np.ndarray, features: np.ndarray) -> None:
        """Keep ``features`` (len(indices), D) for grid positions ``indices`` (already-set ones are overwritten)."""
        indices = np.asarray(indices, dtype=np.int64)
        if features.shape != (len(indices), self.embed_dim):
            raise ValueError(f"features must be ({len(indices)}, {self.embed_dim}), got {features.shape}")
        new = self.slots[indices] < 0
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


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    hits: int
    misses: int
    evictions: int
    embedded_patches: int


class EmbeddingCache:
    """A thread-safe LRU of :class:`SlideEmbeddings`, bounded by entry count and bytes."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_entries < 1:
            raise ValueError("the embedding cache needs room for at least one slide")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[SlideKey, SlideEmbeddings] = OrderedDict()
        self._lock = threading.Lock()
        self._creating: dict[SlideKey, threading.Lock] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.embedded_patches = 0

    def get_or_create(self, key: SlideKey, create: Callable[[], SlideEmbeddings]) -> SlideEmbeddings:
        """The entry of ``key``, made by ``create()`` (outside the cache lock, once per key) when absent."""
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
                entry = create()
            finally:
                with self._lock:
                    self._creating.pop(key, None)
            with self._lock:
                self.misses += 1
                # an older version of the same file can never be asked for again
                for old in [k for k in self._entries if k.realpath == key.realpath and
                            (k.size, k.mtime_ns) != (key.size, key.mtime_ns)]:
                    del self._entries[old]
                    self.evictions += 1
                self._entries[key] = entry
                self._evict(keep=key)
            return entry

    def record_embedded(self, count: int) -> None:
        """Count ``count`` newly embedded patches and enforce the byte budget."""
        with self._lock:
            self.embedded_patches += int(count)
            self._evict()

    def _evict(self, keep: SlideKey | None = None) -> None:
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
                misses=self.misses,
                evictions=self.evictions,
                embedded_patches=self.embedded_patches,
            )

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
