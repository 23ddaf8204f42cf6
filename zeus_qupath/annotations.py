"""Polygons to ZEUS annotations (``QuPathObject``) with the measurements an annotator sees in QuPath."""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import Polygon

from .outputs import PatchScores
from .qupath_geojson import ZEUS_NAME_PREFIX, QuPathObject, qupath_class_name


def build_annotations(polygons: list[Polygon], scores: PatchScores) -> list[QuPathObject]:
    """One annotation per polygon, classified as the positive class, with area and mean scores.

    The mean score of a region is over the patches whose centre lies inside it.
    """
    pos = scores.positive_index
    half = scores.patch_size / 2
    cx = scores.coords[:, 0] + half
    cy = scores.coords[:, 1] + half
    class_name = qupath_class_name(scores.positive_class)
    out = []
    for poly in polygons:
        inside = shapely.contains_xy(poly, cx, cy) if len(cx) else np.zeros(0, dtype=bool)
        meas: dict[str, float] = {"Area px^2": poly.area}
        if scores.mpp:
            meas["Area um^2"] = poly.area * scores.mpp**2
        meas["Patches"] = float(inside.sum())
        if inside.any():
            sel = scores.scores[inside]
            meas[f"Mean {scores.positive_class} score"] = float(sel[:, pos].mean())
            others = np.delete(sel, pos, axis=1).max(axis=1)
            meas["Mean score margin"] = float((sel[:, pos] - others).mean())
        name = f"{ZEUS_NAME_PREFIX} {class_name}"
        out.append(QuPathObject(poly, class_name=class_name, measurements=meas, name=name))
    return out
