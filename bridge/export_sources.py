"""Read, for every slide of a QuPath project or a folder of GeoJSON exports, the annotations as the annotator
left them ("corrected") and the outlines ZEUS wrote ("original"): :func:`read_sources`.

- a QuPath project (a folder with ``project.qpproj``, or that file). Corrected: with ``backend``
  ``"paquo"`` (or ``"auto"`` when paquo finds a QuPath install; ``bridge.project.choose_backend``) each
  image's saved hierarchy (``data.qpdata``, read through QuPath); otherwise (``"files"``) the GeoJSON that
  ``groovy/export_training_data.groovy`` wrote into ``<project>/export/<imageName>.geojson``.
  Original: ``<project>/data/<entryID>/zeus_annotations.geojson`` (written by both project writers
  through ``bridge.publish``). Image size and pixel size: the entry's image metadata, else its
  ``zeus.width`` / ``zeus.height`` / ``zeus.mpp`` metadata.
- any folder of QuPath-exported GeoJSON files (File > Export objects, or the Groovy script; QuPath
  0.2 to 0.7; ``*.geojson``, and ``*.json`` files that hold GeoJSON). For ``<name>.geojson`` the
  original is ``<name>.zeus.geojson`` beside it (copy ZEUS's ``<stem>.geojson`` there under that
  name), or, with ``originals=DIR``, the ZEUS output folder ``DIR``: its ``<stem>.geojson`` (``<stem>``
  is ``<name>`` without a slide suffix, so ``a.svs.geojson`` matches ZEUS's ``a.geojson``), with
  image size and pixel size from its ``run.json`` or ``<stem>.scores.npz``.

Output names are file-safe and unique (:func:`safe_name`, as ``export_training_data.groovy`` makes them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeus_qupath.errors import GeoJSONError, ProjectError, ZeusError
from zeus_qupath.outputs import RUN_JSON, SCORES_SUFFIX, PatchScores, RunRecord, positive_number, read_run_record
from zeus_qupath.qupath_geojson import QuPathObject, read_qupath_geojson
from zeus_qupath.slide import QUPATH_ONLY_SUFFIXES, SLIDE_SUFFIXES

from .edits import WrittenObject, written_record
from .label_masks import LABELS_JSON
from .project import choose_backend
from .project_files import PROJECT_FILE, ZEUS_GEOJSON, FilesProject

EXPORT_FOLDER = "export"  # <project>/export: where export_training_data.groovy writes
ORIGINAL_SUFFIX = ".zeus.geojson"
_SKIP_JSON = {LABELS_JSON, RUN_JSON, "project.qpproj", "classes.json"}
_MICROMETER_UNITS = {"\u00b5m", "\u03bcm", "um", "micron", "microns", "micrometer", "micrometre"}


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
    use_paquo = choose_backend(backend) == "paquo"  # as open_project chooses; auto falls back below
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


def _folder_dimensions(stems: list[str], folders: list[Path], run: RunRecord | None,
                       ) -> tuple[int | None, int | None, float | None]:
    if run is not None:
        for _, report in run.every_slide():
            if report.stem in stems:
                return report.width, report.height, report.mpp
    for folder in folders:
        for stem in stems:
            scores = folder / f"{stem}{SCORES_SUFFIX}"
            if scores.is_file():
                s = PatchScores.load(scores)
                return s.width, s.height, s.mpp
    return None, None, None


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


def _int(value: Any) -> int | None:
    try:
        v = int(float(value))
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None
