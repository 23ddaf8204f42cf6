"""Export the annotators' corrected annotations for training, and measure how much they corrected.

``export_corrections(source, out_dir)`` reads, for every slide, the annotations as the annotator left
them ("corrected") and the outlines ZEUS wrote ("original"), and writes into ``out_dir``:

- ``<name>.geojson``: the corrected annotations only (no detections or cells), polygonal and valid,
  classes kept, the ZEUS marker measurements removed (QuPath 0.4+ layout);
- ``<name>.labels.png`` (``.labels.tif`` when the mask is larger than ``MAX_PNG_SIDE`` px on a side
  or ``MAX_PNG_PIXELS`` px in all): a label mask at ``downsample`` (or at ``mpp`` um/px, from the
  slide's pixel size), drawn with rasterio from the corrected annotations; background 0. Where
  annotations of different classes overlap, the higher label is on top (as QuPath's
  ``LabeledImageServer`` draws them for the Groovy script). Its size is
  ``round(width / downsample) x round(height / downsample)``, as QuPath writes a downsampled image;
- ``labels.json``: the label of each class, the same for every slide: ``{"background": 0,
  <positive class>: 1, <other classes>: 2, 3, ...}`` by the rule of ``label_map``, which the Groovy
  script ``export_training_data.groovy`` follows too (names that differ only in case share a label;
  order ignoring case), or the order of ``classes`` when given. Classes ending in ``*`` (QuPath's
  ``Ignore*``, ``Region*``) and unclassified annotations get no label;
- ``corrections.csv`` (and ``format_table`` for the terminal): per slide, the Dice coefficient
  between ZEUS's original outline (union of the ZEUS objects of the positive class) and the corrected
  one (union of every annotation of that class), the positive-class area the annotator added and
  removed (um^2, or px^2 when the pixel size is unknown), and the number of objects created (no ZEUS
  marker), edited (ZEUS marker, but not untouched by the keep-edits rule of ``bridge/edits.py``),
  deleted (ZEUS objects of the original whose id is gone and that no edited object replaces) and
  untouched.

Where the two sides come from (``source``):

- a QuPath project (a folder with ``project.qpproj``, or that file). Corrected: with ``backend``
  ``"paquo"`` (or ``"auto"`` when paquo finds a QuPath install) each image's saved hierarchy
  (``data.qpdata``, read through QuPath); otherwise (``"files"``) the GeoJSON that
  ``groovy/export_training_data.groovy`` wrote into ``<project>/export/<imageName>.geojson``.
  Original: ``<project>/data/<entryID>/zeus_annotations.geojson`` (written by both project writers
  through ``bridge.publish``). Image size and pixel size: the entry's image metadata, else its
  ``zeus.width`` / ``zeus.height`` / ``zeus.mpp`` metadata.
- any folder of QuPath-exported GeoJSON files (File > Export objects, or the Groovy script; QuPath
  0.2 to 0.7; ``*.geojson``, and ``*.json`` files that hold GeoJSON). For ``<name>.geojson`` the
  original is ``<name>.zeus.geojson`` beside it (copy ZEUS's ``<stem>.geojson`` there under that
  name), or, with ``originals=DIR``, the ZEUS output folder ``DIR``: its ``<stem>.geojson`` (``<stem>``
  is ``<name>`` without a slide suffix, so ``a.svs.geojson`` matches ZEUS's ``a.geojson``), with
  image size and pixel size from its ``run.json`` or ``<stem>.scores.npz``. Without them the mask
  covers the annotations' extent from (0, 0) and a warning says so.

Everything is read and checked before the first file is written, and the outputs are written as one
set (``zeus_qupath.output_set``): a failed export leaves nothing new in ``out_dir``.
Memory: the annotations of all slides, plus one label mask at a time.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from zeus_qupath.errors import GeoJSONError, ProjectError, ZeusError
from zeus_qupath.output_set import OutputSet, atomic_path
from zeus_qupath.outputs import RUN_JSON, SCORES_SUFFIX, PatchScores, RunRecord, positive_number, read_run_record
from zeus_qupath.qupath_geojson import (
    ZEUS_MARKER_MEASUREMENTS,
    QuPathObject,
    objects_to_feature_collection,
    read_qupath_geojson,
)
from zeus_qupath.slide import QUPATH_ONLY_SUFFIXES, SLIDE_SUFFIXES

from .edits import (
    WrittenObject,
    has_zeus_marker,
    is_untouched_zeus,
    same_geometry,
    written_objects,
    written_record,
    zeus_class_from_name,
)
from .project import BACKENDS, paquo_status
from .project_files import PROJECT_FILE, ZEUS_GEOJSON, FilesProject

DEFAULT_DOWNSAMPLE = 16.0  # as groovy/export_training_data.groovy
DEFAULT_POSITIVE_CLASS = "Tumor"
EXPORT_FOLDER = "export"  # <project>/export: where export_training_data.groovy writes
ORIGINAL_SUFFIX = ".zeus.geojson"
LABELS_JSON = "labels.json"
CORRECTIONS_CSV = "corrections.csv"
MAX_PNG_SIDE = 32767
MAX_PNG_PIXELS = 2**28
MAX_MASK_PIXELS = 2**34  # a label mask larger than this (16 GiB of uint8) is a mistaken --downsample
_SKIP_JSON = {LABELS_JSON, RUN_JSON, "project.qpproj", "classes.json"}
_MICROMETER_UNITS = {"\u00b5m", "\u03bcm", "um", "micron", "microns", "micrometer", "micrometre"}


# ------------------------------------------------------------------------------------------ values


@dataclass(frozen=True)
class SlideSource:
    """One slide's two sides, as read from a project or a folder."""

    name: str  # file-safe output name
    image_name: str  # the image's name in QuPath (or the exported file's name)
    corrected: list[QuPathObject]
    corrected_from: str  # where the corrected annotations were read
    original: list[QuPathObject] | None  # ZEUS's annotations; None when not found
    width: int | None = None  # level-0 px; None when unknown
    height: int | None = None
    mpp: float | None = None
    zeus_classes: tuple[str, ...] = ()  # classes of ZEUS's annotations as published (for the positive class)
    written: Mapping[str, WrittenObject] | None = None  # all ZEUS wrote for the image (None: the original's)


@dataclass(frozen=True)
class CorrectionStats:
    """How an annotator changed ZEUS's result on one slide (areas in ``area_unit``)."""

    positive_class: str
    area_unit: str  # "um^2" or "px^2"
    created: int
    edited: int
    untouched: int
    corrected_area: float
    dice: float | None = None  # None without the original
    original_area: float | None = None
    added_area: float | None = None
    removed_area: float | None = None
    deleted: int | None = None


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

    positive = positive_class or _positive_class(sources)
    labels = label_map(sources, positive, classes)
    unlabelled = sorted({o.class_name for s in sources for o in s.corrected
                         if o.object_type == "annotation" and o.class_name and _key(o.class_name) not in
                         {_key(k) for k in labels} and not o.class_name.endswith("*")})
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


# ------------------------------------------------------------------------------------------ reading


def read_sources(
    source: str | os.PathLike[str],
    *,
    backend: str = "auto",
    originals: str | os.PathLike[str] | None = None,
) -> tuple[list[SlideSource], str, list[Path], list[str]]:
    """The slides of a project or folder: ``(sources, backend used, folders read from, warnings)``."""
    p = Path(source)
    if p.is_file() and p.suffix == ".qpproj":
        p = p.parent
    if not p.exists():
        raise ZeusError(f"{p}: not found (expected a QuPath project or a folder of QuPath GeoJSON exports)")
    if not p.is_dir():
        raise ZeusError(f"{p}: expected a QuPath project folder or a folder of QuPath GeoJSON exports")
    if (p / PROJECT_FILE).is_file():
        if originals is not None:
            raise ZeusError("--originals is for a folder of GeoJSON exports; a project keeps ZEUS's annotations "
                            "in data/<entryID>/zeus_annotations.geojson")
        return _read_project(p, backend)
    sources, warnings = _read_folder(p, Path(originals) if originals is not None else None)
    return sources, "folder", [p], warnings


def _read_project(root: Path, backend: str) -> tuple[list[SlideSource], str, list[Path], list[str]]:
    entries = [e for e in FilesProject(root).entries if isinstance(e, dict) and "entryID" in e]
    if not entries:
        raise ProjectError(f"{root / PROJECT_FILE}: the project has no images")
    use_paquo = False
    if backend in ("auto", "paquo"):
        ok, why = paquo_status()
        if backend == "paquo" and not ok:
            raise ProjectError(f"the paquo backend is not available: {why}")
        use_paquo = ok
    warnings: list[str] = []
    corrected: dict[str, tuple[list[QuPathObject], str]] = {}
    if use_paquo:
        try:
            corrected = _paquo_hierarchies(root, {str(e["entryID"]) for e in entries})
        except ProjectError:
            if backend == "paquo":
                raise
            use_paquo = False  # auto: fall back to what QuPath exported
    export_dir = root / EXPORT_FOLDER
    if not use_paquo:
        for e in entries:
            path = export_dir / f"{safe_name(str(e.get('imageName', '')))}.geojson"
            if path.is_file():
                corrected[str(e["entryID"])] = (read_qupath_geojson(path), str(path))
        if not corrected:
            raise ProjectError(
                f"{root}: no QuPath export found in {export_dir}: in QuPath run export_training_data.groovy "
                f"(it writes export/<imageName>.geojson), or install paquo with QuPath to read the project directly")

    sources: list[SlideSource] = []
    names: set[str] = set()
    for e in entries:
        entry_id = str(e["entryID"])
        image_name = str(e.get("imageName") or f"image {entry_id}")
        if entry_id not in corrected:
            if use_paquo:
                warnings.append(f"{image_name}: skipped, never saved in QuPath (no data.qpdata)")
            else:
                warnings.append(f"{image_name}: skipped, not exported from QuPath "
                                f"(no {EXPORT_FOLDER}/{safe_name(image_name)}.geojson)")
            continue
        objs, where_from = corrected[entry_id]
        original = _original_seen_by_annotator(root / "data" / entry_id, objs)
        width, height, mpp = _entry_dimensions(e)
        name = _unique(safe_name(_slide_stem(image_name)), names, entry_id)
        published = root / "data" / entry_id / ZEUS_GEOJSON
        zeus_classes = tuple(o.class_name for o in read_qupath_geojson(published)
                             if o.class_name) if published.is_file() else ()
        sources.append(SlideSource(name, image_name, objs, where_from, original, width, height, mpp, zeus_classes,
                                   written_record(published)))
    if not sources:
        raise ProjectError(f"{root}: no image of the project has corrected annotations to export")
    return sources, "paquo" if use_paquo else "files", [export_dir], warnings


def _original_seen_by_annotator(entry_dir: Path, corrected: list[QuPathObject]) -> list[QuPathObject] | None:
    """The ZEUS result the annotator worked on: the current ``zeus_annotations.geojson`` or a backup of it.

    A later ``zeus segment`` into the project replaces the file (backing it up first) while the annotator's
    image still holds the objects of the version that was imported. That version is the one whose object ids
    the corrected annotations share most; with no shared ids (all deleted, or a v0.2 export without ids)
    the current file is taken.
    """
    current = entry_dir / ZEUS_GEOJSON
    candidates = [current] if current.is_file() else []
    candidates += sorted(entry_dir.glob(f"{ZEUS_GEOJSON}.bak-*"), reverse=True)  # newest backup first
    if not candidates:
        return None
    ids = {o.id for o in corrected if o.id}
    best, best_shared = None, -1
    for path in candidates:
        objs = read_qupath_geojson(path)
        shared = len(ids & {o.id for o in objs if o.id})
        if shared > best_shared:
            best, best_shared = objs, shared
    return best


def _paquo_hierarchies(root: Path, entry_ids: set[str]) -> dict[str, tuple[list[QuPathObject], str]]:
    """Each saved image's annotations, read through paquo and QuPath."""
    try:
        from paquo.projects import QuPathProject

        from .project_paquo import paquo_annotation_to_object
    except ImportError as exc:
        raise ProjectError(f"paquo is not installed ({exc})") from None
    except Exception as exc:  # paquo raises several kinds when it finds no QuPath
        raise ProjectError(f"paquo cannot start QuPath ({exc})") from None
    out: dict[str, tuple[list[QuPathObject], str]] = {}
    try:
        qp = QuPathProject(root / PROJECT_FILE, mode="r")  # the file: paquo reads a dotted folder as one
        for entry in qp.images:
            entry_id = str(entry.entry_id)
            qpdata = root / "data" / entry_id / "data.qpdata"
            if entry_id not in entry_ids or not qpdata.is_file():
                continue  # never saved in QuPath: there is nothing the annotator did
            objs = [paquo_annotation_to_object(a) for a in entry.hierarchy.annotations]
            out[entry_id] = ([o for o in objs if o is not None], str(qpdata))
    except Exception as exc:  # Java exceptions come through JPype in many kinds
        raise ProjectError(f"{root}: paquo cannot read the project ({exc})") from None
    return out


def _entry_dimensions(entry: Mapping[str, Any]) -> tuple[int | None, int | None, float | None]:
    """Width, height and um/px of an entry: its image metadata, else its ``zeus.*`` metadata."""
    width = height = None
    mpp = None
    builder = entry.get("serverBuilder")
    meta = builder.get("metadata") if isinstance(builder, Mapping) else None
    if isinstance(meta, Mapping):
        width, height = _int(meta.get("width")), _int(meta.get("height"))
        cal = meta.get("pixelCalibration")
        pw = cal.get("pixelWidth") if isinstance(cal, Mapping) else None
        if isinstance(pw, Mapping) and str(pw.get("unit", "")).lower() in _MICROMETER_UNITS:
            mpp = positive_number(pw.get("value"))
    zmeta = entry.get("metadata") if isinstance(entry.get("metadata"), Mapping) else {}
    width = width or _int(zmeta.get("zeus.width"))
    height = height or _int(zmeta.get("zeus.height"))
    mpp = mpp or positive_number(zmeta.get("zeus.mpp"))
    return width, height, mpp


def _read_folder(folder: Path, originals: Path | None) -> tuple[list[SlideSource], list[str]]:
    if originals is not None and not originals.is_dir():
        raise ZeusError(f"--originals {originals}: not a folder")
    warnings: list[str] = []
    files: list[tuple[str, Path, list[QuPathObject]]] = []
    for path in sorted(folder.iterdir()):
        lower = path.name.lower()
        if not path.is_file() or path.name.startswith(".") or lower.endswith(ORIGINAL_SUFFIX):
            continue
        if lower.endswith(".geojson"):
            files.append((path.name[: -len(".geojson")], path, read_qupath_geojson(path)))
        elif lower.endswith(".json") and lower not in _SKIP_JSON:
            try:
                objs = read_qupath_geojson(path)
            except GeoJSONError as exc:
                warnings.append(f"{path.name}: skipped, not QuPath GeoJSON ({exc})")
                continue
            files.append((path.name[: -len(".json")], path, objs))
    if not files:
        raise ZeusError(f"{folder}: no QuPath project (project.qpproj) and no GeoJSON files to export")

    run = read_run_record(originals) if originals is not None else None
    sources: list[SlideSource] = []
    names: set[str] = set()
    for base, path, objs in files:
        stems = _stem_candidates(base)
        original_path = _first_file([folder / f"{base}{ORIGINAL_SUFFIX}"] + (
            [originals / f"{base}{ORIGINAL_SUFFIX}"] + [originals / f"{s}.geojson" for s in stems]
            if originals is not None else []))
        original = read_qupath_geojson(original_path) if original_path is not None else None
        width, height, mpp = _folder_dimensions(stems, [folder] + ([originals] if originals else []), run)
        name = _unique(safe_name(stems[-1]), names, str(len(names) + 1))
        zeus_classes = tuple(o.class_name for o in original or [] if o.class_name)
        sources.append(SlideSource(name, path.name, objs, str(path), original, width, height, mpp, zeus_classes))
    return sources, warnings


def _script_labels(folder: Path) -> dict[str, int] | None:
    """The ``labels.json`` the Groovy export script wrote, if it is there and readable."""
    try:
        data = json.loads((folder / LABELS_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _folder_dimensions(stems: list[str], folders: list[Path], run: RunRecord | None,
                       ) -> tuple[int | None, int | None, float | None]:
    if run is not None:
        for report in run.slides:
            if report.stem in stems:
                return report.width, report.height, report.mpp
    for folder in folders:
        for stem in stems:
            scores = folder / f"{stem}{SCORES_SUFFIX}"
            if scores.is_file():
                s = PatchScores.load(scores)
                return s.width, s.height, s.mpp
    return None, None, None


# ------------------------------------------------------------------------------------------ naming


def safe_name(name: str) -> str:
    """A file name as ``export_training_data.groovy`` makes it from an image name."""
    return re.sub(r'[\\/:*?"<>|]', "_", name)


def _slide_stem(name: str) -> str:
    lower = name.lower()
    for suffix in SLIDE_SUFFIXES + QUPATH_ONLY_SUFFIXES:  # a QuPath image name may be any of them
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _stem_candidates(base: str) -> list[str]:
    """``a.svs`` -> ``["a.svs", "a"]`` (the exported name, then ZEUS's output stem)."""
    stem = _slide_stem(base)
    return [base] if stem == base else [base, stem]


def _unique(name: str, used: set[str], tag: str) -> str:
    out = name or "image"
    if out in used:
        out = f"{out}-{tag}"
    n = 2
    while out in used:
        out = f"{name}-{tag}-{n}"
        n += 1
    used.add(out)
    return out


def _first_file(paths: Iterable[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


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


def _int(value: Any) -> int | None:
    try:
        v = int(float(value))
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None




def class_key(class_name: str) -> str:
    """Class names that differ only in case are one class: the key both export routes compare by.

    ``str.lower()`` here, ``String.toLowerCase(Locale.ROOT)`` in ``export_training_data.groovy``
    (both apply Unicode's default lower-case mapping; unlike ``casefold`` they keep "ß").
    """
    return class_name.lower()


_key = class_key


# ------------------------------------------------------------------------------------------ annotations


def polygonal(geometry: BaseGeometry) -> BaseGeometry | None:
    """The valid polygonal part of a geometry (points and lines dropped); ``None`` if there is none."""
    geom = geometry if geometry.is_valid else shapely.make_valid(geometry)
    polys: list[Polygon] = []
    for part in shapely.get_parts(geom):
        if isinstance(part, Polygon) and not part.is_empty:
            polys.append(part)
        elif isinstance(part, MultiPolygon):
            polys.extend(p for p in part.geoms if not p.is_empty)
        elif part.geom_type == "GeometryCollection":
            sub = polygonal(part)
            if sub is not None:
                polys.extend(shapely.get_parts(sub))
    if not polys:
        return None
    out = polys[0] if len(polys) == 1 else MultiPolygon(polys)
    return out if out.is_valid else shapely.make_valid(out)


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


def _most_common(names: Iterable[str]) -> str | None:
    """The most frequent name; among equally frequent names, the one met first."""
    counts: Counter[str] = Counter(names)
    return counts.most_common(1)[0][0] if counts else None


def _positive_class(sources: Sequence[SlideSource]) -> str:
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
        for obj in _area_annotations(src.corrected):
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

    by_key = {_key(k): v for k, v in labels.items() if v > 0}
    shape = (mask_side(height, downsample), mask_side(width, downsample))
    dtype = np.uint8 if max(by_key.values(), default=0) <= 255 else np.uint16
    drawn = []
    for obj in _area_annotations(objects):
        label = by_key.get(_key(obj.class_name)) if obj.class_name else None
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


def _extent(src: SlideSource) -> tuple[int, int]:
    xs, ys = [1.0], [1.0]
    for obj in [*src.corrected, *(src.original or [])]:
        if not obj.geometry.is_empty:
            _, _, maxx, maxy = obj.geometry.bounds
            xs.append(maxx)
            ys.append(maxy)
    return math.ceil(max(xs)), math.ceil(max(ys))


# ------------------------------------------------------------------------------------------ statistics


def _union(objects: Iterable[QuPathObject], class_key: str) -> BaseGeometry:
    parts = [polygonal(o.geometry) for o in objects
             if o.object_type == "annotation" and o.class_name and _key(o.class_name) == class_key]
    return shapely.union_all([p for p in parts if p is not None]) if parts else Polygon()


def _area_annotations(objects: Iterable[QuPathObject]) -> list[QuPathObject]:
    """Annotations with an area (points and lines, e.g. a ruler, are neither counted nor drawn)."""
    out = []
    for obj in objects:
        if obj.object_type == "annotation":
            geom = polygonal(obj.geometry)
            if geom is not None and geom.area > 0:
                out.append(obj)
    return out


def _untouched(obj: QuPathObject, written: Mapping[str, WrittenObject]) -> bool:
    """The keep-edits rule's "untouched" (``bridge.edits``); for objects without an ID (QuPath 0.2/0.3
    exports) the same test against any written object of the same class and name."""
    if obj.id:
        return is_untouched_zeus(obj, written)
    return obj.object_type == "annotation" and not obj.is_locked and any(
        w.class_name == obj.class_name and w.name == obj.name and same_geometry(obj.geometry, w.geometry)
        for w in written.values())


def compare_annotations(
    original: Sequence[QuPathObject] | None,
    corrected: Sequence[QuPathObject],
    positive_class: str = DEFAULT_POSITIVE_CLASS,
    mpp: float | None = None,
    written: Mapping[str, WrittenObject] | None = None,
) -> CorrectionStats:
    """Dice, added/removed area and object counts between ZEUS's annotations and the corrected ones.

    Areas are in um^2 when ``mpp`` is known, else px^2. Objects counted are annotations with an area
    (points and lines are ignored, as in the export). ``written``: everything ZEUS wrote for the image
    (``bridge.edits.written_record``; default: the objects of ``original``). A ZEUS object is one whose
    ID ZEUS wrote, or that carries ZEUS's name or measurements; it is untouched by the keep-edits rule
    of ``bridge.edits``, else edited; every other annotation was created by the annotator. With
    ``original`` ``None`` only the counts that need no original (created, edited, untouched) and the
    corrected area are given.
    """
    key = _key(positive_class)
    scale, unit = (mpp * mpp, "um^2") if mpp else (1.0, "px^2")
    if written is None:
        written = written_objects(original or [])
    annotations = _area_annotations(corrected)
    untouched = [o for o in annotations if _untouched(o, written)]
    marked = [o for o in annotations if (o.id and str(o.id) in written) or has_zeus_marker(o.name, o.measurements)]
    created = len(annotations) - len(marked)
    edited = [o for o in marked if not _untouched(o, written)]
    after = _union(annotations, key)
    if original is None:
        return CorrectionStats(positive_class, unit, created, len(edited), len(untouched), after.area * scale)

    zeus = _area_annotations(original)
    before = _union(zeus, key)
    inter = before.intersection(after).area
    total = before.area + after.area
    dice = 1.0 if total == 0 else 2.0 * inter / total
    added = after.difference(before).area
    removed = before.difference(after).area

    ids_now = {o.id for o in annotations if o.id}
    original_ids = {o.id for o in zeus if o.id}
    # marked objects that do not carry an original id (QuPath 0.2/0.3 files have no ids; merged objects
    # get new ones) stand in for the original objects they overlap
    stand_ins = [polygonal(o.geometry) for o in marked if not o.id or o.id not in original_ids]
    stand_ins = [g for g in stand_ins if g is not None]
    deleted = 0
    for obj in zeus:
        if obj.id and obj.id in ids_now:
            continue
        geom = polygonal(obj.geometry)
        if geom is not None and any(geom.intersection(g).area > 0 for g in stand_ins):
            continue
        deleted += 1
    return CorrectionStats(
        positive_class=positive_class, area_unit=unit, created=created, edited=len(edited),
        untouched=len(untouched), corrected_area=after.area * scale, dice=dice,
        original_area=before.area * scale, added_area=added * scale, removed_area=removed * scale, deleted=deleted,
    )


# ------------------------------------------------------------------------------------------ reporting

CSV_COLUMNS = ("slide", "image_name", "positive_class", "dice", "area_unit", "original_area", "corrected_area",
               "added_area", "removed_area", "created", "edited", "deleted", "untouched", "annotations",
               "downsample", "mpp", "mask_width", "mask_height", "mask", "geojson")


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
