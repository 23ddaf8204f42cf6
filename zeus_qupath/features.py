"""Bring your own features (``zeus score FEATURES.h5``): patch features computed elsewhere -> a scores file.

Reads the HDF5 layout that CLAM (``extract_features_fp.py``) and Trident (``WSI.extract_features``)
write: a dataset ``features`` (N, D) and a dataset ``coords`` (N, 2) of level-0 top-left (x, y).
What the patch geometry comes from, first match wins:

- patch size (level-0 px): ``--patch-size``; Trident's ``coords`` attribute ``patch_size_level0``;
  ``patch_size`` x ``level0_magnification / target_magnification`` (Trident); CLAM's patch-file
  attributes ``patch_size`` at ``patch_level`` 0, or times ``downsample``. CLAM's feature files carry
  no attributes at all: pass ``--patch-size``.
- stride: ``--stride``; Trident's ``patch_size_level0`` minus its ``overlap`` (scaled to level 0);
  else the most common gap between neighbouring patches. The patches may lie on any grid: one
  lattice from the slide origin (Trident, zeus), one lattice per tissue contour anchored at its
  bounding box (CLAM, ZEUS), or none; the mask follows ZEUS's per-pixel rule whatever the grid
  (:mod:`zeus_qupath.reconstruct`), and the stride is only recorded.
- slide size: ``--width``/``--height``; Trident's ``level0_width``/``level0_height``; CLAM's
  ``level_dim`` at ``patch_level`` 0; else the bounding box of the patches (recorded as a warning).

Features are normalised to unit length and scored against the model's text prototypes exactly as
``zeus segment`` scores its own; they must be in the model's text-aligned space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .errors import ModelError, ZeusError
from .outputs import PatchScores
from .prompts import PromptSet
from .scoring import slide_scores

if TYPE_CHECKING:
    from .models.base import Encoder  # for annotations only: importing it imports torch

__all__ = ["FeatureFile", "read_feature_file", "score_features", "unit_features"]

_CHUNK = 65536  # rows read at a time

# Trident's encoders whose default output leaves out the projection into the text space
_UNPROJECTED = {
    "conch_v1": "Trident's and CLAM's conch_v1 leave out CONCH's contrastive projection by default "
    "(proj_contrast=False): re-extract with the projection (Trident: with_proj=True)",
    "musk": "Trident's musk leaves out MUSK's projection head by default (with_proj=False): "
    "re-extract with with_proj=True",
}


@dataclass(frozen=True)
class FeatureFile:
    """The arrays and attributes of one features HDF5 file (features still as stored)."""

    name: str
    coords: np.ndarray  # (N, 2) int64, level-0 top-left (x, y)
    features: np.ndarray  # (N, D) float32
    coords_attrs: dict[str, Any]
    features_attrs: dict[str, Any]

    @property
    def layout(self) -> str:
        if "patch_size_level0" in self.coords_attrs or "level0_magnification" in self.coords_attrs:
            return "trident"
        if "patch_level" in self.coords_attrs:
            return "clam"
        return "no attributes"

    def number(self, key: str) -> float | None:
        """A numeric ``coords`` attribute, or None when absent or not a number (Trident writes 'None')."""
        value = self.coords_attrs.get(key)
        try:
            arr = np.asarray(value, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            return None
        return float(arr[0]) if arr.size and math.isfinite(arr[0]) else None


def _attrs(obj) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        out[str(key)] = value
    return out


def _check_written(dset, source: str) -> None:
    """Refuse a dataset whose data was never written: HDF5 returns fill values for it (a sparse file of
    1.6 KB can declare 16 GB of "features"), so nothing of it is read."""
    need = int(dset.size) * dset.dtype.itemsize
    if need == 0:
        return
    if dset.chunks is None:
        if dset.id.get_storage_size() < need and dset.compression is None:
            raise ZeusError(f"{source}: '{dset.name.lstrip('/')}' holds {dset.id.get_storage_size():,} of its "
                            f"{need:,} bytes (an incomplete or sparse file)")
        return
    expected = math.prod(-(-size // chunk) for size, chunk in zip(dset.shape, dset.chunks, strict=True))
    written = dset.id.get_num_chunks()
    if written < expected:
        raise ZeusError(f"{source}: '{dset.name.lstrip('/')}' has {written:,} of its {expected:,} chunks written "
                        "(an incomplete or sparse file)")


def read_feature_file(path: str | Path) -> FeatureFile:
    """Read ``features`` and ``coords`` (CLAM/Trident layout); a one-line ZeusError for anything malformed."""
    p = Path(path)
    try:
        import h5py
    except ImportError:
        raise ZeusError("reading features files needs h5py: pip install h5py") from None
    if not p.is_file():
        raise ZeusError(f"features file not found: {p}")
    layout_hint = "expected datasets 'features' (N, D) and 'coords' (N, 2), as CLAM and Trident write"
    try:
        with h5py.File(p, "r") as f:
            dsets = {}
            for key in ("features", "coords"):
                obj = f.get(key)
                if not isinstance(obj, h5py.Dataset):
                    raise ZeusError(f"{p.name}: no '{key}' dataset ({layout_hint})")
                dsets[key] = obj
            feats, coords = dsets["features"], dsets["coords"]
            fshape, cshape = feats.shape, coords.shape
            if len(fshape) == 3 and fshape[0] == 1:  # (1, N, D): one bag
                fshape = fshape[1:]
            n = fshape[0] if fshape else 0
            if len(fshape) == 1 and n == 0:  # Trident writes (0,) for a slide without tissue
                fshape = (0, 0)
            if len(fshape) != 2:
                raise ZeusError(f"{p.name}: 'features' has shape {feats.shape}, {layout_hint}")
            if cshape not in ((n, 2), (0,)) or (cshape == (0,) and n):
                raise ZeusError(f"{p.name}: 'coords' has shape {cshape} for {n} feature rows, {layout_hint}")
            if not np.issubdtype(feats.dtype, np.number) or not np.issubdtype(coords.dtype, np.number):
                raise ZeusError(f"{p.name}: 'features' and 'coords' must be numeric")
            _check_written(coords, p.name)
            _check_written(feats, p.name)
            out = np.empty(fshape, dtype=np.float32)
            for start in range(0, n, _CHUNK):
                rows = feats[0, start : start + _CHUNK] if feats.ndim == 3 else feats[start : start + _CHUNK]
                out[start : start + len(rows)] = rows
            raw = np.asarray(coords[()]).reshape(-1, 2)
            coords_attrs, features_attrs = _attrs(coords), _attrs(feats)
    except ZeusError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ZeusError(f"{p.name}: not a readable HDF5 features file ({first[:200]})") from None
    if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)) or (raw.size and raw.min() < 0):
        raise ZeusError(f"{p.name}: 'coords' must be non-negative whole level-0 pixel positions")
    return FeatureFile(p.name, raw.astype(np.int64), out, coords_attrs, features_attrs)


def unit_features(features: np.ndarray, source: str = "features", *, inplace: bool = False) -> np.ndarray:
    """Rows scaled to unit length, float32 (a copy unless ``inplace``); refuses non-finite or all-zero rows."""
    if inplace and features.dtype != np.float32:
        raise ValueError("inplace needs a float32 array")
    out = features if inplace else np.array(features, dtype=np.float32, copy=True)
    if not np.all(np.isfinite(out)):
        bad = int(np.argwhere(~np.isfinite(out))[0, 0])
        raise ZeusError(f"{source}: feature row {bad} holds NaN or infinite values")
    norms = np.linalg.norm(out, axis=1)
    if np.any(norms == 0):
        raise ZeusError(f"{source}: feature row {int(np.argmin(norms))} is all zeros")
    out /= norms[:, None]
    return out


def _patch_size(ff: FeatureFile, given: int | None) -> tuple[int, str]:
    if given is not None:
        return int(given), "argument"
    size0 = ff.number("patch_size_level0")
    if size0:
        return int(round(size0)), "attribute patch_size_level0"
    size, src, dst = ff.number("patch_size"), ff.number("level0_magnification"), ff.number("target_magnification")
    if size and src and dst:
        return int(round(size * src / dst)), "attributes patch_size x level0/target magnification"
    level = ff.number("patch_level")
    if size and level == 0:
        return int(round(size)), "attributes patch_size at patch_level 0"
    downsample = ff.number("downsample")
    if size and downsample:
        return int(round(size * downsample)), "attributes patch_size x downsample"
    raise ZeusError(
        f"{ff.name}: patch size unknown (no patch_size_level0, or patch_size with its level, in the 'coords' "
        "attributes; CLAM's feature files carry none): pass --patch-size PX (level-0 px)"
    )


def _lattice_step(coords: np.ndarray) -> int | None:
    """The most common gap between neighbouring patches in a row (same y) or a column (same x); None if none.

    On CLAM's and ZEUS's per-contour lattices, as on one lattice from (0, 0), that is the step of each
    lattice; gaps between contours are rarer (ties go to the smaller gap).
    """
    gaps = []
    for along, across in ((0, 1), (1, 0)):
        order = np.lexsort((coords[:, along], coords[:, across]))
        a, c = coords[order, along], coords[order, across]
        d = np.diff(a)
        gaps.append(d[(np.diff(c) == 0) & (d > 0)])
    all_gaps = np.concatenate(gaps)
    if all_gaps.size == 0:
        return None
    values, counts = np.unique(all_gaps, return_counts=True)
    return int(values[np.argmax(counts)])


def _stride(ff: FeatureFile, patch_size: int, given: int | None) -> tuple[int, str]:
    """The step between neighbouring patches of one lattice (recorded; the reconstruction needs no lattice)."""
    if given is not None:
        return int(given), "argument"
    overlap, src, dst = ff.number("overlap"), ff.number("level0_magnification"), ff.number("target_magnification")
    size0 = ff.number("patch_size_level0")
    if size0 and overlap is not None and src and dst:
        step = int(round(size0)) - int(round(overlap * src / dst))
        if step > 0:
            return step, "attributes patch_size_level0 - overlap"
    step = _lattice_step(ff.coords) if len(ff.coords) > 1 else None
    if step is None:
        return patch_size, "patch size (no neighbouring patches)"
    return step, "most common gap between neighbouring patches"


def _slide_size(ff: FeatureFile, patch_size: int, width: int | None, height: int | None,
                warnings: list[str]) -> tuple[int, int, str]:
    coords = ff.coords
    w, h = ff.number("level0_width"), ff.number("level0_height")
    source = "attributes level0_width/level0_height"
    if (w is None or h is None) and ff.number("patch_level") == 0:
        dims = ff.coords_attrs.get("level_dim")
        if isinstance(dims, list) and len(dims) == 2:
            w, h = float(dims[0]), float(dims[1])
            source = "attribute level_dim"
    if width is not None and height is not None:
        return int(width), int(height), "arguments"
    if w is None or h is None:
        if len(coords) == 0 and (width is None or height is None):
            raise ZeusError(f"{ff.name}: no patches and no slide size: pass --width and --height")
        bw = int(coords[:, 0].max()) + patch_size if len(coords) else 0
        bh = int(coords[:, 1].max()) + patch_size if len(coords) else 0
        w, h = (width if width is not None else bw), (height if height is not None else bh)
        warnings.append(
            f"slide size not in {ff.name}: using the patches' bounding box ({int(w)} x {int(h)} px); "
            "pass --width/--height for the real size"
        )
        return int(w), int(h), "bounding box of the patches"
    return (int(width) if width is not None else int(w)), (int(height) if height is not None else int(h)), source


def _encoder_warnings(ff: FeatureFile, encoder: Encoder) -> list[str]:
    made_by = ff.features_attrs.get("encoder")
    if not isinstance(made_by, str) or made_by in ("", "None"):
        return []
    if made_by in _UNPROJECTED:
        return [f"{ff.name} was made by '{made_by}': {_UNPROJECTED[made_by]}; otherwise the scores are meaningless"]
    if made_by.lower() != encoder.name.lower():
        return [f"{ff.name} was made by '{made_by}', scored with model {encoder.name}: the features must come "
                "from the same model's image tower, in its text-aligned space"]
    return []


def score_features(
    h5_path: str | Path,
    encoder: Encoder,
    prompts: PromptSet,
    *,
    patch_size: int | None = None,
    stride: int | None = None,
    width: int | None = None,
    height: int | None = None,
    mpp: float | None = None,
    screening_k: int | None = None,
    adapter: Any = None,
) -> PatchScores:
    """Score the patch features of ``h5_path`` against ``encoder``'s prototypes of ``prompts``.

    Sizes are level-0 px. Refuses (one-line ZeusError/ModelError) a malformed file, a feature
    dimension other than ``encoder.embed_dim``, and patches outside the slide.
    Notes for the user (e.g. the slide size was taken from the patches' bounding box) are in
    ``meta["warnings"]``.
    """
    ff = read_feature_file(h5_path)  # shapes and storage checked before anything large is read
    n, dim = ff.features.shape
    if n and dim != encoder.embed_dim:
        raise ModelError(
            f"{ff.name}: the features are {dim}-d but model {encoder.name} embeds images and texts in "
            f"{encoder.embed_dim}-d; zeus scores features in the model's text-aligned space, from the same model "
            "(e.g. CONCH: encode_image(x, proj_contrast=True); the conch_v1 of CLAM and Trident leaves that out)"
        )
    warnings = _encoder_warnings(ff, encoder)
    psize, psize_from = _patch_size(ff, patch_size)
    step, step_from = _stride(ff, psize, stride)
    w, h, size_from = _slide_size(ff, psize, width, height, warnings)
    if n:
        outside = (ff.coords[:, 0] >= w) | (ff.coords[:, 1] >= h)
        if np.any(outside):
            x, y = ff.coords[np.argmax(outside)]
            raise ZeusError(f"{ff.name}: patch ({x}, {y}) lies outside the slide ({w} x {h} px)")
    # the file's array is ours alone: normalise it in place (features are the largest array here)
    feats = unit_features(ff.features, ff.name, inplace=True) if n else np.zeros((0, encoder.embed_dim), np.float32)
    scores, score_meta = slide_scores([feats], [encoder], prompts, screening_k=screening_k, adapter=adapter)
    meta = {
        **score_meta,
        "source": "features file",
        "features_file": ff.name,
        "layout": ff.layout,
        "features_encoder": ff.features_attrs.get("encoder"),
        "level0_magnification": ff.number("level0_magnification"),
        "patch_size_from": psize_from,
        "stride_from": step_from,
        "size_from": size_from,
        "model": encoder.name,
        "embed_dim": encoder.embed_dim,
        "logit_scale": encoder.logit_scale,
        "prompts": prompts.source,
        "zeus_version": __version__,
        "warnings": warnings,
    }
    return PatchScores(
        coords=ff.coords,
        scores=scores,
        classes=tuple(prompts.class_names),
        positive_class=prompts.positive_class,
        patch_size=psize,
        stride=step,
        width=w,
        height=h,
        mpp=mpp,
        meta=meta,
    )
