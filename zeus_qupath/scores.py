"""The scores file: the interchange format between embedding and polygons (design.md section 7).

``<slide>.scores.npz`` holds ``coords`` int64 (N, 2) patch top-left (x, y) in level-0 px, ``scores``
float32 (N, C) cosine similarities, ``classes`` str (C,), ``positive_class`` str, ``patch_size`` and
``stride`` int (level-0 px), ``width`` and ``height`` int (level-0 px), ``mpp`` float (NaN if unknown)
and ``meta`` str (JSON). Anyone can write one and turn it into polygons without a GPU.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import ZeusError

REQUIRED = ("coords", "scores", "classes", "positive_class", "patch_size", "stride", "width", "height", "mpp", "meta")


@dataclass(frozen=True)
class PatchScores:
    coords: np.ndarray
    scores: np.ndarray
    classes: tuple[str, ...]
    positive_class: str
    patch_size: int
    stride: int
    width: int
    height: int
    mpp: float | None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.coords.shape[0]
        if self.coords.ndim != 2 or self.coords.shape[1] != 2:
            raise ZeusError(f"coords must be (N, 2), got {self.coords.shape}")
        if self.scores.ndim != 2 or self.scores.shape != (n, len(self.classes)):
            raise ZeusError(f"scores must be (N={n}, C={len(self.classes)}), got {self.scores.shape}")
        if self.positive_class not in self.classes:
            raise ZeusError(f"positive class {self.positive_class!r} is not one of {list(self.classes)}")
        if min(self.patch_size, self.stride, self.width, self.height) <= 0:
            raise ZeusError("patch_size, stride, width and height must be positive")
        if n and self.coords.min() < 0:  # any grid: one lattice, one per tissue contour (CLAM/ZEUS), or none
            raise ZeusError("coords must be non-negative level-0 px")
        if not np.all(np.isfinite(self.scores)):
            raise ZeusError("scores contain NaN or infinite values")

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class)

    def save(self, path: str | os.PathLike[str]) -> None:
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(
                tmp,
                coords=self.coords.astype(np.int64),
                scores=self.scores.astype(np.float32),
                classes=np.array(self.classes, dtype=str),
                positive_class=np.array(self.positive_class),
                patch_size=np.array(self.patch_size, dtype=np.int64),
                stride=np.array(self.stride, dtype=np.int64),
                width=np.array(self.width, dtype=np.int64),
                height=np.array(self.height, dtype=np.int64),
                mpp=np.array(math.nan if self.mpp is None else self.mpp, dtype=np.float64),
                meta=np.array(json.dumps(self.meta)),
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PatchScores:
        p = Path(path)
        try:
            with np.load(p, allow_pickle=False) as z:
                missing = [k for k in REQUIRED if k not in z.files]
                if missing:
                    raise ZeusError(f"not a scores file (missing {', '.join(missing)})")
                mpp = float(z["mpp"])
                return cls(
                    coords=z["coords"].astype(np.int64).reshape(-1, 2),
                    scores=z["scores"].astype(np.float32).reshape(z["coords"].shape[0], -1),
                    classes=tuple(str(c) for c in z["classes"]),
                    positive_class=str(z["positive_class"]),
                    patch_size=int(z["patch_size"]),
                    stride=int(z["stride"]),
                    width=int(z["width"]),
                    height=int(z["height"]),
                    mpp=mpp if math.isfinite(mpp) and mpp > 0 else None,
                    meta=json.loads(str(z["meta"]) or "{}"),
                )
        except FileNotFoundError:
            raise ZeusError(f"scores file not found: {p}") from None
        except ZeusError as exc:
            raise ZeusError(f"{p.name}: {exc}") from None
        except (OSError, ValueError, zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
            raise ZeusError(f"{p.name}: not a readable scores file ({exc})") from None
