"""The corrected images ``zeus learn`` learns from, read from a QuPath project or a folder of GeoJSON exports.

Reading is ``zeus export``'s (:func:`bridge.export_sources.read_sources`): a project through paquo (each saved
image's ``data.qpdata``) or through what ``export_training_data.groovy`` wrote into ``<project>/export/``;
a folder of QuPath GeoJSON exports (0.2 to 0.7), with ZEUS's originals beside them or in ``originals``.

Which images count as corrected: by default those an annotator changed, i.e. whose annotations differ
from what ZEUS wrote by the keep-edits rule (an object created, edited or deleted); an image whose ZEUS
outlines are all untouched was never looked at or needed nothing, and teaches nothing zero-shot does not
already do. Images without ZEUS's record (drawn from scratch) count. ``images`` names them explicitly
instead (image names or export names).

The slide file of each image: ``slides`` (name -> path) when given; else, in a project, the entry's image
URI (``file:``) or ZEUS's ``zeus.slide`` entry metadata; for a folder, the ``run.json`` of ``originals``
(the slide whose output stem is the export's name).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import shapely

from zeus_qupath.errors import ProjectError, ZeusError
from zeus_qupath.geometry import polygonal
from zeus_qupath.learn import CorrectedImage
from zeus_qupath.outputs import output_stem, read_run_record
from zeus_qupath.patch_labels import Correction

from .correction_stats import compare_annotations
from .export_sources import SlideSource, read_sources
from .label_masks import DEFAULT_POSITIVE_CLASS
from .project_files import PROJECT_FILE, FilesProject, entry_uri
from .uris import file_uri_to_path


def _changed(src: SlideSource, positive_class: str) -> bool:
    if src.original is None:
        return True
    stats = compare_annotations(src.original, src.corrected, positive_class, src.mpp, src.written)
    return stats.created + stats.edited + (stats.deleted or 0) > 0


def _project_slides(root: Path) -> dict[str, str]:
    """Image name -> slide path of a project's entries (URI first, then ``zeus.slide``)."""
    out: dict[str, str] = {}
    for e in FilesProject(root).entries:
        if not isinstance(e, dict) or not isinstance(e.get("imageName"), str):
            continue
        candidates = []
        uri = entry_uri(e)
        if uri and uri.startswith("file:"):
            try:
                candidates.append(file_uri_to_path(uri))
            except ProjectError:
                pass
        meta = e.get("metadata") if isinstance(e.get("metadata"), dict) else {}
        if meta.get("zeus.slide"):
            candidates.append(str(meta["zeus.slide"]))
        found = next((c for c in candidates if Path(c).is_file()), candidates[0] if candidates else None)
        if found:
            out[e["imageName"]] = found
    return out


def _run_slides(originals: Path | None) -> dict[str, str]:
    record = read_run_record(originals) if originals is not None else None
    if record is None:
        return {}
    return {r.stem: str(r.slide) for _, r in reversed(record.every_slide()) if getattr(r, "slide", None)}


def read_corrections(
    source: str | os.PathLike[str],
    *,
    originals: str | os.PathLike[str] | None = None,
    slides: Mapping[str, str] | None = None,
    images: Sequence[str] | None = None,
    backend: str = "auto",
    positive_class: str = DEFAULT_POSITIVE_CLASS,
) -> tuple[list[CorrectedImage], list[str]]:
    """The corrected images of ``source`` (module docstring) and notes for the user (images skipped and why)."""
    sources, _backend, _dirs, warnings = read_sources(source, backend=backend, originals=originals)
    root = Path(source)
    if root.is_file():
        root = root.parent
    known = _project_slides(root) if (root / PROJECT_FILE).is_file() else {}
    from_run = _run_slides(Path(originals) if originals is not None else None)
    wanted = {n.lower() for n in images} if images else None
    notes = list(warnings)
    out: list[CorrectedImage] = []
    for src in sources:
        names = {src.name.lower(), src.image_name.lower(), output_stem(src.image_name).lower()}
        if wanted is not None:
            if not names & wanted:
                continue
        elif not _changed(src, positive_class):
            notes.append(f"{src.image_name}: skipped, ZEUS's outlines are untouched (name it with --images to use it)")
            continue
        slide = None
        for key in (src.name, src.image_name, output_stem(src.image_name)):
            slide = (slides or {}).get(key) or known.get(key) or from_run.get(key)
            if slide:
                break
        if not slide:
            raise ZeusError(f"{src.image_name}: which slide file is it? Give --slide {src.name}=PATH "
                            "(or --originals with the ZEUS output folder)")
        anns = []
        for obj in src.corrected:
            if obj.object_type != "annotation":
                continue
            if obj.geometry.is_empty or not np.all(np.isfinite(shapely.get_coordinates(obj.geometry))):
                anns.append(Correction(obj.class_name, obj.geometry))  # zeus learn refuses it, in one line
                continue
            geom = polygonal(obj.geometry)
            if geom is not None and geom.area > 0:  # points and lines label nothing
                anns.append(Correction(obj.class_name, geom))
        size = (src.width, src.height) if src.width and src.height else None
        out.append(CorrectedImage(src.name, slide, tuple(anns), size))
    if wanted is not None:
        found = {n for im in out for n in (im.name.lower(),)} | {
            n for src in sources for n in (src.image_name.lower(), output_stem(src.image_name).lower())
            if any(im.name == src.name for im in out)}
        missing = sorted(wanted - found)
        if missing:
            raise ZeusError(f"--images: no corrected image named {missing[0]!r} in {source}")
    if not out:
        raise ZeusError(f"{source}: no corrected image to learn from (every image's ZEUS outlines are untouched; "
                        "name images with --images)")
    return out, notes
