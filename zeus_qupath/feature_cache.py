"""Patch embeddings on disk, so that a slide is embedded once per model and patch geometry.

An entry is keyed by what its features depend on (:class:`CacheKey`): the slide's content
fingerprint (not its path), the model's identity (spec, weights, preprocessing) and the precision it
ran in, the patch geometry (patch size, stride, target pixel size, resulting scale) and the tissue
setting. It holds the features of every grid patch, the grid itself and the tissue mask, so a run
with other prompts or another threshold skips tissue detection and the model and only re-scores.

Complete entries are ``<root>/<xx>/<digest>.npz``: the grid after CLAM's white/black filters and the
features of each of its patches. *Partial* entries (what ``--sampling adaptive`` embedded) are
``<root>/<xx>/<digest>.partial.npz``: the whole grid before those filters, a per-patch ``state``
(:data:`MISSING`, :data:`KEPT` or :data:`DROPPED` as white/black), whether the filters are still to
run on the missing patches (``pixel_filter``), and the features of the kept patches only (grid
order). A partial entry lives in its own file so that a reader that predates it never sees it, and
it never replaces a complete one: storing a complete entry removes the key's partial file, and a
partial entry is not written where a complete one exists. Two runs that write one key's partial entry
at once leave the last one's (each file is whole; the other's patches are embedded again when needed).

Entries are written to a temporary file named after the writer
(``.<name>.<host>.<pid>.<random>.tmp``), flushed to disk and renamed, and carry a checksum of their
arrays: a corrupt or truncated entry is detected on load, removed and recomputed, never used.
:meth:`FeatureCache.clean_stale` removes temporary files left by writers that died.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .grid import PatchGeometry, PatchGrid
from .identity import stable_hash
from .tissue import TissueMask, tissue_method

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: patch lattice origins (per-contour grids, --tissue zeus)
READER_VERSION = 1  # bump when the way regions are read or resampled changes
_ARRAYS = ("features", "index", "origin", "grid_info", "tissue_bits", "tissue_shape", "tissue_downsample")
_PARTIAL_ARRAYS = ("state", "pixel_filter")  # only in partial entries (checksummed after _ARRAYS)
MISSING, KEPT, DROPPED = 0, 1, 2  # a partial entry's per-patch state: not read yet, embedded, white/black
_FOREIGN_TEMP_AGE_S = 24 * 3600


@dataclass(frozen=True)
class CacheKey:
    """What one slide's features for one model depend on."""

    slide: str  # content fingerprint of the slide file
    model: str  # ModelIdentity.digest
    precision: str  # fp32, bf16 or fp16 (what the model really ran in)
    patch_size: int
    stride: int
    scale: float  # level-0 px per model px
    target_mpp: float | None
    tissue: bool | str  # False: every patch; "zeus" or "coarse" (True): the tissue rule (--tissue)

    @classmethod
    def make(cls, slide: str, model: str, precision: str, geometry: PatchGeometry, target_mpp: float | None,
             tissue: bool | str) -> CacheKey:
        return cls(slide, model, precision, geometry.patch_size, geometry.stride, float(geometry.scale),
                   target_mpp, tissue)

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["scale"] = repr(self.scale)
        d["versions"] = {"cache": CACHE_VERSION, "reader": READER_VERSION}
        if self.tissue:
            d["tissue_method"] = tissue_method("zeus" if self.tissue == "zeus" else "coarse")
        return d

    @property
    def digest(self) -> str:
        return stable_hash(self.to_dict())


@dataclass(frozen=True)
class CachedEmbeddings:
    """One slide's grid, tissue mask and the features of its patches (grid order).

    Complete (``state`` None): every grid patch has features; the grid is the one after the white/black
    filters. Partial: ``state[i]`` says whether grid patch ``i`` is :data:`MISSING`, :data:`KEPT` (it has
    a row in ``features``) or :data:`DROPPED`; the grid is the one before the filters, which are still
    to run on the missing patches when ``pixel_filter``. Make a partial one with :meth:`from_state`.
    """

    features: np.ndarray  # (K, D) float32 unit vectors: every grid patch (complete) or the KEPT ones (partial)
    index: np.ndarray  # (N, 2) int64 grid (row, col)
    rows: int
    cols: int
    width: int
    height: int
    tissue: TissueMask
    origin: np.ndarray | None = None  # (N, 2) int64 lattice origins (PatchGrid.origin); None: all (0, 0)
    state: np.ndarray | None = None  # partial entries: (N,) int8 MISSING / KEPT / DROPPED; None: complete
    pixel_filter: bool = False  # partial entries: the white/black filters are still to run on MISSING patches

    @classmethod
    def from_state(cls, grid: PatchGrid, tissue: TissueMask, state: np.ndarray,
                   features: np.ndarray) -> CachedEmbeddings:
        """An entry of ``grid`` (before the white/black filters) whose patches are in ``state``, with
        ``features`` of the KEPT ones (grid order): complete (today's form) when no patch is MISSING."""
        state = np.asarray(state, dtype=np.int8).reshape(-1)
        if state.shape != (len(grid),) or features.shape[0] != int(np.count_nonzero(state == KEPT)):
            raise ValueError("state and features do not fit the grid")
        if not np.any(state == MISSING):
            done = grid.filtered(state == KEPT)
            return cls(features, done.index, done.rows, done.cols, done.width, done.height, tissue, done.origin)
        return cls(features, grid.index, grid.rows, grid.cols, grid.width, grid.height, tissue, grid.origin,
                   state, bool(grid.pixel_filter))

    @property
    def complete(self) -> bool:
        return self.state is None

    def slots(self) -> np.ndarray:
        """(N,) int64 per grid patch: its row in ``features``, -1 when missing, -2 when dropped as white/black
        (the convention of :class:`~zeus_qupath.embedding_cache.SlideEmbeddings`)."""
        n = len(self.index)
        if self.state is None:
            return np.arange(n, dtype=np.int64)
        kept = self.state == KEPT
        slots = np.where(self.state == DROPPED, -2, -1).astype(np.int64)
        slots[kept] = np.arange(int(kept.sum()), dtype=np.int64)
        return slots

    def grid(self, geometry: PatchGeometry) -> PatchGrid:
        return PatchGrid(geometry, self.width, self.height, self.rows, self.cols, self.index, self.origin,
                         pixel_filter=self.pixel_filter)

    def arrays(self) -> dict[str, np.ndarray]:
        mask = np.asarray(self.tissue.mask, dtype=bool)
        partial = {} if self.state is None else {
            "state": np.ascontiguousarray(self.state, dtype=np.int8).reshape(-1),
            "pixel_filter": np.array(self.pixel_filter, dtype=np.bool_),
        }
        return {
            "features": np.ascontiguousarray(self.features, dtype=np.float32),
            "index": np.ascontiguousarray(self.index, dtype=np.int64).reshape(-1, 2),
            "origin": (np.zeros((0, 2), np.int64) if self.origin is None
                       else np.ascontiguousarray(self.origin, dtype=np.int64).reshape(-1, 2)),
            "grid_info": np.array([self.rows, self.cols, self.width, self.height], dtype=np.int64),
            "tissue_bits": np.packbits(mask, axis=None),
            "tissue_shape": np.array(mask.shape, dtype=np.int64),
            "tissue_downsample": np.array(self.tissue.downsample, dtype=np.float64),
            **partial,
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> CachedEmbeddings:
        rows, cols, width, height = (int(v) for v in a["grid_info"])
        shape = tuple(int(v) for v in a["tissue_shape"])
        mask = np.unpackbits(a["tissue_bits"], count=shape[0] * shape[1]).reshape(shape).astype(bool)
        features, index = a["features"], a["index"]
        state = a.get("state")
        if state is not None and (state.dtype != np.int8 or index.ndim != 2 or state.shape != (index.shape[0],)
                                  or not np.isin(state, (MISSING, KEPT, DROPPED)).all()):
            raise ValueError("inconsistent patch states")
        rows_with_features = index.shape[0] if state is None else int(np.count_nonzero(state == KEPT))
        if features.ndim != 2 or index.shape != (index.shape[0], 2) or features.shape[0] != rows_with_features \
                or features.dtype != np.float32:
            raise ValueError("inconsistent array shapes")
        origin = a["origin"]
        if origin.shape not in ((0, 2), index.shape):
            raise ValueError("inconsistent array shapes")
        return cls(features, index, rows, cols, width, height,
                   TissueMask(mask=mask, downsample=float(a["tissue_downsample"])),
                   origin if len(origin) == len(index) and len(index) else None,
                   state, bool(a["pixel_filter"]) if state is not None else False)


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """blake2b over the arrays' names, dtypes, shapes and bytes, in a fixed order."""
    h = hashlib.blake2b(digest_size=32)
    for name in _ARRAYS + (_PARTIAL_ARRAYS if "state" in arrays else ()):
        arr = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
        h.update(arr.tobytes() if arr.size == 0 else memoryview(arr.reshape(-1)).cast("B"))
    return h.hexdigest()


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class FeatureCache:
    """A folder of embedding entries; safe for several processes to share."""

    root: Path
    hits: int = field(default=0, init=False)
    misses: int = field(default=0, init=False)
    corrupt: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def entry_path(self, key: CacheKey) -> Path:
        d = key.digest
        return self.root / d[:2] / f"{d}.npz"

    def partial_path(self, key: CacheKey) -> Path:
        d = key.digest
        return self.root / d[:2] / f"{d}.partial.npz"

    def load(self, key: CacheKey, partial: bool = False) -> CachedEmbeddings | None:
        """The complete entry for ``key``, else (``partial``) its partial entry; None when absent, or when
        corrupt (then it is removed)."""
        entry = self._read(self.entry_path(key), key, want_partial=False)
        if entry is None and partial:
            entry = self._read(self.partial_path(key), key, want_partial=True)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def _read(self, path: Path, key: CacheKey, want_partial: bool) -> CachedEmbeddings | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                names = _ARRAYS + (_PARTIAL_ARRAYS if "state" in z.files else ())
                arrays = {name: z[name] for name in names}
            if meta.get("version") != CACHE_VERSION or meta.get("key") != key.digest:
                raise ValueError("entry written for another key or version")
            if bool(meta.get("partial", False)) != want_partial or ("state" in arrays) != want_partial:
                raise ValueError("a partial entry where a complete one belongs, or the reverse")
            if meta.get("checksum") != checksum(arrays):
                raise ValueError("checksum mismatch")
            return CachedEmbeddings.from_arrays(arrays)
        except FileNotFoundError:
            return None
        except Exception as exc:  # truncated zip, bad checksum, missing arrays: never use it
            log.warning("embedding cache entry %s is unusable (%s); recomputing", path.name, exc)
            self.corrupt += 1
            path.unlink(missing_ok=True)
            return None

    def store(self, key: CacheKey, entry: CachedEmbeddings) -> Path:
        """Write ``entry`` atomically (temporary file, fsync, rename); returns its path.

        A complete entry removes the key's partial one; a partial entry is not written (the complete
        entry's path is returned) when the key already has a complete one.
        """
        if entry.complete:
            path = self._write(self.entry_path(key), key, entry)
            self.partial_path(key).unlink(missing_ok=True)
            return path
        if self.entry_path(key).is_file():
            return self.entry_path(key)
        return self._write(self.partial_path(key), key, entry)

    def _write(self, path: Path, key: CacheKey, entry: CachedEmbeddings) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = entry.arrays()
        meta = {"version": CACHE_VERSION, "key": key.digest, "key_parts": key.to_dict(),
                "checksum": checksum(arrays), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **({} if entry.complete else {"partial": True})}
        tmp = path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def clean_stale(self) -> int:
        """Remove temporary files of writers that are gone (this host: dead pid; others: a day old)."""
        if not self.root.is_dir():
            return 0
        host = _host()
        removed = 0
        for tmp in self.root.glob("*/.*.tmp"):
            parts = tmp.name.rsplit(".", 4)  # .<name>.<host>.<pid>.<token>.tmp -> [.., host, pid, token, tmp]
            try:
                writer_host, pid = parts[1], int(parts[2])
                if writer_host == host:
                    stale = not _pid_alive(pid)
                else:
                    stale = time.time() - tmp.stat().st_mtime > _FOREIGN_TEMP_AGE_S
            except (IndexError, ValueError, OSError):
                continue
            if stale:
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed
