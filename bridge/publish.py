"""Publish ZEUS results into a QuPath project: one entry per slide, with its annotations and metadata.

Two steps, both usable on their own:

- ``items_from_outputs(paths)`` turns what ``zeus segment`` wrote into ``ResultItem`` values. Each path
  is either a ZEUS output folder (its ``run.json`` lists every slide of the run: slide path, size,
  pixel size, outputs) or one ``<stem>.geojson`` (its sibling ``<stem>.scores.npz`` gives the size,
  pixel size and slide name; ``run.json`` beside it gives the slide's path). A folder without
  ``run.json`` contributes each ``<stem>.geojson`` that has a sibling ``<stem>.scores.npz``.
- ``publish_results(project_dir, items)`` opens (or creates) the project with
  ``bridge.project.open_project``, adds or updates one entry per slide with the ZEUS annotations and
  the entry metadata ``zeus.model``, ``zeus.prompts``, ``zeus.version``, ``zeus.date``,
  ``zeus.status``, ``zeus.adapter`` (the ``zeus learn`` adapter the outlines were scored with, or
  ``none``) (plus ``zeus.width``, ``zeus.height`` and ``zeus.mpp``, which ``zeus export``
  reads when the entry carries no image metadata), and saves the project once.
  ``publish_outputs(project_dir, paths)`` does both.

Heatmap tiles (``zeus segment --tiles``): when the run wrote ``<stem>.tiles.geojson`` (``run.json``
lists it; without ``run.json``, the file beside the GeoJSON), the image's ZEUS heatmap becomes those
tiles (``data/<entryID>/zeus_tiles.geojson``, which the import script adds; the paquo backend adds them
itself). When the run wrote none, the image's earlier ZEUS heatmap is cleared, so that it never
disagrees with the new annotations (``bridge.heatmap_tiles``).

Every GeoJSON is read and every slide identified before the project is touched, so bad input leaves
the project as it was. Both backends keep the ZEUS result as ``data/<entryID>/zeus_annotations.geojson``
(older versions as backups): the record of what ZEUS wrote, which the keep-edits rule and ``zeus export``
compare the annotator's objects with.

Slide levels: when the slide file is reachable here it is opened (``zeus_qupath.slide.Slide``; plain
images through their header only) for its pyramid level sizes, so QuPath gets the true pyramid and
pixel size without opening the file first; otherwise ``levels`` is ``None`` and QuPath reads them
when the image is first opened.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeus_qupath.errors import ProjectError, SlideError, ZeusError
from zeus_qupath.outputs import (
    GEOJSON_SUFFIX,
    OUTPUT_KINDS,
    RUN_JSON,
    SCORES_SUFFIX,
    TILES_SUFFIX,
    PatchScores,
    RunRecord,
    SlideReport,
    read_run_record,
)
from zeus_qupath.qupath_geojson import object_to_feature, read_qupath_geojson

from .heatmap_tiles import read_zeus_tiles
from .project import ProjectWriter, open_project, project_lock, project_root
from .project_files import PROJECT_FILE, check_entry_ids
from .uris import parse_uri_map

# entry metadata keys (str -> str in QuPath)
META_MODEL = "zeus.model"
META_PROMPTS = "zeus.prompts"
META_VERSION = "zeus.version"
META_DATE = "zeus.date"
META_STATUS = "zeus.status"
META_WIDTH = "zeus.width"
META_HEIGHT = "zeus.height"
META_MPP = "zeus.mpp"
META_ADAPTER = "zeus.adapter"  # zeus learn's adapter the outlines were scored with, or "none" (zero-shot)


@dataclass(frozen=True)
class ResultItem:
    """One slide's ZEUS result, ready to be published into a project."""

    slide_path: str
    geojson_path: str
    width: int
    height: int
    mpp: float | None = None
    levels: tuple[tuple[int, int], ...] | None = None  # level sizes, level 0 first; None = let QuPath read them
    model: str | None = None
    prompts: str | None = None  # name of the prompt set (file stem)
    zeus_version: str | None = None
    date: str | None = None  # when ZEUS ran (ISO 8601); None = now
    tiles_path: str | None = None  # <stem>.tiles.geojson when the run wrote heatmap tiles
    adapter: str | None = None  # the adapter (short hash, method, slides learned from); None: zero-shot

    def entry_metadata(self, status: str = "pre-segmented") -> dict[str, str]:
        """The ``zeus.*`` entry metadata this item writes."""
        meta: dict[str, str] = {
            META_STATUS: status,
            META_DATE: self.date or _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
            META_WIDTH: str(int(self.width)),
            META_HEIGHT: str(int(self.height)),
        }
        if self.model:
            meta[META_MODEL] = self.model
        if self.prompts:
            meta[META_PROMPTS] = self.prompts
        if self.zeus_version:
            meta[META_VERSION] = self.zeus_version
        if self.mpp is not None and math.isfinite(self.mpp) and self.mpp > 0:
            meta[META_MPP] = repr(float(self.mpp))
        meta[META_ADAPTER] = self.adapter or "none"  # always written: a zero-shot re-run must not keep an old one
        return meta


@dataclass(frozen=True)
class PublishedImage:
    """What publishing did to one slide's entry."""

    slide: str
    entry_id: str
    image_name: str
    created: bool  # False when the slide already had an entry
    n_features: int
    merge: str | None = None  # paquo backend: the keep-edits merge summary
    n_tiles: int = 0  # heatmap tiles published (0: the run wrote none)


@dataclass(frozen=True)
class PublishReport:
    """The result of ``publish_results``."""

    project: str
    backend: str  # "files" or "paquo"
    images: tuple[PublishedImage, ...]

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        lines = []
        for im in self.images:
            what = "added" if im.created else "updated"
            extra = f"; {im.n_tiles} heatmap tile(s)" if im.n_tiles else ""
            extra += f"; {im.merge}" if im.merge else ""
            lines.append(f"{im.image_name}: {what} entry {im.entry_id} with {im.n_features} ZEUS annotation(s){extra}")
        n_new = sum(im.created for im in self.images)
        lines.append(f"QuPath project {self.project} ({self.backend} backend): {n_new} image(s) added, "
                     f"{len(self.images) - n_new} updated")
        if self.backend == "files" and self.images:
            lines.append("In QuPath: open the project, then run scripts/import_zeus_annotations.groovy "
                         "with Run for project to bring the annotations into each image.")
        return "\n".join(lines)


UriMapLike = Sequence[tuple[str, str]] | Sequence[str]


def _uri_pairs(uri_map: UriMapLike | Iterable[Any]) -> list[tuple[str, str]]:
    """``[(src, dst), ...]`` from pairs or ``"SRC=DST"`` strings (as the CLI gets them)."""
    pairs: list[tuple[str, str]] = []
    for item in uri_map or ():
        if isinstance(item, str):
            pairs.extend(parse_uri_map([item]))
        else:
            src, dst = item
            pairs.append((str(src), str(dst)))
    return pairs


# ------------------------------------------------------------------------------------------ publishing


def publish_results(
    project_dir: str | os.PathLike[str],
    items: Sequence[ResultItem],
    *,
    backend: str = "auto",
    uri_map: UriMapLike = (),
    status: str = "pre-segmented",
) -> PublishReport:
    """Add or update one project entry per item, then save the project once.

    ``backend``: ``"auto"`` (paquo when a QuPath install is found, else files), ``"paquo"`` or
    ``"files"``. ``uri_map``: ``(src, dst)`` pairs or ``"SRC=DST"`` strings that rewrite slide paths
    for the annotators' machines (``/data/slides=Z:\\slides``). ``status``: the ``zeus.status``
    metadata value. Raises a one-line ``ZeusError`` (before anything is written) when a GeoJSON
    cannot be read.
    """
    if not items:
        raise ProjectError("nothing to publish: no ZEUS results were given")
    pairs = _uri_pairs(uri_map)
    seen: dict[str, str] = {}
    for item in items:
        key = os.path.abspath(item.slide_path) if not _is_foreign(item.slide_path) else item.slide_path
        if key in seen:
            raise ProjectError(f"{item.slide_path}: given twice ({seen[key]} and {item.geojson_path})")
        seen[key] = item.geojson_path
    # read everything first: bad input must not leave a half-updated project
    features = [[object_to_feature(o) for o in read_qupath_geojson(item.geojson_path)] for item in items]
    tiles = [read_zeus_tiles(item.tiles_path) if item.tiles_path else [] for item in items]

    with project_lock(project_dir):  # read, changed and saved by one writer at a time: concurrent writers all land
        _check_project_file(project_dir)
        project = open_project(project_dir, backend=backend)
        images = _publish_items(project, items, features, tiles, pairs, status)
    root = Path(project_dir)
    root = root.parent if root.suffix == ".qpproj" else root
    return PublishReport(project=str(root), backend=project.backend, images=tuple(images))


def _check_project_file(project_dir: str | os.PathLike[str]) -> None:
    """Refuse a project file whose entries share an ID, whichever backend writes it (before anything changes)."""
    project_file = project_root(project_dir) / PROJECT_FILE
    if not project_file.is_file():
        return
    try:
        data = json.loads(project_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return  # the writer says what is wrong with it
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        check_entry_ids(data["images"], project_file)


def _publish_items(project: ProjectWriter, items: Sequence[ResultItem], features: list[list[dict[str, Any]]],
                   tiles: list[Any], pairs: list[tuple[str, str]], status: str) -> list[PublishedImage]:
    images: list[PublishedImage] = []
    try:
        for item, feats, item_tiles in zip(items, features, tiles, strict=True):
            entry_id = project.add_or_update_image(
                item.slide_path,
                feats,
                width=int(item.width),
                height=int(item.height),
                mpp=item.mpp,
                uri_map=pairs,
                metadata=item.entry_metadata(status),
                levels=item.levels,
                tiles=item_tiles,  # none: the run wrote no heatmap, so an earlier one is cleared
            )
            update = project.updates[-1]
            images.append(PublishedImage(
                slide=str(item.slide_path),
                entry_id=str(entry_id),
                image_name=update.image_name,
                created=update.created,
                n_features=len(feats),
                merge=update.merge.summary() if update.merge is not None else None,
                n_tiles=len(item_tiles),
            ))
        project.save()
    finally:
        project.close()
    return images


def publish_outputs(
    project_dir: str | os.PathLike[str],
    paths: Sequence[str | os.PathLike[str]],
    *,
    backend: str = "auto",
    uri_map: UriMapLike = (),
    status: str = "pre-segmented",
) -> PublishReport:
    """``publish_results(project_dir, items_from_outputs(paths), ...)``: what ``zeus project add`` does."""
    return publish_results(project_dir, items_from_outputs(paths), backend=backend, uri_map=uri_map, status=status)


def _is_foreign(path: str) -> bool:
    """A Windows path named on a POSIX machine (kept as is)."""
    return os.name != "nt" and (len(path) > 1 and path[1] == ":" or path.startswith("\\\\"))


# ------------------------------------------------------------------------------------------ reading outputs


def items_from_outputs(paths: Sequence[str | os.PathLike[str]]) -> list[ResultItem]:
    """``ResultItem`` values for ZEUS output folders and single ``<stem>.geojson`` files.

    A folder: every slide that its ``run.json`` lists (or, without ``run.json``, every
    ``<stem>.geojson`` with a sibling ``<stem>.scores.npz``). A file: ``<stem>.geojson`` identified by
    its sibling ``<stem>.scores.npz`` and ``run.json``. Raises a one-line ``ZeusError`` when a path is
    neither, or when a slide cannot be identified.
    """
    items: list[ResultItem] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            items.extend(_items_from_folder(p))
        elif p.is_file():
            items.append(_item_from_geojson(p))
        else:
            raise ZeusError(f"{p}: not found (expected a ZEUS output folder or a <slide>.geojson it wrote)")
    if not items:
        raise ZeusError("no ZEUS results found in " + ", ".join(str(p) for p in paths))
    return items


def _run_fields(run: RunRecord | None) -> dict[str, str | None]:
    """model, prompts (name), zeus_version and date from ``run.json``."""
    if run is None:
        return {"model": None, "prompts": None, "zeus_version": None, "date": None, "adapter": None}
    return {"model": run.model_spec, "prompts": _prompt_name(run.prompt_file), "zeus_version": run.zeus_version,
            "date": run.started or None, "adapter": adapter_text(run.adapter)}


def adapter_text(summary: Mapping[str, Any] | None) -> str | None:
    """The ``zeus.adapter`` metadata value of an adapter summary (run.json, scores meta): hash, method, slides."""
    if not isinstance(summary, Mapping) or not summary.get("sha256"):
        return None
    slides = summary.get("slides") if isinstance(summary.get("slides"), list) else []
    return (f"{str(summary['sha256'])[:16]} ({summary.get('method')} {summary.get('strength')}, learned from "
            f"{len(slides)} slide(s): {', '.join(str(s) for s in slides[:5])}{', ...' if len(slides) > 5 else ''})")


def _prompt_name(value: Any) -> str | None:
    if not value:
        return None
    name = Path(str(value).replace("\\", "/")).name
    return name[:-5] if name.lower().endswith(".json") else name


def _items_from_folder(folder: Path) -> list[ResultItem]:
    run = read_run_record(folder)
    if run is None:
        geojsons = sorted(f for f in folder.glob("*" + GEOJSON_SUFFIX)
                          if (folder / (f.name[: -len(GEOJSON_SUFFIX)] + SCORES_SUFFIX)).is_file())
        if not geojsons:
            raise ZeusError(f"{folder}: not a ZEUS output folder (no {RUN_JSON}, and no <slide>.geojson "
                            f"with a <slide>{SCORES_SUFFIX} beside it)")
        return [_item_from_geojson(f) for f in geojsons]
    slides = run.every_slide()  # this run's slides, then earlier runs' still in the folder
    if not slides:
        raise ZeusError(f"{folder / RUN_JSON}: the run lists no finished slides")
    return [_item_from_report(folder, rec, r) for rec, r in slides]


def _report_output(folder: Path, report: SlideReport, kind: str = "geojson") -> Path:
    """The report's output ``kind``: beside run.json first (the folder may have been moved), else as recorded."""
    recorded = report.outputs.get(kind)
    candidates = []
    if recorded:
        candidates.append(folder / Path(recorded.replace("\\", "/")).name)
    candidates.append(folder / f"{report.stem}{OUTPUT_KINDS[kind]}")
    if recorded:
        candidates.append(Path(recorded))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ZeusError(f"{folder}: {candidates[0].name} listed in {RUN_JSON} is missing")


def _report_tiles(folder: Path, report: SlideReport) -> str | None:
    """The report's heatmap tiles (``None`` when the run wrote none: a file left by an earlier run is stale)."""
    if not report.outputs.get("tiles"):
        return None
    return str(_report_output(folder, report, "tiles"))


def _item_from_report(folder: Path, run: RunRecord, report: SlideReport, geojson: Path | None = None) -> ResultItem:
    slide = _locate_slide(report.slide, folder)
    return ResultItem(
        slide_path=slide,
        geojson_path=str(geojson or _report_output(folder, report)),
        tiles_path=_report_tiles(folder, report),
        width=report.width,
        height=report.height,
        mpp=report.mpp,
        levels=_levels(slide, report.width, report.height),
        **_run_fields(run),
    )


def _item_from_geojson(path: Path) -> ResultItem:
    name = path.name
    if not name.lower().endswith(GEOJSON_SUFFIX):
        raise ZeusError(f"{path}: expected a ZEUS output folder or a <slide>.geojson written by zeus segment")
    folder = path.parent
    stem = name[: -len(GEOJSON_SUFFIX)]
    run = read_run_record(folder)
    scores_path = folder / (stem + SCORES_SUFFIX)
    scores = PatchScores.load(scores_path) if scores_path.is_file() else None
    slide_name = str(scores.meta.get("slide")) if scores is not None and scores.meta.get("slide") else None

    if run is not None:
        for rec, report in run.every_slide():
            recorded = Path(report.outputs.get("geojson", "").replace("\\", "/")).name
            slide_base = Path(report.slide.replace("\\", "/")).name
            if recorded == name or report.stem == stem or (slide_name and slide_base == slide_name):
                item = _item_from_report(folder, rec, report, geojson=path)
                if scores is not None and (scores.width, scores.height) != (item.width, item.height):
                    raise ZeusError(f"{scores_path.name} is for a {scores.width}x{scores.height} px image but "
                                    f"{RUN_JSON} lists {item.slide_path} as {item.width}x{item.height}")
                return item
    if scores is None:
        raise ZeusError(f"{path}: cannot identify its slide: no {stem}{SCORES_SUFFIX} beside it and "
                        f"{RUN_JSON} {'does not list it' if run is not None else 'is missing'}")
    if not slide_name:
        raise ZeusError(f"{scores_path}: the scores file does not name its slide, and {RUN_JSON} "
                        f"{'does not list it' if run is not None else 'is missing'}")
    candidate = folder / slide_name
    if not candidate.is_file():
        raise ZeusError(f"{path}: cannot identify its slide {slide_name!r}: {RUN_JSON} beside it "
                        f"{'does not list it' if run is not None else 'is missing'} and it is not in {folder}")
    slide = str(candidate.absolute())
    meta = scores.meta
    return ResultItem(
        slide_path=slide,
        geojson_path=str(path),
        width=scores.width,
        height=scores.height,
        mpp=scores.mpp,
        levels=_levels(slide, scores.width, scores.height),
        model=str(meta["model"]) if meta.get("model") else None,
        prompts=_prompt_name(meta.get("prompts")),
        zeus_version=str(meta["zeus_version"]) if meta.get("zeus_version") else None,
        date=None,
        tiles_path=_sibling_tiles(folder, stem, scores_path),
        adapter=adapter_text(meta.get("adapter")),
    )


def _sibling_tiles(folder: Path, stem: str, scores_path: Path) -> str | None:
    """``<stem>.tiles.geojson`` beside a GeoJSON that no ``run.json`` lists, unless it is older than the
    scores file (then an earlier run wrote it: stale). ``zeus segment`` and ``zeus polygons --tiles``
    write the tiles after the scores."""
    tiles = folder / f"{stem}{TILES_SUFFIX}"
    try:
        return str(tiles) if tiles.is_file() and tiles.stat().st_mtime >= scores_path.stat().st_mtime else None
    except OSError:
        return None


def _locate_slide(value: str, folder: Path) -> str:
    """The slide path as ``run.json`` recorded it, made absolute.

    Absolute paths (POSIX or Windows) are kept even when the file is not reachable here (the project
    may be written on another machine). A relative path is taken from the current folder, else from
    the output folder; a relative path found in neither cannot be identified.
    """
    if _is_foreign(value) or Path(value).is_absolute():
        return value
    for base in (Path.cwd(), folder):
        candidate = base / value
        if candidate.is_file():
            return str(candidate.absolute())
    raise ProjectError(f"cannot identify the slide {value!r} named in {folder / RUN_JSON}: the path is relative "
                       f"and found neither from here nor from {folder}; run this from the folder where zeus "
                       f"segment ran")


def _levels(slide: str, width: int, height: int) -> tuple[tuple[int, int], ...] | None:
    """Level sizes of a reachable slide (``None`` when it is not here); checks level 0 against the result."""
    if _is_foreign(slide) or not Path(slide).is_file():
        return None
    from zeus_qupath.slide import PLAIN_IMAGE_SUFFIXES, Slide

    if Path(slide).suffix.lower() in PLAIN_IMAGE_SUFFIXES:  # the header is enough; do not decode the image
        from PIL import Image

        try:
            with Image.open(slide) as im:
                dims: tuple[tuple[int, int], ...] = ((int(im.width), int(im.height)),)
        except OSError as exc:
            raise SlideError(f"cannot open slide {Path(slide).name}: {exc}") from None
    else:
        with Slide(slide) as s:
            dims = tuple((int(w), int(h)) for w, h in s.info.level_dimensions)
    if dims[0] != (int(width), int(height)):
        raise ProjectError(f"{slide} is {dims[0][0]}x{dims[0][1]} px, but the ZEUS result was made for a "
                           f"{width}x{height} px image: not the same slide")
    return dims
