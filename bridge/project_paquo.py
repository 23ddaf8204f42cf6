"""The paquo project writer: writes images, classes and annotations through QuPath's own classes.

paquo (https://pypi.org/project/paquo/) drives a real QuPath install through a JVM. It is imported
only inside this module's functions, so the package works without it. Notes:

- importing ``paquo.projects`` starts the JVM, which cannot be restarted, and a process must not
  fork after it started (use the ``spawn`` start method for worker processes);
- QuPath must be able to read the slide on this machine (``add_image`` opens it, and paquo saves an
  image's data only while its file is readable). With a URI map, an image is added and saved under
  its local path and its URI is rewritten for the annotators' machines afterwards; a later run maps
  it back to the local path while it works on the image, then restores the URI the entry had (the
  annotator's, if QuPath rewrote it after they relocated the image);
- an existing entry is found by the rules of ``bridge.entry_match`` (URI, ZEUS metadata, name).

Annotators' edits live in each image's ``data.qpdata``; the keep-edits rule (``bridge/edits.py``)
is applied to the existing hierarchy here, in Python, before new ZEUS annotations are added (through
QuPath's GeoJSON reader, so they keep ZEUS's IDs), and the image's import record
(``zeus_imported.json``) is written after the image data, as the import script does.

Heatmap tiles (``zeus segment --tiles``) are added to the hierarchy as QuPath tile objects, through
QuPath's GeoJSON reader, replacing the image's earlier ZEUS tiles (``bridge.heatmap_tiles.is_zeus_tile``:
tiles with ``ZEUS score: `` measurements; no annotation and no other tile is touched), as the import
script does with ``zeus_tiles.geojson``; that file is kept beside the image data too, as by the files
backend.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from shapely.geometry import Polygon

from zeus_qupath.errors import GeoJSONError, ProjectError
from zeus_qupath.output_set import atomic_open
from zeus_qupath.qupath_geojson import QuPathObject, class_color, feature_to_object, repair_geometry

from .edits import (
    MergeResult,
    merge_annotations,
    read_import_record,
    write_import_record,
    written_objects,
    written_record,
)
from .entry_match import META_SLIDE, META_URI, EntryInfo, SlideKey, match_entry
from .heatmap_tiles import ZEUS_TILES, check_tiles, is_zeus_tile
from .project_files import PROJECT_FILE, ZEUS_GEOJSON, ImageUpdate, zeus_entry_metadata
from .uris import UriMap, map_path, path_to_file_uri, same_file_uri


def _held_outline(annotation: Any) -> Any | None:
    """A PolygonROI's own vertices as a valid shapely Polygon, or None for any other ROI (or a stand-in).

    QuPath gives a PolygonROI's geometry (``annotation.roi``) through ``java.awt.geom.Area``, which on Java
    25.0.3/26.0.1 (and Debian's 17.0.21) loses area and splits large outlines, and on every Java drops collinear
    vertices; the vertices themselves are what QuPath holds, draws and saves (the import script compares the same).
    """
    try:
        roi = annotation.java_object.getROI()
        if str(roi.getClass().getSimpleName()) != "PolygonROI":
            return None
        polygon = Polygon([(float(p.getX()), float(p.getY())) for p in roi.getAllPoints()])
    except Exception:  # no Java object (a test double), or fewer than 3 vertices
        return None
    return polygon if polygon.is_valid and not polygon.is_empty else None


def paquo_annotation_to_object(annotation: Any) -> QuPathObject | None:
    """A paquo annotation as a ``QuPathObject``: properties from QuPath's own GeoJSON, exact ROI geometry.

    QuPath's GeoJSON rounds coordinates to 2 decimals, so the geometry is taken from the ROI itself (a
    PolygonROI's vertices, ``_held_outline``; else ``annotation.roi``, through WKB) for the area and vertex
    comparisons of the keep-edits rule.
    """
    try:
        obj = feature_to_object(annotation.to_geojson(), source="paquo annotation")
    except GeoJSONError:
        return None  # not understood: never removed, so the annotator keeps it
    if obj is None:
        return None
    held = _held_outline(annotation)
    exact = held if held is not None else repair_geometry(annotation.roi)
    return obj if exact is None else replace(obj, geometry=exact)


class PaquoProject:
    """A QuPath project written through paquo; same interface as ``FilesProject``."""

    backend = "paquo"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            from paquo.projects import QuPathProject
        except ImportError as exc:
            raise ProjectError(f"paquo is not installed ({exc}); install it with `pip install paquo`") from None
        except Exception as exc:  # paquo raises several kinds when it finds no QuPath
            raise ProjectError(f"paquo cannot start QuPath ({exc}); set PAQUO_QUPATH_DIR to a QuPath install") from None
        p = Path(path)
        self.path = p.parent if p.suffix == ".qpproj" else p
        self.project_file = self.path / PROJECT_FILE
        self._stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self._backed_up: set[Path] = set()
        self._backup(self.project_file)
        try:
            self._qp = QuPathProject(self.project_file, mode="a")  # paquo takes a dotted folder for a file
        except (ValueError, OSError) as exc:
            raise ProjectError(f"{self.path}: paquo cannot open or create the QuPath project ({exc})") from None
        self.updates: list[ImageUpdate] = []
        self._claimed: set[str] = set()  # entries matched to a slide in this session

    # ----------------------------------------------------------------------------------- helpers

    def _backup(self, path: Path) -> None:
        if path in self._backed_up or not path.exists():
            return
        shutil.copy2(path, self._backup_name(path))
        self._backed_up.add(path)

    def _backup_name(self, path: Path) -> Path:
        """``<name>.bak-<stamp>``, never one that exists (two runs within a second keep both backups)."""
        target, n = path.with_name(f"{path.name}.bak-{self._stamp}"), 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.bak-{self._stamp}-{n}")
        return target

    def _entry_info(self, entry: Any) -> EntryInfo | None:
        try:
            uri = str(entry.uri)
        except Exception:  # entries with several or no URIs are not ours
            return None
        try:
            width, height = int(entry.width), int(entry.height)
        except Exception:  # the image metadata cannot be read: matched by URI and ZEUS metadata only
            width = height = None
        return EntryInfo(key=str(entry.entry_id), uri=uri, image_name=str(entry.image_name),
                         metadata={str(k): str(v) for k, v in dict(entry.metadata).items()},
                         width=width, height=height)

    def _match_entry(self, slide: SlideKey) -> Any | None:
        entries = list(self._qp.images)
        infos = [(e, self._entry_info(e)) for e in entries]
        found = match_entry([i for _, i in infos if i is not None], slide, self._claimed)
        return None if found is None else next(e for e, i in infos if i is not None and i.key == found.key)

    def _path_classes(self, wanted: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        from paquo.classes import QuPathPathClass

        classes = list(self._qp.path_classes)
        names = {pc.name for pc in classes}
        missing = [QuPathPathClass(n, color=tuple(rgb)) for n, rgb in wanted.items() if n not in names]
        if missing:
            self._qp.path_classes = classes + missing
        return {pc.name: pc for pc in self._qp.path_classes}

    # ----------------------------------------------------------------------------------- interface

    def add_or_update_image(
        self,
        slide_path: str | os.PathLike[str],
        geojson_features: Iterable[Mapping[str, Any]],
        *,
        width: int,
        height: int,
        mpp: float | None = None,
        uri_map: UriMap = (),
        metadata: Mapping[str, Any] | None = None,
        levels: Sequence[tuple[int, int]] | None = None,
        magnification: float | None = None,
        tile_size: tuple[int, int] | None = None,
        image_name: str | None = None,
        provider: str = "auto",
        tiles: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Add the slide (or find its entry), merge the annotations by the keep-edits rule, save the image.

        ``width``, ``height``, ``mpp``, ``levels``, ``magnification``, ``tile_size`` and ``provider`` are
        accepted for interface parity; QuPath reads them from the slide itself here.
        ``tiles``: the image's ZEUS heatmap tiles; they replace its earlier ZEUS tiles (an empty sequence
        removes them); ``None`` leaves the heatmap as it is.
        """
        from paquo.images import QuPathImageType
        from paquo.pathobjects import QuPathPathAnnotationObject

        try:  # plain JSON values (lists, not tuples), finite: as QuPath's reader and the record need them
            features = [dict(f) for f in json.loads(json.dumps([dict(f) for f in geojson_features], allow_nan=False))]
        except (TypeError, ValueError) as exc:
            raise ProjectError(f"{slide_path}: the ZEUS annotations cannot be written as JSON ({exc})") from None
        try:
            tile_features = None if tiles is None else json.loads(json.dumps(
                check_tiles(tiles, f"{slide_path} (heatmap tiles)"), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ProjectError(f"{slide_path}: the heatmap tiles cannot be written as JSON ({exc})") from None
        local_uri = path_to_file_uri(slide_path)
        mapped_uri = path_to_file_uri(slide_path, uri_map)
        name = image_name or Path(os.fspath(slide_path)).name
        slide_key = SlideKey(path=map_path(slide_path), uris=(mapped_uri, local_uri), name=name,
                             width=int(width), height=int(height))
        entry = self._match_entry(slide_key)
        created = entry is None
        if entry is None:
            try:
                entry = self._qp.add_image(os.fspath(Path(slide_path).absolute()),
                                           image_type=QuPathImageType.BRIGHTFIELD_H_E)
            except (OSError, RuntimeError) as exc:
                raise ProjectError(f"{slide_path}: QuPath cannot add the image ({exc})") from None
            if image_name:
                entry.image_name = image_name
            keep_uri = mapped_uri
        else:
            keep_uri = str(entry.uri)  # the annotator's: QuPath may have rewritten it where they found the image
            if not same_file_uri(keep_uri, local_uri):
                self._qp.update_image_paths(uri2uri={keep_uri: local_uri})  # work on the local file
        self._claimed.add(str(entry.entry_id))
        if (width, height) != (int(entry.width), int(entry.height)):
            raise ProjectError(
                f"{slide_path}: QuPath reads {entry.width}x{entry.height} px, ZEUS read {width}x{height}"
            )

        self._backup(entry.entry_path / "data.qpdata")
        wanted: dict[str, Sequence[int]] = {}
        for f in features:
            cls = (f.get("properties") or {}).get("classification") or {}
            if isinstance(cls.get("name"), str):
                wanted.setdefault(cls["name"], cls.get("color") or class_color(cls["name"]))
        self._path_classes(wanted)

        # the keep-edits rule of bridge/edits.py, as the import script applies it inside QuPath
        entry_dir = Path(entry.entry_path)
        written = {**written_record(entry_dir / ZEUS_GEOJSON), **written_objects(features)}
        hierarchy = entry.hierarchy
        pairs = [(a, paquo_annotation_to_object(a)) for a in hierarchy.annotations]
        existing = [o for _, o in pairs if o is not None]
        merge = merge_annotations(existing, features, written, read_import_record(entry_dir))
        removed_ids = {id(o) for o in merge.removed}
        with hierarchy.no_autoflush():
            for annotation, obj in pairs:
                if obj is not None and id(obj) in removed_ids:
                    hierarchy.annotations.discard(annotation)
            for feature in merge.added:
                # through QuPath's own GeoJSON reader: the object keeps the ID, class, name and measurements
                hierarchy.annotations.add(QuPathPathAnnotationObject.from_geojson(feature))
            if tile_features is not None:
                self._replace_zeus_tiles(hierarchy, entry_dir / ZEUS_TILES, tile_features)
        for key, value in zeus_entry_metadata(metadata).items():
            entry.metadata[key] = value
        entry.metadata[META_SLIDE] = slide_key.path
        entry.metadata[META_URI] = mapped_uri
        entry.save()
        write_import_record(entry_dir, merge.record)  # after the image data, as the import script does
        self._keep_written(entry_dir / ZEUS_GEOJSON, features)
        if not same_file_uri(str(entry.uri), keep_uri):
            self._qp.update_image_paths(uri2uri={str(entry.uri): keep_uri})
        self._qp.save(images=False)
        entry_id = str(entry.entry_id)
        self.updates.append(ImageUpdate(entry_id, str(entry.image_name), created, len(features), merge))
        return entry_id

    def _replace_zeus_tiles(self, hierarchy: Any, path: Path, tiles: list[dict[str, Any]]) -> None:
        """Keep ``tiles`` as ``path`` (an empty collection only where a file was), then replace the image's
        earlier ZEUS tiles by what QuPath's GeoJSON reader makes of that file, as the import script does
        (one removal, one addition below the root; paquo's per-object reader takes ~5 ms a tile)."""
        from paquo.java import File, PathIO
        from paquo.pathobjects import QuPathPathTileObject

        if tiles or path.exists():
            self._keep_written(path, tiles, "heatmap tiles")
        try:
            read = list(PathIO.readObjects(File(os.fspath(path)))) if tiles else []
        except Exception as exc:  # a Java exception through JPype
            raise ProjectError(f"{path}: QuPath cannot read the heatmap tiles ({exc})") from None
        if len(read) != len(tiles) or not all(o.isTile() for o in read):
            raise ProjectError(f"{path}: QuPath read {len(read)} object(s), not the {len(tiles)} heatmap tile(s)")
        new = [QuPathPathTileObject(o) for o in read]
        earlier = [t for t in hierarchy.tiles if is_zeus_tile("tile", t.measurements)]
        detections = hierarchy.detections  # tiles are detections; paquo's tile view is read-only
        if earlier:
            detections -= earlier
        if new:
            detections |= new

    def _keep_written(self, path: Path, features: list[dict[str, Any]], what: str = "annotations") -> None:
        """ZEUS's result beside the image data, the record the keep-edits rule and ``zeus export`` read; a
        different older copy is kept as a backup (its IDs stay part of the record)."""
        text = json.dumps({"type": "FeatureCollection", "features": features}, allow_nan=False)
        try:
            if path.exists() and path.read_text(encoding="utf-8") != text:
                shutil.copy2(path, self._backup_name(path))
            with atomic_open(path, "w") as fh:
                fh.write(text)
        except OSError as exc:
            raise ProjectError(f"{path}: cannot keep the ZEUS {what} beside the image data ({exc})") from None

    @property
    def last_merge(self) -> MergeResult | None:
        return self.updates[-1].merge if self.updates else None

    def save(self) -> None:
        """Write the project file (each image was saved when it was updated)."""
        self._qp.save(images=False)

    def close(self) -> None:
        """paquo needs no closing; the JVM stays up until the process ends."""

    def __enter__(self) -> PaquoProject:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.save()
        self.close()
