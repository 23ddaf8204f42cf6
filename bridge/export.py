"""The export stage: the annotators' corrected annotations for training, and how much they corrected.

``export_corrections(source, out_dir)`` reads, for every slide, the annotations as the annotator left
them ("corrected") and the outlines ZEUS wrote ("original") from a QuPath project or a folder of GeoJSON
exports (``bridge.export_sources``), and writes into ``out_dir``:

- ``<name>.geojson``: the corrected annotations only (no detections or cells), polygonal and valid,
  classes kept, the ZEUS marker measurements removed (QuPath 0.4+ layout);
- ``<name>.labels.png`` (or ``.labels.tif``) and ``labels.json``: a label mask at ``downsample`` (or at
  ``mpp`` um/px, from the slide's pixel size) and the label of each class (``bridge.label_masks``, the rule
  ``groovy/export_training_data.groovy`` follows too). Without the image size the mask covers the
  annotations' extent from (0, 0) and a warning says so;
- ``corrections.csv`` (and ``format_table`` for the terminal; ``bridge.export_report``): per slide, the
  Dice, the added and removed area and the objects created, edited, deleted and untouched
  (``bridge.correction_stats``).

Everything is read and checked before the first file is written, and the outputs are written as one
set (``zeus_qupath.output_set``): a failed export leaves nothing new in ``out_dir``.
Memory: the annotations of all slides, plus one label mask at a time.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from zeus_qupath.errors import ZeusError
from zeus_qupath.geometry import polygonal
from zeus_qupath.output_set import OutputSet
from zeus_qupath.qupath_geojson import ZEUS_MARKER_MEASUREMENTS, QuPathObject, objects_to_feature_collection

from .correction_stats import compare_annotations
from .export_report import CORRECTIONS_CSV, ExportReport, SlideExport, corrections_csv
from .export_sources import SlideSource, read_sources
from .label_masks import (
    LABELS_JSON,
    class_key,
    label_map,
    mask_suffix,
    positive_class_of,
    rasterize_labels,
    write_mask,
)
from .project import BACKENDS

DEFAULT_DOWNSAMPLE = 16.0  # as groovy/export_training_data.groovy
MAX_MASK_PIXELS = 2**34  # a label mask larger than this (16 GiB of uint8) is a mistaken --downsample


# ------------------------------------------------------------------------------------------ entry point


def export_corrections(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    downsample: float | None = None,
    mpp: float | None = None,
    classes: Sequence[str] | None = None,
    backend: str = "auto",
    originals: str | os.PathLike[str] | None = None,
    positive_class: str | None = None,
) -> ExportReport:
    """Export corrected annotations, label masks, ``labels.json`` and ``corrections.csv`` (module docstring).

    ``downsample`` or ``mpp`` (not both; default downsample ``DEFAULT_DOWNSAMPLE``) set the mask
    resolution. ``classes``: the labelled classes in label order (default: positive class, then the
    others alphabetically). ``backend``: for a project, ``"auto"``, ``"paquo"`` or ``"files"``.
    ``originals``: a folder of ZEUS outputs for a plain folder source. ``positive_class``: the class
    the statistics are about (default: the class of ZEUS's objects, else ``Tumor``).
    """
    if backend not in BACKENDS:
        raise ZeusError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if downsample is not None and mpp is not None:
        raise ZeusError("give --downsample or --mpp, not both")
    for label, value in (("--downsample", downsample), ("--mpp", mpp)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ZeusError(f"{label} must be a positive number, got {value}")
    if classes is not None:
        classes = [str(c) for c in classes]
        if not classes or any(not c.strip() for c in classes):
            raise ZeusError("--classes needs one or more class names")
        dup = [c for c, n in Counter(class_key(c) for c in classes).items() if n > 1]
        if dup:
            raise ZeusError(f"--classes names a class twice: {dup[0]}")

    sources, used_backend, input_dirs, warnings = read_sources(source, backend=backend, originals=originals)
    out = Path(out_dir)
    inputs = [(folder, "the folder the corrected annotations are read from") for folder in input_dirs]
    if originals is not None:
        inputs.append((Path(originals), "--originals, ZEUS's outputs"))
    for folder, what in inputs:  # export never writes over what it reads
        if _same_dir(out, folder):
            raise ZeusError(f"--out {out} is {what}; choose another folder")
        if _contains(out, folder):
            raise ZeusError(f"--out {out} contains {folder} ({what}); choose a folder outside it")

    positive = positive_class or positive_class_of(sources)
    labels = label_map(sources, positive, classes)
    unlabelled = sorted({o.class_name for s in sources for o in s.corrected
                         if o.object_type == "annotation" and o.class_name and class_key(o.class_name) not in
                         {class_key(k) for k in labels} and not o.class_name.endswith("*")})
    if classes is not None and unlabelled:
        warnings.append(f"annotations of class(es) {', '.join(unlabelled)} are not in --classes: not in the masks")
    script_labels = _script_labels(input_dirs[0]) if used_backend != "folder" and classes is None else None
    if script_labels is not None and script_labels != labels:
        warnings.append(f"{input_dirs[0] / LABELS_JSON} (from export_training_data.groovy) gives other label values "
                        f"than these annotations do; its masks are older than the annotations, or the script was "
                        f"run with another TUMOR_CLASS: this export's masks use {LABELS_JSON} in --out")

    # everything that can fail on input is checked before anything is written
    plans: list[tuple[SlideSource, float, int, int]] = []
    for src in sources:
        width, height = src.width, src.height
        if width is None or height is None:
            width, height = _extent(src)
            warnings.append(f"{src.image_name}: image size unknown; the mask covers the annotations' extent "
                            f"({width}x{height} px from the origin)")
        if mpp is not None:
            if src.mpp is None:
                raise ZeusError(f"{src.image_name}: the pixel size is unknown, so --mpp cannot be used; "
                                f"give --downsample instead")
            ds = mpp / src.mpp
        else:
            ds = downsample if downsample is not None else DEFAULT_DOWNSAMPLE
        mask_w, mask_h = width / ds, height / ds
        if not (math.isfinite(mask_w) and math.isfinite(mask_h)) or mask_w * mask_h > MAX_MASK_PIXELS:
            raise ZeusError(f"{src.image_name}: at downsample {ds:g} its label mask would be "
                            f"{mask_w:.3g} x {mask_h:.3g} px, more than {MAX_MASK_PIXELS:,} px; "
                            f"choose a larger --downsample (or --mpp)")
        plans.append((src, ds, width, height))

    slides: list[SlideExport] = []
    try:
        with OutputSet(out) as outputs:
            for src, ds, width, height in plans:
                clean = clean_annotations(src.corrected)
                geojson_name = f"{src.name}.geojson"
                with open(outputs.path(geojson_name), "w", encoding="utf-8") as fh:
                    json.dump(objects_to_feature_collection(clean), fh, allow_nan=False)
                mask = rasterize_labels(clean, labels, width, height, ds)
                mask_name = f"{src.name}.labels{mask_suffix(mask.shape)}"
                write_mask(outputs.path(mask_name).with_suffix(""), mask)
                mask_h, mask_w = mask.shape
                del mask
                stats = compare_annotations(src.original, src.corrected, positive, src.mpp, src.written)
                if src.original is None:
                    warnings.append(f"{src.image_name}: ZEUS's original annotations were not found; "
                                    f"Dice, areas and deletions not computed")
                mask_path = outputs.final(mask_name)
                slides.append(SlideExport(
                    name=src.name, image_name=src.image_name, geojson=str(outputs.final(geojson_name)),
                    mask=str(mask_path), mask_width=mask_w, mask_height=mask_h, downsample=ds, mpp=src.mpp,
                    n_annotations=len(clean), stats=stats,
                ))
            with open(outputs.path(LABELS_JSON), "w", encoding="utf-8") as fh:
                json.dump(labels, fh, indent=2, ensure_ascii=False)
            with open(outputs.path(CORRECTIONS_CSV), "w", encoding="utf-8", newline="") as fh:
                fh.write(corrections_csv(slides))
            labels_path, csv_path = outputs.final(LABELS_JSON), outputs.final(CORRECTIONS_CSV)
    except OSError as exc:
        raise ZeusError(f"cannot write the export to {out}: {exc.strerror or exc}; nothing was written") from None
    return ExportReport(source=str(source), out_dir=str(out), backend=used_backend, labels=labels,
                        slides=tuple(slides), labels_json=str(labels_path), csv=str(csv_path),
                        warnings=tuple(warnings))


# ------------------------------------------------------------------------------------------ helpers


def _script_labels(folder: Path) -> dict[str, int] | None:
    """The ``labels.json`` the Groovy export script wrote, if it is there and readable."""
    try:
        data = json.loads((folder / LABELS_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _contains(outer: Path, inner: Path) -> bool:
    """Whether ``inner`` lies inside the folder ``outer`` (after resolving links)."""
    try:
        return outer.resolve() in inner.resolve().parents
    except OSError:
        return False


def clean_annotations(objects: Iterable[QuPathObject]) -> list[QuPathObject]:
    """Annotations only, polygonal and valid, without the ZEUS marker measurements."""
    out: list[QuPathObject] = []
    for obj in objects:
        if obj.object_type != "annotation":
            continue
        geom = polygonal(obj.geometry)
        if geom is None or geom.area <= 0:
            continue
        measurements = {k: v for k, v in obj.measurements.items() if k not in ZEUS_MARKER_MEASUREMENTS}
        out.append(replace(obj, geometry=geom, measurements=measurements, nucleus_geometry=None))
    return out


def _extent(src: SlideSource) -> tuple[int, int]:
    xs, ys = [1.0], [1.0]
    for obj in [*src.corrected, *(src.original or [])]:
        if not obj.geometry.is_empty:
            _, _, maxx, maxy = obj.geometry.bounds
            xs.append(maxx)
            ys.append(maxy)
    return math.ceil(max(xs)), math.ceil(max(ys))
