"""Patch labels from an annotator's corrected annotations: the one rule ``zeus learn`` trains and scores by.

ZEUS decides at the granularity of stride cells (every pixel of one stride cell is covered by the same
patches, :mod:`zeus_qupath.reconstruct`), so a patch is labelled by its *central cell*: the
``stride`` x ``stride`` level-0 square centred on the patch (for 448 / 112: ``[x + 168, x + 280)``). The rule,
applied to every patch of the slide's grid (the grid holds tissue patches only):

1. Each annotation is read by its class (names compared ignoring case):
   - a class of the prompt set, or one mapped onto it (``class_map``, e.g. ``{"Stroma": "normal"}``), labels
     its area with that class; a class mapped onto ``"negative"`` labels it as the negative side;
   - any other class (Stroma, Necrosis, ... that the prompts lack) labels its area as the negative side;
   - ``Ignore*`` (QuPath's class for areas to leave out) and unclassified annotations: every cell they
     touch is left out;
   - ``Region*`` and other classes ending in ``*`` are transparent: they label nothing and exclude nothing.
2. Tissue that no labelling annotation covers is the negative side (holes of an annotation are uncovered).
3. A cell's *label set* holds the label of every labelling annotation whose interior meets the cell, plus
   the negative side when the labelling annotations do not cover the whole cell. Overlapping annotations of
   one class are one area.
4. One element -> that label. Several, none of them the positive class -> the generic negative side (the
   ZEUS decision is positive versus everything else, so a cell of Stroma and unannotated tissue is not
   mixed for it). The positive class together with anything else -> *mixed*: left out.

"Meets" and "covers" are taken on the cell shrunk by :data:`EDGE_PX` on each side, so an outline that
runs along a cell edge (QuPath stores float32 coordinates) does not make its neighbour mixed.

Labels are prompt class indices, :data:`NEGATIVE` (the generic negative side: any non-positive class)
or :data:`LEFT_OUT`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from .errors import ZeusError

NEGATIVE = -1  # the negative side: tissue no class covers, classes the prompts lack
LEFT_OUT = -2  # mixed cells, Ignore* and unclassified areas
EDGE_PX = 0.5
NEGATIVE_TARGET = "negative"  # class_map value: label this annotator class as the negative side


@dataclass(frozen=True)
class Correction:
    """One corrected annotation as the rule reads it: its class (None: unclassified) and level-0 geometry."""

    class_name: str | None
    geometry: BaseGeometry


@dataclass(frozen=True)
class LabelRule:
    """The prompt classes, the positive one, and annotator classes mapped onto prompt classes (or ``negative``)."""

    classes: tuple[str, ...]
    positive_class: str
    class_map: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.positive_class not in self.classes:
            raise ZeusError(f"positive class {self.positive_class!r} is not one of {list(self.classes)}")
        keys = {c.lower(): c for c in self.classes}
        for src, dst in (self.class_map or {}).items():
            if dst.lower() != NEGATIVE_TARGET and dst.lower() not in keys:
                raise ZeusError(f"class map {src}={dst}: {dst!r} is not a prompt class "
                                f"({', '.join(self.classes)}) nor {NEGATIVE_TARGET!r}")

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class)

    def label_of(self, class_name: str | None) -> int | str:
        """A class's label, or ``"exclude"`` (Ignore*, unclassified) or ``"transparent"`` (Region*, other *)."""
        if class_name is None or not class_name.strip():
            return "exclude"
        name = class_name.strip()
        if name.endswith("*"):
            return "exclude" if name.lower().startswith("ignore") else "transparent"
        mapped = {k.lower(): v for k, v in (self.class_map or {}).items()}.get(name.lower(), name)
        if mapped.lower() == NEGATIVE_TARGET:
            return NEGATIVE
        keys = {c.lower(): i for i, c in enumerate(self.classes)}
        index = keys.get(mapped.lower())
        if index is None:
            return NEGATIVE
        return NEGATIVE if index != self.positive_index and len(self.classes) == 2 else index


@dataclass(frozen=True)
class PatchLabels:
    """One label per grid patch (class index, :data:`NEGATIVE` or :data:`LEFT_OUT`) and the areas read."""

    labels: np.ndarray  # (N,) int64
    positive: BaseGeometry  # the positive class's area (level-0 px)
    excluded: BaseGeometry  # Ignore* and unclassified areas

    def counts(self, classes: Sequence[str]) -> dict[str, int]:
        return label_counts(self.labels, classes)


def label_counts(labels: np.ndarray, classes: Sequence[str], skip_empty: bool = False) -> dict[str, int]:
    """Patches per class label, then ``negative`` and ``left out`` (with ``skip_empty``, no class without a patch)."""
    out = {c: int(np.sum(labels == i)) for i, c in enumerate(classes)}
    if skip_empty:
        out = {c: n for c, n in out.items() if n}
    out["negative"] = int(np.sum(labels == NEGATIVE))
    out["left out"] = int(np.sum(labels == LEFT_OUT))
    return out


def central_cells(coords: np.ndarray, patch_size: int, stride: int, inset: float = EDGE_PX) -> np.ndarray:
    """(N,) shapely boxes: each patch's central ``stride`` x ``stride`` cell, shrunk by ``inset`` px a side."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    lo = coords + (patch_size - stride) / 2.0 + inset
    hi = coords + (patch_size + stride) / 2.0 - inset
    return shapely.box(lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1])


def _union(geoms: Iterable[BaseGeometry]) -> BaseGeometry:
    parts = [g if g.is_valid else shapely.make_valid(g) for g in geoms if g is not None and not g.is_empty]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _meets(geom: BaseGeometry, cells: np.ndarray) -> np.ndarray:
    if geom.is_empty:
        return np.zeros(len(cells), dtype=bool)
    shapely.prepare(geom)
    return shapely.intersects(geom, cells) & ~shapely.touches(geom, cells)


def _covers(geom: BaseGeometry, cells: np.ndarray) -> np.ndarray:
    if geom.is_empty:
        return np.zeros(len(cells), dtype=bool)
    shapely.prepare(geom)
    return shapely.covers(geom, cells)


def patch_labels(coords: np.ndarray, patch_size: int, stride: int, annotations: Sequence[Correction],
                 rule: LabelRule) -> PatchLabels:
    """The label of every patch at ``coords`` (level-0 top-lefts) by the rule of this module's docstring."""
    n = len(coords)
    cells = central_cells(coords, patch_size, stride)
    by_label: dict[int, list[BaseGeometry]] = {}
    excluded: list[BaseGeometry] = []
    for ann in annotations:
        label = rule.label_of(ann.class_name)
        if label == "transparent":
            continue
        if label == "exclude":
            excluded.append(ann.geometry)
        else:
            by_label.setdefault(int(label), []).append(ann.geometry)
    areas = {label: _union(geoms) for label, geoms in sorted(by_label.items())}
    everything = _union(areas.values())
    pos = rule.positive_index
    meets = {label: _meets(area, cells) for label, area in areas.items()}
    uncovered = ~_covers(everything, cells)
    n_sets = np.zeros(n, dtype=np.int64)
    single = np.full(n, NEGATIVE, dtype=np.int64)
    for label, hit in meets.items():
        n_sets += hit
        single = np.where(hit, label, single)
    n_sets += uncovered  # the uncovered rest of the cell is the negative side
    if NEGATIVE in meets:  # ... which a negative-labelled area meeting the cell already counted
        n_sets -= meets[NEGATIVE] & uncovered
    has_pos = meets.get(pos, np.zeros(n, dtype=bool))
    labels = np.where(n_sets == 1, np.where(uncovered, NEGATIVE, single), NEGATIVE)
    labels = np.where(has_pos & (n_sets > 1), LEFT_OUT, labels)
    excluded_area = _union(excluded)
    labels = np.where(_meets(excluded_area, cells), LEFT_OUT, labels).astype(np.int64)
    return PatchLabels(labels, areas.get(pos, shapely.Polygon()), excluded_area)
