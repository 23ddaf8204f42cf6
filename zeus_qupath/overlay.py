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
    draw_legend(out, scores.positive_class, thickness)
    return out


def _ascii(text: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:40]  # OpenCV's fonts draw ASCII only


def draw_legend(rgb: np.ndarray, positive_class: str, line: int = 2) -> tuple[int, int, int, int] | None:
    """A legend in the bottom-right corner: the colour ramp from the other classes (blue) to ``positive_class``
    (red), and the outline's line; returns its box (x0, y0, x1, y1), or None on a thumbnail too small for it."""
    h, w = rgb.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.35, min(w, h) / 1100)
    thick = max(1, int(round(scale * 1.5)))
    left, right, outline = "other classes", f"{_ascii(positive_class)} (score margin)", "ZEUS region"
    (lw, th), base = cv2.getTextSize(left, font, scale, thick)
    rw = cv2.getTextSize(right, font, scale, thick)[0][0]
    ow = cv2.getTextSize(outline, font, scale, thick)[0][0]
    pad = max(3, th // 2)
    ramp_w = max(40, 4 * th)
    row = th + base + pad
    box_w = pad + max(lw + pad + ramp_w + pad + rw, ramp_w + pad + ow) + pad
    box_h = pad + 2 * row
    if box_w > w // 2 or box_h > h // 4:  # a thumbnail too small to carry one without hiding the slide
        return None
    x0, y0 = max(0, w - box_w - pad), max(0, h - box_h - pad)
    x1, y1 = min(w - 1, x0 + box_w), min(h - 1, y0 + box_h)
    cv2.rectangle(rgb, (x0, y0), (x1, y1), (255, 255, 255), -1)
    cv2.rectangle(rgb, (x0, y0), (x1, y1), (0, 0, 0), 1)
    ty = y0 + pad + th
    cv2.putText(rgb, left, (x0 + pad, ty), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    rx = x0 + pad + lw + pad
    t = np.linspace(0.0, 1.0, ramp_w)[:, None]
    colours = np.rint(t * POSITIVE_RGB + (1 - t) * NEGATIVE_RGB).astype(np.uint8)
    ry0, ry1 = y0 + pad, min(y1, y0 + pad + th + base)
    rgb[ry0:ry1, rx:rx + ramp_w][:] = colours[None, : max(0, min(ramp_w, w - rx))]
    cv2.putText(rgb, right, (rx + ramp_w + pad, ty), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    ly = ty + row - th // 2
    cv2.line(rgb, (x0 + pad, ly), (x0 + pad + ramp_w, ly), (0, 0, 0), max(1, line))
    cv2.putText(rgb, outline, (x0 + 2 * pad + ramp_w, ty + row), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return x0, y0, x1, y1


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
