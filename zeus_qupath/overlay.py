"""Overlay PNG: a thumbnail with the positive-class score heatmap and the outlines, for a person to look at."""

from __future__ import annotations

import os

import cv2
import numpy as np
from PIL import Image
from shapely.geometry import Polygon

from .output_set import atomic_path
from .outputs import PatchScores
from .reconstruct import sample_sums

POSITIVE_RGB = (230, 20, 20)
NEGATIVE_RGB = (30, 90, 230)


def score_margin_map(scores: PatchScores, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean margin (positive score minus best other) of the patches covering each level-0 pixel (ys x xs),
    and which of those pixels any patch covers (patches anywhere: any grid)."""
    pos = scores.positive_index
    margin = scores.scores[:, pos] - np.delete(scores.scores, pos, axis=1).max(axis=1)
    sums, counts = sample_sums(scores, margin[:, None], xs, ys)
    covered = counts > 0
    mean = np.divide(sums[..., 0], counts, out=np.zeros(counts.shape), where=covered)
    return mean, covered


def render_overlay(
    thumbnail: np.ndarray, scores: PatchScores, polygons: list[Polygon], alpha: float = 0.45
) -> np.ndarray:
    """RGB image: ``thumbnail`` blended with a red-blue margin heatmap on covered cells, outlines in black."""
    th, tw = thumbnail.shape[:2]
    scale = tw / scores.width  # thumbnail px per level-0 px
    out = thumbnail.copy()
    if len(scores.coords):
        ys = np.minimum(((np.arange(th) + 0.5) * scores.height / th).astype(np.int64), scores.height - 1)
        xs = np.minimum(((np.arange(tw) + 0.5) / scale).astype(np.int64), scores.width - 1)
        mean, cov = score_margin_map(scores, xs, ys)  # at the level-0 pixel under each thumbnail pixel's centre
        lim = float(np.abs(mean[cov]).max()) if cov.any() else 1.0
        t = np.clip((mean / (lim or 1.0) + 1) / 2, 0, 1)  # 0: most negative margin .. 1: most positive
        # colours from a 256-entry ramp and a uint8 blend: no thumbnail-sized float temporaries
        ramp = np.linspace(0.0, 1.0, 256)[:, None]
        lut = np.rint(ramp * POSITIVE_RGB + (1 - ramp) * NEGATIVE_RGB).astype(np.uint8)
        heat = lut[np.rint(t * 255).astype(np.uint8)]
        np.copyto(out, cv2.addWeighted(out, 1 - alpha, heat, alpha, 0), where=cov[..., None])
    thickness = max(2, int(round(max(th, tw) / 500)))
    for poly in polygons:
        rings = [poly.exterior, *poly.interiors]
        pts = [np.round(np.asarray(r.coords) * scale).astype(np.int32) for r in rings]
        cv2.polylines(out, pts, isClosed=True, color=(0, 0, 0), thickness=thickness)
    if scores.meta.get("adapter"):  # scored with zeus learn's adapter, not zero-shot: say so on the image
        label_adapted(out)
    return out


def label_adapted(rgb: np.ndarray) -> None:
    """Write "adapted" in the top-left corner (black on white), scaled to the image."""
    h, w = rgb.shape[:2]
    scale = max(0.4, min(w, h) / 600)
    thick = max(1, int(round(scale * 2)))
    (tw, th), base = cv2.getTextSize("adapted", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = max(2, th // 3)
    cv2.rectangle(rgb, (0, 0), (min(w - 1, tw + 2 * pad), min(h - 1, th + base + 2 * pad)), (255, 255, 255), -1)
    cv2.putText(rgb, "adapted", (pad, pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG", compress_level=1)  # a preview: level 6 is ~3x slower, 15 % smaller
