"""What ``zeus export`` wrote and measured: :class:`ExportReport`, ``corrections.csv`` (:func:`corrections_csv`)
and the table it prints (:func:`format_table`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .correction_stats import CorrectionStats
from .label_masks import DEFAULT_POSITIVE_CLASS

CORRECTIONS_CSV = "corrections.csv"
CSV_COLUMNS = ("slide", "image_name", "positive_class", "dice", "area_unit", "original_area", "corrected_area",
               "added_area", "removed_area", "created", "edited", "deleted", "untouched", "annotations",
               "downsample", "mpp", "mask_width", "mask_height", "mask", "geojson")


@dataclass(frozen=True)
class SlideExport:
    """What was written for one slide."""

    name: str
    image_name: str
    geojson: str
    mask: str
    mask_width: int
    mask_height: int
    downsample: float
    mpp: float | None
    n_annotations: int
    stats: CorrectionStats


@dataclass(frozen=True)
class ExportReport:
    """The result of ``export_corrections``."""

    source: str
    out_dir: str
    backend: str  # "paquo", "files" or "folder"
    labels: dict[str, int]
    slides: tuple[SlideExport, ...]
    labels_json: str
    csv: str
    warnings: tuple[str, ...] = field(default_factory=tuple)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def corrections_csv(slides: Sequence[SlideExport]) -> str:
    """``corrections.csv``: one row per slide (empty cells where the original was not found)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for s in slides:
        st = s.stats
        writer.writerow([_cell(v) for v in (
            s.name, s.image_name, st.positive_class, st.dice, st.area_unit, st.original_area, st.corrected_area,
            st.added_area, st.removed_area, st.created, st.edited, st.deleted, st.untouched, s.n_annotations,
            s.downsample, s.mpp, s.mask_width, s.mask_height, Path(s.mask).name, Path(s.geojson).name)])
    return buf.getvalue()


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(report: ExportReport) -> str:
    """The per-slide corrections as a plain-text table (what ``zeus export`` prints)."""
    header = ("slide", "Dice", "added", "removed", "unit", "created", "edited", "deleted", "untouched", "mask")
    rows = [header]
    for s in report.slides:
        st = s.stats
        rows.append((
            s.name, _num(st.dice, 3), _num(st.added_area, 1), _num(st.removed_area, 1), st.area_unit,
            str(st.created), str(st.edited), "-" if st.deleted is None else str(st.deleted), str(st.untouched),
            f"{s.mask_width}x{s.mask_height} @{s.downsample:g}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    left = {0, 4, 9}

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                 strict=True)))

    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)]
    lines.extend(fmt(r) for r in rows[1:])
    positive = report.slides[0].stats.positive_class if report.slides else DEFAULT_POSITIVE_CLASS
    lines.append("")
    lines.append(f"{len(report.slides)} slide(s) -> {report.out_dir}; Dice and areas are for class {positive!r}; "
                 f"labels: " + ", ".join(f"{k}={v}" for k, v in report.labels.items()))
    lines.extend(f"warning: {w}" for w in report.warnings)
    return "\n".join(lines)
