"""What a segmentation run is asked to do: the defaults, the threshold rule and :class:`SegmentParams`.

Imports only the standard library (and :mod:`zeus_qupath.errors`), so the CLI, the service's config and
light commands can name the defaults without loading OpenCV, scipy or model code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ZeusError

DEFAULT_MODEL = "keep"  # KEEP: a model ZEUS evaluated (with CONCH and MUSK), public MIT weights
DEFAULT_PATCH_SIZE = 448  # px at the cutting resolution, as ZEUS
DEFAULT_STRIDE = 112  # px between patches, as ZEUS
TISSUE_RULES = ("zeus", "coarse")  # tissue and patch rule: "zeus" (CLAM's, as ZEUS runs it) or "coarse"
DEFAULT_TISSUE_RULE = "zeus"
DEFAULT_THRESHOLD = "zeus"


@dataclass(frozen=True)
class Threshold:
    """How scores become a mask: ``zeus`` (default), ``argmax`` or ``prob`` with ``value``."""

    method: str = DEFAULT_THRESHOLD
    value: float = 0.5

    @classmethod
    def parse(cls, text: str) -> Threshold:
        t = text.strip().lower()
        if t in ("zeus", "argmax"):
            return cls(t)
        if t.startswith("prob:"):
            try:
                value = float(t[5:])
            except ValueError:
                value = math.nan
            if not 0.0 < value < 1.0:
                raise ZeusError(f"--threshold prob:P needs 0 < P < 1, got {text!r}")
            return cls("prob", value)
        raise ZeusError(f"--threshold must be zeus, argmax or prob:P, got {text!r}")

    def __str__(self) -> str:
        return f"prob:{self.value:g}" if self.method == "prob" else self.method


@dataclass(frozen=True)
class SegmentParams:
    """Patch geometry, batching, the threshold and the polygon, tissue and sampling rules of a run."""

    patch_size: int = DEFAULT_PATCH_SIZE
    stride: int = DEFAULT_STRIDE
    target_mpp: float | None = None
    mpp: float | None = None
    batch_size: int = 64
    workers: int = 2
    threshold: Threshold = field(default_factory=Threshold)
    min_area_um2: float = 0.0
    min_hole_area_um2: float = 0.0
    tolerance_px: float | None = None
    detect_tissue: bool = True
    tissue: str = DEFAULT_TISSUE_RULE
    heatmap_tiles: bool = False  # also write <stem>.tiles.geojson: the scores as QuPath tiles (heatmap.py)
    sampling: str = "exact"  # which patches are embedded: exact (every grid patch, ZEUS) or adaptive (sampling.py)
