"""Dice, precision and recall of a predicted tumor region against ground truth, inside tissue (ZEUS protocol).

Either side may be QuPath GeoJSON (level-0 px; annotations of ``class_name``, or all polygonal
annotations when no class is given; the polygons of a GeometryCollection count, as ``zeus export`` counts
them) or a mask image (PNG/TIFF/NPY, non-zero = positive) at any scale of the slide (a mask spans the whole
slide, so its aspect must be the slide's: a mask of another aspect is refused).

Two GeoJSON files are compared exactly, by geometry: the areas of intersection and differences in level-0
px^2, clipped to the slide (and to the tissue's polygons when ``tissue`` is given), so no shape vanishes on a
raster. With a mask on either side everything is compared on the finest mask's raster (``pixel_size`` in
the result: level-0 px per raster pixel).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from PIL import Image
from shapely.geometry import box

from .errors import ZeusError
from .geometry import polygon_parts
from .slide import Slide

MASK_SUFFIXES = {".png", ".npy", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}
GEOJSON_SUFFIXES = {".geojson", ".json"}


@dataclass(frozen=True)
class Scores:
    dice: float
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int
    pixels: int
    pixel_size: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def read_mask_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Boolean mask from a PNG/TIFF/NPY file (non-zero = positive)."""
    p = Path(path)
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            Image.MAX_IMAGE_PIXELS = None
            with Image.open(p) as im:
                arr = np.asarray(im.convert("L"))
    except FileNotFoundError:
        raise ZeusError(f"mask not found: {p}") from None
    except Exception as exc:
        raise ZeusError(f"cannot read mask {p.name}: {exc}") from None
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2:
        raise ZeusError(f"mask {p.name} must be 2-D, got shape {arr.shape}")
    return arr > 0


def read_geometry(path: str | os.PathLike[str], class_name: str | None) -> shapely.Geometry:
    """Union of the polygonal annotations (of ``class_name``, if given) in a QuPath GeoJSON file."""
    from .qupath_geojson import read_qupath_geojson

    objs = read_qupath_geojson(path)
    polys = [
        part for o in objs
        if o.object_type == "annotation" and (class_name is None or (o.class_name or "").lower() == class_name.lower())
        for part in polygon_parts(o.geometry)
    ]
    return shapely.union_all(polys) if polys else shapely.Polygon()


def geometry_scores(pred: shapely.Geometry, gt: shapely.Geometry, region: shapely.Geometry) -> Scores:
    """Dice/precision/recall of two shapes by their areas inside ``region`` (level-0 px^2, exact)."""
    pred, gt = pred.intersection(region), gt.intersection(region)
    tp = shapely.area(pred.intersection(gt)) if not (pred.is_empty or gt.is_empty) else 0.0
    fp = max(0.0, pred.area - tp)
    fn = max(0.0, gt.area - tp)
    dice = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    precision = tp / (tp + fp) if (tp + fp) else (1.0 if fn == 0 else 0.0)
    recall = tp / (tp + fn) if (tp + fn) else 1.0
    return Scores(dice, precision, recall, round(tp), round(fp), round(fn), round(region.area), 1.0)


def _check_aspect(mask: np.ndarray, width: float, height: float, what: str) -> None:
    """A mask spans the whole slide: its aspect must be the slide's (to a pixel of the mask)."""
    h, w = mask.shape
    expected_h = w * height / width
    if abs(expected_h - h) > 1 + 0.01 * h:
        raise ZeusError(f"{what} is {w} x {h} px, which is not the aspect of the {width:g} x {height:g} px "
                        f"{'slide' if what != 'the other mask' else 'mask'}: a mask must span the whole slide")


def rasterize(geom: shapely.Geometry, shape: tuple[int, int], pixel_size: float) -> np.ndarray:
    """Boolean raster (rows, cols) of ``geom``; pixel (r, c) covers level-0 [c*ps, (c+1)*ps) x [r*ps, ...)."""
    if geom.is_empty:
        return np.zeros(shape, dtype=bool)
    # only the raster's extent matters; clipping first keeps far-away vertices from costing GDAL its precision
    geom = geom.intersection(box(0, 0, shape[1] * pixel_size, shape[0] * pixel_size))
    if geom.is_empty:
        return np.zeros(shape, dtype=bool)
    transform = Affine(pixel_size, 0, 0, 0, pixel_size, 0)
    return rasterio.features.rasterize([(geom, 1)], out_shape=shape, transform=transform, dtype=np.uint8) > 0


def _resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    ys = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1).astype(np.int64)
    xs = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1).astype(np.int64)
    return mask[np.ix_(ys, xs)]


def dice_scores(pred: np.ndarray, gt: np.ndarray, tissue: np.ndarray | None = None, pixel_size: float = 1.0) -> Scores:
    """Dice/precision/recall of two boolean rasters, counted inside ``tissue`` when given."""
    if tissue is not None:
        pred, gt = pred & tissue, gt & tissue
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred & ~gt))
    fn = int(np.count_nonzero(~pred & gt))
    dice = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    precision = tp / (tp + fp) if (tp + fp) else (1.0 if fn == 0 else 0.0)
    recall = tp / (tp + fn) if (tp + fn) else 1.0
    n = int(tissue.sum()) if tissue is not None else int(pred.size)
    return Scores(dice, precision, recall, tp, fp, fn, n, pixel_size)


def evaluate(
    pred: str | os.PathLike[str],
    gt: str | os.PathLike[str],
    *,
    tissue: str | os.PathLike[str] | None = None,
    slide: str | os.PathLike[str] | None = None,
    size: tuple[int, int] | None = None,
    class_name: str | None = None,
) -> Scores:
    """Compare ``pred`` with ``gt`` (each GeoJSON or a mask image) inside tissue."""
    kinds = {}
    for label, path in (("prediction", pred), ("ground truth", gt)):
        suffix = Path(path).suffix.lower()
        if suffix in GEOJSON_SUFFIXES:
            kinds[label] = "geojson"
        elif suffix in MASK_SUFFIXES:
            kinds[label] = "mask"
        else:
            raise ZeusError(f"{label} {Path(path).name}: expected GeoJSON (.geojson/.json) or a mask (.png/.tif/.npy)")
    # --tissue: a mask image (PNG/JPEG/NPY) or a slide (anything else, TIFF included)
    tissue_is_slide = tissue is not None and Path(tissue).suffix.lower() not in {".png", ".npy", ".jpg", ".jpeg"}
    slide_path = slide or (tissue if tissue_is_slide else None)
    dims = size
    if dims is None and slide_path is not None:
        with Slide(slide_path) as s:
            dims = s.dimensions
    masks = {label: read_mask_image(p) for label, p in (("prediction", pred), ("ground truth", gt))
             if kinds[label] == "mask"}
    for label, mask in masks.items():
        if dims is not None:
            _check_aspect(mask, dims[0], dims[1], f"{label} mask {Path(pred if label == 'prediction' else gt).name}")
    if len(masks) == 2 and dims is None:
        gt_mask = masks["ground truth"]
        _check_aspect(masks["prediction"], gt_mask.shape[1], gt_mask.shape[0], "the prediction mask")
    if not masks:
        if dims is None:
            raise ZeusError("comparing two GeoJSON files needs the slide size: pass --slide SLIDE or --size W,H")
        region: shapely.Geometry = box(0, 0, dims[0], dims[1])
        if tissue is not None:
            region = region.intersection(_tissue_geometry(tissue, tissue_is_slide, dims))
        return geometry_scores(read_geometry(pred, class_name), read_geometry(gt, class_name), region)
    shape = max((m.shape for m in masks.values()), key=lambda s: s[0] * s[1])
    if dims is None and len(masks) < 2:
        raise ZeusError("comparing GeoJSON with a mask needs the slide size: pass --slide SLIDE or --size W,H")
    pixel_size = dims[0] / shape[1] if dims else 1.0
    rasters = {}
    for label, path in (("prediction", pred), ("ground truth", gt)):
        if kinds[label] == "mask":
            rasters[label] = _resize_nearest(masks[label], shape)
        else:
            rasters[label] = rasterize(read_geometry(path, class_name), shape, pixel_size)
    tissue_mask = None
    if tissue is not None:
        if tissue_is_slide:
            from .tissue import detect_tissue  # OpenCV: only for a tissue mask detected on a slide

            with Slide(tissue) as s:
                t = detect_tissue(s)
            tissue_mask = _resize_nearest(t.mask, shape)
        else:
            tissue_mask = _resize_nearest(read_mask_image(tissue), shape)
    return dice_scores(rasters["prediction"], rasters["ground truth"], tissue_mask, pixel_size)


def _tissue_geometry(tissue: str | os.PathLike[str], is_slide: bool, dims: tuple[int, int]) -> shapely.Geometry:
    """The tissue as level-0 polygons: from the slide's tissue mask, or a mask image spanning the slide."""
    if is_slide:
        from .tissue import detect_tissue  # OpenCV: only for a tissue mask detected on a slide

        with Slide(tissue) as s:
            mask = detect_tissue(s).mask
    else:
        mask = read_mask_image(tissue)
        _check_aspect(mask, dims[0], dims[1], f"tissue mask {Path(tissue).name}")
    sx, sy = dims[0] / mask.shape[1], dims[1] / mask.shape[0]
    shapes = rasterio.features.shapes(mask.astype(np.uint8), mask=mask, transform=Affine(sx, 0, 0, 0, sy, 0))
    polys = [shapely.geometry.shape(geom) for geom, value in shapes if value]
    return shapely.union_all(polys) if polys else shapely.Polygon()
