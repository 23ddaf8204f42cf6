"""Label masks from annotations, as QuPath's ``LabeledImageServer`` draws them for
``groovy/export_training_data.groovy``, and the class labels both routes share.

- ``labels.json`` (:func:`label_map`): the label of each class, the same for every slide: ``{"background": 0,
  <positive class>: 1, <other classes>: 2, 3, ...}``, or the order of ``classes`` when given. Names that differ
  only in case share a label (:func:`class_key`); classes ending in ``*`` (QuPath's ``Ignore*``, ``Region*``)
  and unclassified annotations get no label.
- ``<name>.labels.png`` (``.labels.tif`` when the mask is larger than ``MAX_PNG_SIDE`` px on a side or
  ``MAX_PNG_PIXELS`` px in all; :func:`write_mask`): drawn with rasterio (:func:`rasterize_labels`); background
  0; where annotations of different classes overlap, the higher label is on top. Its size is
  ``round(width / downsample) x round(height / downsample)`` (:func:`mask_side`), as QuPath writes a
  downsampled image.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from zeus_qupath.geometry import polygonal
from zeus_qupath.output_set import atomic_path
from zeus_qupath.qupath_geojson import QuPathObject

from .edits import zeus_class_from_name

if TYPE_CHECKING:
    from .export_sources import SlideSource

DEFAULT_POSITIVE_CLASS = "Tumor"
LABELS_JSON = "labels.json"
MAX_PNG_SIDE = 32767
MAX_PNG_PIXELS = 2**28


def class_key(class_name: str) -> str:
    """Class names that differ only in case are one class: the key both export routes compare by.

    ``str.lower()`` here, ``String.toLowerCase(Locale.ROOT)`` in ``export_training_data.groovy``
    (both apply Unicode's default lower-case mapping; unlike ``casefold`` they keep "ß").
    """
    return class_name.lower()


def _most_common(names: Iterable[str]) -> str | None:
    """The most frequent name; among equally frequent names, the one met first."""
    counts: Counter[str] = Counter(names)
    return counts.most_common(1)[0][0] if counts else None


def positive_class_of(sources: Sequence[SlideSource]) -> str:
    """The class label 1 goes to, when none is given (the rule ``export_training_data.groovy`` follows).

    The most frequent class of ZEUS's annotations as published for the exported slides (the
    project's ``data/<entryID>/zeus_annotations.geojson``, or the originals of a folder), in slide
    order; else of the exported annotations named ``"ZEUS <class>"``; else ``Tumor``. Ties go to
    the class met first.
    """
    published = _most_common(c for src in sources for c in src.zeus_classes)
    if published is not None:
        return published
    named = _most_common(c for src in sources for o in src.corrected if o.object_type == "annotation"
                         and (c := zeus_class_from_name(o.name)))
    return named or DEFAULT_POSITIVE_CLASS


def label_map(sources: Sequence[SlideSource], positive_class: str, classes: Sequence[str] | None = None,
              ) -> dict[str, int]:
    """``{"background": 0, <class>: 1, ...}``: ``classes`` in order, or the shared rule below.

    The rule (``export_training_data.groovy`` implements the same one): the classes of the exported
    annotations that have an area, without QuPath's ``*`` classes (``Ignore*``, ``Region*``); names
    that differ only in case (``class_key``) share one label and are all listed; the positive class
    gets 1, the others 2, 3, ... in the order of their keys (Unicode code points); spellings of one
    class are listed in code point order.
    """
    labels: dict[str, int] = {"background": 0}
    if classes is not None:
        for i, name in enumerate(classes, start=1):
            labels[name] = i
        return labels
    spellings: dict[str, set[str]] = {}
    for src in sources:
        for obj in area_annotations(src.corrected):
            if obj.class_name and not obj.class_name.endswith("*"):
                spellings.setdefault(class_key(obj.class_name), set()).add(obj.class_name)
    positive = spellings.pop(class_key(positive_class), None)
    next_label = 1
    if positive is not None:
        for name in sorted(positive):
            labels[name] = 1
        next_label = 2
    for key in sorted(spellings):
        for name in sorted(spellings[key]):
            labels[name] = next_label
        next_label += 1
    return labels


def area_annotations(objects: Iterable[QuPathObject]) -> list[QuPathObject]:
    """Annotations with an area (points and lines, e.g. a ruler, are neither counted nor drawn)."""
    out = []
    for obj in objects:
        if obj.object_type == "annotation":
            geom = polygonal(obj.geometry)
            if geom is not None and geom.area > 0:
                out.append(obj)
    return out


def mask_side(size: int, downsample: float) -> int:
    """Pixels of a downsampled side, rounded half up as QuPath rounds a downsampled region."""
    return max(1, math.floor(size / downsample + 0.5))


def _java2d_device(geometry: BaseGeometry, downsample: float) -> BaseGeometry:
    """``geometry`` in mask pixels, each coordinate ``c / downsample`` (float) moved to ``floor(c + 0.25) + 0.25``
    as Java2D's default stroke normalisation does (``ShapeSpanIterator``) when ``LabeledImageServer`` fills
    it. Edges parallel to the axes then fall on the pixels QuPath fills; along slanted edges Java2D's
    software loops may still differ by one pixel (measured in tests/test_export.py on real QuPath)."""
    def snap(coords: np.ndarray) -> np.ndarray:
        device = (coords / downsample).astype(np.float32)
        return np.floor(device + np.float32(0.25)).astype(np.float64) + 0.25

    return shapely.transform(geometry, snap)


def rasterize_labels(objects: Iterable[QuPathObject], labels: Mapping[str, int], width: int, height: int,
                     downsample: float) -> np.ndarray:
    """A label mask (H, W) at ``downsample``, drawn as QuPath's ``LabeledImageServer`` draws it.

    Background 0; class by class in label order, so where classes overlap the higher label is on top
    (``export_training_data.groovy`` adds the labels in that order); only annotations with an area;
    coordinates normalised as Java2D does (``_java2d_device``), then a pixel is filled when its centre
    is inside (rasterio); slanted edges may differ from QuPath's mask by one pixel.
    """
    from rasterio.features import rasterize
    from rasterio.transform import Affine

    by_key = {class_key(k): v for k, v in labels.items() if v > 0}
    shape = (mask_side(height, downsample), mask_side(width, downsample))
    dtype = np.uint8 if max(by_key.values(), default=0) <= 255 else np.uint16
    drawn = []
    for obj in area_annotations(objects):
        label = by_key.get(class_key(obj.class_name)) if obj.class_name else None
        geom = polygonal(obj.geometry) if label else None
        if geom is not None:
            drawn.append((_java2d_device(geom, downsample), label))
    drawn.sort(key=lambda item: item[1])  # stable: higher labels drawn later, on top
    if not drawn:
        return np.zeros(shape, dtype=dtype)
    return rasterize(drawn, out_shape=shape, transform=Affine.identity(), fill=0, dtype=dtype)


def mask_suffix(shape: tuple[int, ...]) -> str:
    """``".png"``, or ``".tif"`` for a mask too large for a PNG."""
    h, w = shape[:2]
    return ".png" if max(h, w) <= MAX_PNG_SIDE and h * w <= MAX_PNG_PIXELS else ".tif"


def write_mask(base: Path, mask: np.ndarray) -> Path:
    """``<base>.png``, or ``<base>.tif`` (tiled, deflate) when the mask is too large for a PNG."""
    path = base.with_name(base.name + mask_suffix(mask.shape))
    if path.suffix == ".png":
        from PIL import Image

        with atomic_path(path) as tmp:
            Image.fromarray(mask).save(tmp, format="PNG", optimize=False)
        return path
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, mask, photometric="minisblack", compression="zlib", tile=(512, 512))
    return path
