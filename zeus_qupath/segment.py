"""One slide, end to end: tissue -> grid -> embeddings -> scores -> mask -> polygons -> outputs.

``segment_slide`` writes ``<stem>.geojson``, ``<stem>.scores.npz`` and ``<stem>.overlay.png`` into the
output folder, each atomically, and returns a :class:`SlideReport` for ``run.json``.
``polygons_from_scores`` is the model-free second half (``zeus polygons``).
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from PIL import Image
from shapely.geometry.base import BaseGeometry

from .annotations import build_annotations
from .embed import embed_grid
from .errors import SlideError
from .geojson import feature_collection, write_geojson
from .grid import PatchGeometry, make_grid
from .models.base import Encoder
from .overlay import render_overlay, write_png
from .polygons import PolygonParams, mask_polygons, tissue_geometry
from .prompts import PromptSet
from .reconstruct import Threshold, zeus_mask
from .scores import PatchScores
from .scoring import cosine_scores
from .slide import Slide
from .tissue import TissueMask, detect_tissue, full_tissue

OVERLAY_MAX_SIDE = 2048


@dataclass(frozen=True)
class SegmentParams:
    patch_size: int = 448
    stride: int = 112
    target_mpp: float | None = None
    mpp: float | None = None
    batch_size: int = 64
    workers: int = 2
    threshold: Threshold = field(default_factory=Threshold)
    min_area_um2: float = 0.0
    min_hole_area_um2: float = 0.0
    tolerance_px: float | None = None
    detect_tissue: bool = True


@dataclass
class SlideReport:
    slide: str
    stem: str
    width: int
    height: int
    mpp: float | None
    patches: int
    tissue_fraction: float
    regions: int
    tumor_area_um2: float | None
    seconds: dict[str, float]
    patches_per_s: float
    outputs: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_stem(slide_path: str | Path) -> str:
    """File stem for a slide's outputs (``a.ome.tif`` -> ``a``)."""
    name = Path(slide_path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def encode_tissue(tissue: TissueMask) -> dict[str, Any]:
    """The tissue mask as a small JSON-able dict (PNG, base64), stored in the scores file's meta."""
    buf = io.BytesIO()
    Image.fromarray(tissue.mask.astype(np.uint8) * 255).save(buf, format="PNG", optimize=True)
    return {"downsample": tissue.downsample, "png": base64.b64encode(buf.getvalue()).decode("ascii")}


def decode_tissue(meta: dict[str, Any]) -> TissueMask | None:
    info = meta.get("tissue")
    if not info:
        return None
    with Image.open(io.BytesIO(base64.b64decode(info["png"]))) as im:
        return TissueMask(mask=np.asarray(im.convert("L")) > 127, downsample=float(info["downsample"]))


def patch_geometry(params: SegmentParams, mpp: float | None) -> PatchGeometry:
    if params.target_mpp is None:
        return PatchGeometry(params.patch_size, params.stride, 1.0)
    if mpp is None:
        raise SlideError("pixel size unknown: --target-mpp needs the slide's mpp; pass --mpp X")
    return PatchGeometry(params.patch_size, params.stride, params.target_mpp / mpp)


def polygons_from_scores(
    scores: PatchScores, threshold: Threshold, params: SegmentParams, clip: BaseGeometry | None = None
) -> list[shapely.Polygon]:
    """Polygons of the positive class (level-0 px), clipped to the tissue stored in the scores file."""
    if clip is None:
        tissue = decode_tissue(scores.meta)
        clip = tissue_geometry(tissue) if tissue is not None else None
    area_unit = scores.mpp**2 if scores.mpp else 1.0  # um^2 per px^2; px when mpp is unknown
    poly_params = PolygonParams(
        min_area=params.min_area_um2 / area_unit,
        min_hole_area=params.min_hole_area_um2 / area_unit,
        tolerance=params.tolerance_px,
    )
    mask = zeus_mask(scores, threshold=threshold)
    return mask_polygons(mask, poly_params, clip=clip)


def geojson_from_scores(scores: PatchScores, threshold: Threshold, params: SegmentParams,
                        clip: BaseGeometry | None = None) -> dict[str, Any]:
    return feature_collection(build_annotations(polygons_from_scores(scores, threshold, params, clip), scores))


def segment_slide(
    slide_path: str | Path,
    encoder: Encoder,
    prompts: PromptSet,
    prototypes: np.ndarray,
    params: SegmentParams,
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> SlideReport:
    """Segment one slide and write its three outputs; ``progress(total, ...)`` makes a per-patch callback."""
    out = Path(out_dir)
    stem = output_stem(slide_path)
    seconds: dict[str, float] = {}
    warnings: list[str] = []
    t0 = time.perf_counter()
    with Slide(slide_path, mpp=params.mpp) as slide:
        info = slide.info
        geometry = patch_geometry(params, info.mpp)
        tissue = detect_tissue(slide) if params.detect_tissue else full_tissue(info.width, info.height)
        thumb_ds = max(1.0, max(info.width, info.height) / OVERLAY_MAX_SIDE)
        thumbnail = slide.read_downsampled(thumb_ds)
    seconds["tissue"] = time.perf_counter() - t0
    grid = make_grid(info.width, info.height, geometry, tissue)
    if len(grid) == 0:
        warnings.append(f"{Path(slide_path).name}: no tissue found; writing an empty FeatureCollection")

    t1 = time.perf_counter()
    callback = progress(len(grid), 0) if progress else None
    features = embed_grid(str(slide_path), grid, encoder, mpp=params.mpp, batch_size=params.batch_size,
                          workers=params.workers, progress=callback)
    seconds["embed"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    scores = PatchScores(
        coords=grid.coords,
        scores=cosine_scores(features, prototypes),
        classes=tuple(prompts.class_names),
        positive_class=prompts.positive_class,
        patch_size=geometry.patch_size_l0,
        stride=geometry.stride_l0,
        width=info.width,
        height=info.height,
        mpp=info.mpp,
        meta={**(meta or {}), "slide": Path(slide_path).name, "logit_scale": encoder.logit_scale,
              "tissue": encode_tissue(tissue)},
    )
    clip = tissue_geometry(tissue)
    polygons = polygons_from_scores(scores, params.threshold, params, clip=clip)
    collection = feature_collection(build_annotations(polygons, scores))
    seconds["polygons"] = time.perf_counter() - t2

    outputs = {
        "geojson": str(out / f"{stem}.geojson"),
        "scores": str(out / f"{stem}.scores.npz"),
        "overlay": str(out / f"{stem}.overlay.png"),
    }
    scores.save(outputs["scores"])
    write_png(outputs["overlay"], render_overlay(thumbnail, scores, polygons))
    write_geojson(outputs["geojson"], collection)  # last: its presence marks a finished slide
    seconds["total"] = time.perf_counter() - t0
    area = float(sum(p.area for p in polygons))
    return SlideReport(
        slide=str(Path(slide_path).resolve()),
        stem=stem,
        width=info.width,
        height=info.height,
        mpp=info.mpp,
        patches=len(grid),
        tissue_fraction=tissue.fraction,
        regions=len(polygons),
        tumor_area_um2=area * info.mpp**2 if info.mpp else None,
        seconds={k: round(v, 3) for k, v in seconds.items()},
        patches_per_s=round(len(grid) / seconds["embed"], 1) if seconds["embed"] > 0 and len(grid) else 0.0,
        outputs=outputs,
        warnings=warnings,
    )
