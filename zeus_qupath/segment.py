"""One slide, end to end: tissue -> grid -> embeddings -> scores -> mask -> polygons -> outputs.

The stages are separate so that a cohort run can overlap them across slides (see
:mod:`zeus_qupath.runs.local_executor`): :func:`prepare_slide` (tissue mask, patch grid, thumbnail, from one
low-resolution read), the embedding (:mod:`zeus_qupath.embed`), and :func:`finish_slide` (scores,
polygons, outputs).
``finish_slide`` writes ``<stem>.scores.npz``, ``<stem>.overlay.png``, with ``--tiles`` ``<stem>.tiles.geojson``,
and ``<stem>.geojson`` into the output folder as one set (``output_set.OutputSet``), and returns a
:class:`~zeus_qupath.outputs.SlideReport` for ``run.json``.
``polygons_from_scores`` is the model-free second half (``zeus polygons``).
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely
from PIL import Image
from shapely.geometry.base import BaseGeometry

from .annotations import build_annotations
from .errors import SlideError
from .grid import PatchGeometry, PatchGrid, make_grid
from .heatmap import write_tiles
from .outline import outline_patches, outline_polygons
from .output_set import OutputSet
from .outputs import PatchScores, SlideReport, output_paths, output_stem
from .overlay import render_overlay, write_png
from .params import SegmentParams, Threshold
from .polygons import tissue_geometry
from .prompts import PromptSet
from .qupath_geojson import feature_collection, write_geojson
from .slide import Slide, SlideInfo
from .tissue import TissueMask, clam_tissue, full_tissue, tissue_from_view, view_downsample

if TYPE_CHECKING:  # the model side (torch) is imported where it runs: zeus polygons must not load it
    from .models.base import Encoder


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
    return outline_polygons(scores, threshold, params, clip=clip)


def geojson_from_scores(scores: PatchScores, threshold: Threshold, params: SegmentParams,
                        clip: BaseGeometry | None = None) -> dict[str, Any]:
    return feature_collection(build_annotations(polygons_from_scores(scores, threshold, params, clip), scores))


@dataclass
class PreparedSlide:
    """What a slide needs before its patches are embedded (all of it O(grid) or thumbnail-sized)."""

    path: str
    stem: str
    info: SlideInfo
    geometry: PatchGeometry
    tissue: TissueMask
    grid: PatchGrid
    thumbnail: np.ndarray
    seconds: dict[str, float]
    warnings: list[str]
    sampling: dict[str, Any] | None = None  # what adaptive sampling embedded (SampledPatches.summary); None: exact


def prepare_slide(slide: Slide, params: SegmentParams, known: tuple[TissueMask, PatchGrid] | None = None,
                  stem: str | None = None) -> PreparedSlide:
    """Tissue mask, patch grid and overlay thumbnail of an open slide, from one low-resolution read.

    ``known`` (a cached tissue mask and grid) skips tissue detection.
    """
    t0 = time.perf_counter()
    info = slide.info
    geometry = patch_geometry(params, info.mpp)
    view = slide.read_downsampled(view_downsample(info.width, info.height))  # overlay thumbnail and tissue view
    if known is not None:
        tissue, grid = known
    else:
        if not params.detect_tissue:
            tissue = full_tissue(info.width, info.height)
        elif params.tissue == "zeus":
            tissue = clam_tissue(slide)
        else:
            tissue = tissue_from_view(view, info.width)
        grid = make_grid(info.width, info.height, geometry, tissue, rule=params.tissue)
    warnings = []
    if len(grid) == 0:
        hint = ("; CLAM's rule keeps tissue regions above 2 x 512^2 level-0 px only (a small crop may need "
                "--tissue coarse)") if params.detect_tissue and params.tissue == "zeus" else ""
        warnings.append(f"{slide.path.name}: no tissue found{hint}; writing an empty FeatureCollection")
    return PreparedSlide(str(slide.path), stem or output_stem(slide.path), info, geometry, tissue, grid, view,
                         {"tissue": time.perf_counter() - t0}, warnings)


def drop_filtered(prepared: PreparedSlide, features: Sequence[np.ndarray], kept: np.ndarray | None) -> list[np.ndarray]:
    """Drop the patches the white/black filters rejected (``kept`` False) from ``prepared.grid`` and ``features``.

    Call it on every fresh embedding before its grid and features are stored or scored.
    """
    prepared.grid = prepared.grid.filtered(kept)
    if kept is None:
        return list(features)
    if not kept.any() and len(kept):
        prepared.warnings.append(f"{Path(prepared.path).name}: no tissue found (every patch in the tissue contours "
                                 "is white or black); writing an empty FeatureCollection")
    return [f[kept] for f in features]


def finish_slide(
    prepared: PreparedSlide,
    features: Sequence[np.ndarray],
    encoders: Sequence[Encoder],
    prompts: PromptSet,
    prototypes: Sequence[np.ndarray],
    params: SegmentParams,
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    seconds: dict[str, float] | None = None,
    score_options: dict[str, Any] | None = None,
) -> SlideReport:
    """Score the features (one array per encoder), outline the positive class and write the outputs.

    ``score_options`` go to :func:`~zeus_qupath.scoring.slide_scores` (``screening_k``,
    ``text_embeddings``, ``model_specs``). Outputs are written atomically: ``scores.npz``,
    ``overlay.png``, then ``geojson``.
    """
    secs = {**prepared.seconds, **(seconds or {})}
    t2 = time.perf_counter()
    info = prepared.info
    outline = outline_patches(
        prepared.grid.coords, features, encoders, prompts, prototypes, geometry=prepared.geometry,
        width=info.width, height=info.height, mpp=info.mpp, params=params, threshold=params.threshold,
        clip=tissue_geometry(prepared.tissue), score_options=score_options,
        meta={**(meta or {}), "slide": Path(prepared.path).name, "tissue": encode_tissue(prepared.tissue),
              **({"sampling": prepared.sampling} if prepared.sampling else {})})
    scores, polygons = outline.scores, outline.polygons
    collection = outline.feature_collection()
    outputs = output_paths(out_dir, prepared.stem, tiles=params.heatmap_tiles)
    names = {kind: Path(path).name for kind, path in outputs.items()}
    with OutputSet(out_dir) as staged:  # a slide's outputs appear together, or none of them; geojson last
        scores.save(staged.path(names["scores"]))
        write_png(staged.path(names["overlay"]), render_overlay(prepared.thumbnail, scores, polygons))
        if "tiles" in names:
            write_tiles(staged.path(names["tiles"]), scores)
        else:  # a tiles file of an earlier run with --tiles would no longer match these scores
            staged.retire(Path(output_paths(out_dir, prepared.stem, tiles=True)["tiles"]).name)
        write_geojson(staged.path(names["geojson"]), collection)
    secs["polygons"] = time.perf_counter() - t2
    secs.setdefault("embed", 0.0)
    secs["total"] = secs.get("total", 0.0) + sum(secs[k] for k in ("tissue", "embed", "polygons"))
    area = float(sum(p.area for p in polygons))
    n = len(prepared.grid)
    return SlideReport(
        slide=str(Path(prepared.path).resolve()),
        stem=prepared.stem,
        width=info.width,
        height=info.height,
        mpp=info.mpp,
        patches=n,
        tissue_fraction=prepared.tissue.fraction,
        regions=len(polygons),
        tumor_area_um2=area * info.mpp**2 if info.mpp else None,
        seconds={k: round(v, 3) for k, v in secs.items()},
        patches_per_s=round(n / secs["embed"], 1) if secs["embed"] > 0 and n else 0.0,
        outputs=outputs,
        warnings=list(prepared.warnings),
        sampling=prepared.sampling,
    )
