"""The adapter ``zeus learn`` writes: a small linear map from a model's patch embeddings to class scores.

Adapted scores are ``features @ weights.T + bias`` (N, C), on the scale of the zero-shot cosine scores, so
every later step (ZEUS's mask rule, ``prob:P``, polygons, heatmaps) runs unchanged. Both candidates
``zeus learn`` chooses between are of that form and keep the text prior (:func:`fit`):

- ``prototype``: each class's text prototype blended with the mean embedding of the patches labelled with
  it, ``normalise((1 - a) * text + a * visual)`` (a = strength; 0 is zero-shot), bias 0;
- ``ridge``: a linear head fitted by ridge regression onto target scores (the labelled class high, the
  others low), its penalty pulling the weights toward the text prototypes (and the bias toward 0):
  ``min ||X W' - Y||^2 + lam * N * ||W' - [T; 0]||^2`` (strength = lam; a large lam is zero-shot).

The file (``.npz`` read with ``allow_pickle=False``; written member by member with fixed zip
timestamps, so the same inputs give the same bytes) holds ``weights`` float32 (C, D), ``bias``
float32 (C,) and ``header``: JSON with the format and version, what the adapter was learned on
(:func:`identity`: model identity and digest, precision, patch geometry, tissue rule, prompt file hash,
classes, positive class), the method, the slides, the cross-validation table, versions and the sha256
of the weights. :meth:`Adapter.load` checks all of it; :meth:`Adapter.check` refuses, in one line,
an adapter learned on anything other than what it is applied to.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg

from .errors import ZeusError, one_line

FORMAT = "zeus-adapter"
VERSION = 1
KINDS = ("prototype", "ridge")
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_DIM = 1 << 16
_MEMBERS = ("header", "weights", "bias")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
IDENTITY_KEYS = ("model_digest", "precision", "geometry", "tissue", "prompts_sha256", "classes", "positive_class")
_WHAT = {"model_digest": "model (or its weights)", "precision": "precision", "geometry": "patch geometry",
         "tissue": "tissue rule", "prompts_sha256": "prompt file", "classes": "classes",
         "positive_class": "positive class"}


def identity(model: Mapping[str, Any], model_digest: str, precision: str, *, patch_size: int, stride: int,
             target_mpp: float | None, tissue: bool | str, prompts_sha256: str, classes: Sequence[str],
             positive_class: str) -> dict[str, Any]:
    """What an adapter is learned on and must be applied to (JSON-able, stable)."""
    return {"model": dict(model), "model_digest": model_digest, "precision": precision,
            "geometry": {"patch_size": int(patch_size), "stride": int(stride),
                         "target_mpp": None if target_mpp is None else float(target_mpp)},
            "tissue": tissue, "prompts_sha256": prompts_sha256, "classes": list(classes),
            "positive_class": positive_class}


def applied_identity(model_identity: Any, precision: str, params: Any, prompts: Any) -> dict[str, Any]:
    """:func:`identity` of a run: its ``ModelIdentity``, the precision it computes in, params and prompt set."""
    return identity(model_identity.to_dict(), model_identity.digest, precision, patch_size=params.patch_size,
                    stride=params.stride, target_mpp=params.target_mpp,
                    tissue=params.tissue if params.detect_tissue else False, prompts_sha256=prompts.sha256,
                    classes=prompts.class_names, positive_class=prompts.positive_class)


def weights_sha256(weights: np.ndarray, bias: np.ndarray) -> str:
    h = hashlib.sha256()
    for arr in (weights, bias):
        a = np.ascontiguousarray(arr, dtype="<f4")
        h.update(f"{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Adapter:
    """Weights (C, D), bias (C,) and the header (see the module docstring)."""

    weights: np.ndarray
    bias: np.ndarray
    header: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.header["identity"]["classes"])

    @property
    def sha256(self) -> str:
        """A short identity of this adapter: the hash of its weights and header."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def method(self) -> dict[str, Any]:
        return dict(self.header["method"])

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, C) float32 adapted scores of unit patch features (N, D)."""
        if features.ndim != 2 or features.shape[1] != self.weights.shape[1]:
            raise ZeusError(f"the adapter takes {self.weights.shape[1]}-d features, got {features.shape}")
        return (features.astype(np.float32) @ self.weights.T + self.bias).astype(np.float32)

    def summary(self) -> dict[str, Any]:
        """What outputs record about the adapter (``zeus.adapter``)."""
        return {"sha256": self.sha256, "method": self.method["kind"], "strength": self.method["strength"],
                "slides": [s["name"] for s in self.header.get("slides", [])],
                "cv_mean_dice": self.header.get("cv", {}).get("adapted_mean"),
                "cv_zero_shot_mean_dice": self.header.get("cv", {}).get("zero_shot_mean")}

    def check(self, applied: Mapping[str, Any], source: str = "the adapter") -> None:
        """Refuse (one-line ZeusError) when ``applied`` (an :func:`identity`) differs from the adapter's."""
        mine = self.header["identity"]
        for key in IDENTITY_KEYS:
            if mine.get(key) != applied.get(key):
                raise ZeusError(f"{source} was learned with another {_WHAT[key]} ({_short(mine.get(key))}) than "
                                f"this run uses ({_short(applied.get(key))}); learn one for these settings")

    # -- file -----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        header = {**self.header, "format": FORMAT, "version": VERSION,
                  "weights_sha256": weights_sha256(self.weights, self.bias)}
        arrays = {"header": np.array(json.dumps(header, sort_keys=True, allow_nan=False)),
                  "weights": np.ascontiguousarray(self.weights, dtype="<f4"),
                  "bias": np.ascontiguousarray(self.bias, dtype="<f4")}
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in _MEMBERS:
                member = io.BytesIO()
                np.lib.format.write_array(member, arrays[name], version=(1, 0), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
                info.external_attr = 0o644 << 16
                zf.writestr(info, member.getvalue())
        return buf.getvalue()

    def save(self, path: str | Path) -> None:
        from .output_set import atomic_path

        with atomic_path(path, suffix=".npz") as tmp:
            Path(tmp).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> Adapter:
        """Read and check an adapter file; a one-line ZeusError naming the file for anything wrong with it."""
        p = Path(path)
        try:
            if p.stat().st_size > MAX_FILE_BYTES:
                raise ZeusError(f"larger than {MAX_FILE_BYTES >> 20} MB: not an adapter")
            with np.load(p, allow_pickle=False) as z:
                if not isinstance(z, np.lib.npyio.NpzFile) or sorted(z.files) != sorted(_MEMBERS):
                    raise ZeusError("not a zeus adapter (expected header, weights and bias)")
                raw = z["header"]
                if raw.dtype.kind != "U" or raw.shape != ():
                    raise ZeusError("damaged: the header is not a string")
                header = json.loads(str(raw))
                weights, bias = z["weights"], z["bias"]
        except FileNotFoundError:
            raise ZeusError(f"adapter not found: {p}") from None
        except IsADirectoryError:
            raise ZeusError(f"{p} is a folder, not an adapter file") from None
        except ZeusError as exc:
            raise ZeusError(f"adapter {p.name}: {exc}") from None
        except RecursionError:
            raise ZeusError(f"adapter {p.name}: damaged (header nested too deeply)") from None
        except Exception as exc:  # a truncated zip, a bad CRC, broken JSON: never used
            raise ZeusError(f"adapter {p.name}: damaged or not an adapter ({one_line(str(exc), 120)})") from None
        try:
            adapter = cls._checked(weights, bias, header)
        except ZeusError as exc:
            raise ZeusError(f"adapter {p.name}: {exc}") from None
        return adapter

    @classmethod
    def _checked(cls, weights: np.ndarray, bias: np.ndarray, header: Any) -> Adapter:
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ZeusError("not a zeus adapter (no zeus-adapter header)")
        if header.get("version") != VERSION:
            raise ZeusError(f"adapter format version {header.get('version')!r}; this zeus reads version {VERSION}")
        ident, method = header.get("identity"), header.get("method")
        if not isinstance(ident, dict) or any(k not in ident for k in IDENTITY_KEYS):
            raise ZeusError("damaged: the header does not say what the adapter was learned on")
        classes = ident["classes"]
        if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes)
                or ident["positive_class"] not in classes):
            raise ZeusError("damaged: bad classes in the header")
        if not isinstance(method, dict) or method.get("kind") not in KINDS:
            raise ZeusError("damaged: unknown adapter method")
        c = len(classes)
        if weights.dtype != np.dtype("<f4") or weights.ndim != 2 or weights.shape[0] != c \
                or not 0 < weights.shape[1] <= MAX_DIM:
            raise ZeusError(f"damaged: weights must be float32 ({c}, D), got {weights.dtype} {weights.shape}")
        if bias.dtype != np.dtype("<f4") or bias.shape != (c,):
            raise ZeusError(f"damaged: bias must be float32 ({c},), got {bias.dtype} {bias.shape}")
        if not (np.all(np.isfinite(weights)) and np.all(np.isfinite(bias))):
            raise ZeusError("damaged: the weights hold NaN or infinite values")
        if header.get("weights_sha256") != weights_sha256(weights, bias):
            raise ZeusError("damaged: the weights do not match their recorded hash")
        body = {k: v for k, v in header.items() if k not in ("format", "version", "weights_sha256")}
        return cls(weights, bias, body)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]


# -- fitting ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitStats:
    """Sufficient statistics of labelled patches: per-class sums and counts, the ridge normal equations, and the
    mean zero-shot top and bottom scores (the ridge targets' scale).

    Adding two (``+``) gives the statistics of both sets, so cross-validation refits cheaply from the other
    slides' statistics; ``names`` says which slides (or halves) a fit saw.
    """

    sums: np.ndarray  # (C, D) float64, sum of the features labelled with each class
    counts: np.ndarray  # (C,) int64
    gram: np.ndarray  # (D + 1, D + 1) float64, [X 1]^T [X 1]
    onehot: np.ndarray  # (D + 1, C) float64, [X 1]^T onehot(labels)
    high: float  # sum over the patches of their highest zero-shot score
    low: float  # ... and of their lowest
    n: int
    names: frozenset[str] = frozenset()

    def __add__(self, other: FitStats) -> FitStats:
        return FitStats(self.sums + other.sums, self.counts + other.counts, self.gram + other.gram,
                        self.onehot + other.onehot, self.high + other.high, self.low + other.low,
                        self.n + other.n, self.names | other.names)


def fit_stats(features: np.ndarray, labels: np.ndarray, text: np.ndarray, name: str = "") -> FitStats:
    """Statistics of unit ``features`` (N, D) labelled with class indices ``labels`` (N,) in [0, C)."""
    c, d = text.shape
    x32 = np.ascontiguousarray(features, dtype=np.float32)
    counts = np.bincount(labels, minlength=c).astype(np.int64)
    xa = np.concatenate([x32, np.ones((len(x32), 1), np.float32)], axis=1)
    onehot = np.zeros((len(labels), c), np.float32)
    onehot[np.arange(len(labels)), labels] = 1.0
    zs = x32 @ np.asarray(text, np.float32).T
    gram = (xa.T @ xa).astype(np.float64)  # float32 products: the cost of a learn run, twice as fast
    cross = (xa.T @ onehot).astype(np.float64)  # its first D rows are the per-class feature sums
    return FitStats(np.ascontiguousarray(cross[:d].T), counts, gram, cross,
                    float(zs.max(axis=1).sum()) if len(zs) else 0.0, float(zs.min(axis=1).sum()) if len(zs) else 0.0,
                    len(labels), frozenset([name]) if name else frozenset())


def fit(stats: FitStats, text: np.ndarray, kind: str, strength: float, shift: float = 0.0,
        positive: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(weights (C, D) float32, bias (C,) float32) of candidate ``kind`` at ``strength`` (module docstring).

    ``shift`` lowers the ``positive`` class's bias by that many mean zero-shot score spreads (top minus bottom
    score of the training patches): ZEUS's mask rule grows positive regions (its blur), so the best patch
    decision for the mask can be stricter than the labels' own.
    """
    w, b = _fit(stats, text, kind, strength)
    return w, shift_bias(b, stats, shift, positive)


def shift_bias(bias: np.ndarray, stats: FitStats, shift: float, positive: int | None) -> np.ndarray:
    """``bias`` with the positive class's entry lowered by ``shift`` mean zero-shot score spreads of ``stats``."""
    if not shift or positive is None:
        return bias
    out = bias.copy()
    out[positive] -= np.float32(shift * (stats.high - stats.low) / max(stats.n, 1))
    return out


def _fit(stats: FitStats, text: np.ndarray, kind: str, strength: float) -> tuple[np.ndarray, np.ndarray]:
    c, d = text.shape
    text64 = np.asarray(text, dtype=np.float64)
    if kind == "prototype":
        means = stats.sums / np.maximum(stats.counts, 1)[:, None]
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        visual = np.divide(means, norms, out=np.zeros_like(means), where=norms > 0)
        a = np.where(stats.counts > 0, float(strength), 0.0)[:, None]
        w = (1 - a) * text64 + a * visual
        w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
        return w.astype(np.float32), np.zeros(c, np.float32)
    if kind == "ridge":
        n = max(stats.n, 1)
        lam = float(strength) * n
        high, low = stats.high / n, stats.low / n
        cross = low * stats.gram[:, d:] + (high - low) * stats.onehot  # [X 1]^T Y, Y = low + (high - low) onehot
        prior = np.concatenate([text64.T, np.zeros((1, c))], axis=0)  # (D + 1, C)
        factor = scipy.linalg.cho_factor(stats.gram + lam * np.eye(d + 1))  # positive definite for lam > 0
        sol = scipy.linalg.cho_solve(factor, cross + lam * prior)
        return sol[:d].T.astype(np.float32), sol[d].astype(np.float32)
    raise ValueError(f"unknown adapter kind {kind!r}")


SHIFTS = (0.25, 0.5, 1.0)  # tried on the best (kind, strength) once it is chosen with no shift


def candidates() -> list[tuple[str, float]]:
    """The (kind, strength) pairs ``zeus learn`` cross-validates (each with no shift, then the best with SHIFTS)."""
    return [("prototype", a) for a in (0.1, 0.25, 0.5, 0.75, 1.0)] + [("ridge", lam) for lam in (0.1, 0.01, 0.001)]

