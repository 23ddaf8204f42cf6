"""The QuPath-free project writer: creates or updates a QuPath project folder with plain JSON files.

What it writes (the layout QuPath 0.4 to 0.7 reads; entries as QuPath 0.5/0.6 write them):

- ``project.qpproj``: one entry per slide (``serverBuilder`` of type ``uri``, ``entryID``,
  ``randomizedName``, ``imageName``, ``metadata`` str->str with ``zeus.*`` keys),
- ``classifiers/classes.json``: the classes, merged (existing classes and colours are kept),
- ``data/<entryID>/zeus_annotations.geojson``: the ZEUS annotations of each image,
- ``data/<entryID>/zeus_tiles.geojson``: its ZEUS heatmap tiles, when the run wrote them
  (``zeus segment --tiles``); when a later run wrote none, an empty collection replaces the file,
  so that the import script clears the old heatmap instead of leaving one that disagrees with the
  new annotations,
- ``scripts/import_zeus_annotations.groovy``: the script that brings them into the image's
  hierarchy inside QuPath, applying the keep-edits rule (``bridge/edits.py``).

A slide's existing entry is found by what identifies the image (``bridge.entry_match``: its URI,
ZEUS's ``zeus.slide`` / ``zeus.uri`` metadata, its name), so an image the annotator relocated (QuPath
rewrote its URI) is updated, never added twice; an existing entry keeps its URI.

It never writes ``data.qpdata`` (QuPath writes it when an annotator saves), so annotators' edits
cannot be lost here. Existing entries and every key this module does not know are written back
unchanged. Before ``save()`` changes anything it copies the files it replaces to
``<name>.bak-<timestamp>``; the files of one ``save()`` are written as one set (``output_set.OutputSet``).
Every zeus writer holds the project's lock (``bridge.project.project_lock``) from reading to saving.
"""

from __future__ import annotations

import datetime as _dt
import importlib.resources
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeus_qupath import __version__
from zeus_qupath.errors import ProjectError
from zeus_qupath.output_set import OutputSet
from zeus_qupath.qupath_geojson import class_color

from .edits import MergeResult
from .entry_match import META_SLIDE, META_URI, EntryInfo, SlideKey, match_entry, next_entry_id
from .heatmap_tiles import ZEUS_TILES, check_tiles
from .uris import UriMap, map_path, path_to_file_uri, same_file_uri

PROJECT_FILE = "project.qpproj"
ZEUS_GEOJSON = "zeus_annotations.geojson"
IMPORT_SCRIPT = "import_zeus_annotations.groovy"
EXPORT_SCRIPT = "export_training_data.groovy"
SEGMENT_SCRIPT = "zeus_segment_current_image.groovy"
QUPATH_VERSION_WRITTEN = "0.5.1"  # the layout written for new projects; QuPath 0.4 to 0.7 read it

BIOFORMATS = "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder"
OPENSLIDE = "qupath.lib.images.servers.openslide.OpenslideServerBuilder"
PROVIDERS: dict[str, tuple[str | None, list[str]]] = {
    # name -> (providerClassName, args); Bio-Formats ships with every QuPath release
    "bioformats": (BIOFORMATS, ["--series", "0"]),
    "openslide": (OPENSLIDE, []),
    "auto": (None, []),  # no providerClassName: QuPath picks a reader itself when it opens the image
}
# QuPath's default classes (name, packed ARGB colour), written when a project has no classes.json yet
QUPATH_DEFAULT_CLASSES: tuple[tuple[str, int], ...] = (
    ("Tumor", -3670016), ("Stroma", -6895466), ("Immune cells", -6268256), ("Necrosis", -13487566),
    ("Other", -14336), ("Region*", -16777036), ("Ignore*", -4934476), ("Positive", -377282),
    ("Negative", -9408287),
)
_RGB_CHANNELS = [
    {"name": "Red", "color": -65536},
    {"name": "Green", "color": -16711936},
    {"name": "Blue", "color": -16776961},
]
MICROMETER = "\u00b5m"


def groovy_script_text(name: str) -> str:
    """The text of one of the packaged Groovy scripts (``zeus_qupath.groovy``)."""
    try:
        return importlib.resources.files("zeus_qupath.groovy").joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    # the groovy/ folder beside bridge/: the source tree, and zeus_qupath/groovy in an installed wheel
    fallback = Path(__file__).resolve().parent.parent / "groovy" / name
    try:
        return fallback.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProjectError(f"the Groovy script {name} is missing from the installation ({exc})") from None


def packed_argb(rgb: Sequence[int]) -> int:
    """``(r, g, b)`` -> QuPath's packed colour, a signed 32-bit int with alpha 255 (as in classes.json)."""
    r, g, b = (int(c) & 0xFF for c in rgb[:3])
    value = (0xFF << 24) | (r << 16) | (g << 8) | b
    return value - (1 << 32)


def estimate_downsample(full_w: int, full_h: int, w: int, h: int) -> float:
    """The downsample QuPath assigns to a pyramid level (``ImageResolutionLevel.Builder.addLevel(w, h)``)."""
    dx, dy = full_w / w, full_h / h
    closest_pow2 = 2.0 ** _java_round(math.log10((dx + dy) / 2.0) / math.log10(2))
    if abs(full_h / closest_pow2 - h) < 2 and abs(full_w / closest_pow2 - w) < 2:
        return closest_pow2
    if abs(full_w / float(_java_round(dx)) - w) <= 1:
        dx = float(_java_round(dx))
    if abs(full_h / float(_java_round(dy)) - h) <= 1:
        dy = float(_java_round(dy))
    if dx == dy:
        return dx
    if dx == closest_pow2 or dy == closest_pow2:
        return closest_pow2
    return (dx + dy) / 2.0


def _java_round(x: float) -> int:
    return math.floor(x + 0.5)  # Java's Math.round (half up), not Python's banker's rounding


def server_metadata(
    name: str,
    width: int,
    height: int,
    levels: Sequence[tuple[int, int]],
    mpp: float | None,
    magnification: float | None = None,
    tile_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``serverBuilder.metadata`` for an 8-bit RGB image, key for key as QuPath writes it."""
    dims = [(int(w), int(h)) for w, h in levels] or [(int(width), int(height))]
    if dims[0] != (int(width), int(height)):
        raise ProjectError(f"{name}: level 0 is {dims[0][0]}x{dims[0][1]}, but the image is {width}x{height}")
    level_list = [{"downsample": 1.0, "width": int(width), "height": int(height)}]
    last = 1.0
    for w, h in dims[1:]:
        d = estimate_downsample(int(width), int(height), w, h)
        if d <= last:  # QuPath keeps only increasing downsamples
            break
        level_list.append({"downsample": d, "width": w, "height": h})
        last = d
    if mpp is not None and math.isfinite(mpp) and mpp > 0:
        pw = {"value": float(mpp), "unit": MICROMETER}
    else:
        pw = {"value": 1.0, "unit": "px"}
    tw, th = tile_size if tile_size else (256, 256)
    meta: dict[str, Any] = {
        "name": name,
        "width": int(width),
        "height": int(height),
        "sizeZ": 1,
        "sizeT": 1,
        "channelType": "DEFAULT",
        "isRGB": True,
        "pixelType": "UINT8",
        "levels": level_list,
        "channels": [dict(c) for c in _RGB_CHANNELS],
        "pixelCalibration": {
            "pixelWidth": dict(pw),
            "pixelHeight": dict(pw),
            "zSpacing": {"value": 1.0, "unit": "z-slice"},
            "timeUnit": "SECONDS",
            "timepoints": [],
        },
    }
    if magnification is not None and math.isfinite(magnification) and magnification > 0:
        meta["magnification"] = float(magnification)
    meta["preferredTileWidth"] = int(tw)
    meta["preferredTileHeight"] = int(th)
    return meta


@dataclass(frozen=True)
class ImageUpdate:
    """What one ``add_or_update_image`` call did."""

    entry_id: str
    image_name: str
    created: bool  # False when the slide already had an entry
    n_features: int
    merge: MergeResult | None = None  # paquo backend only: the keep-edits merge applied in Python


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_features(features: Iterable[Mapping[str, Any]], slide: str) -> list[dict[str, Any]]:
    out = []
    for i, f in enumerate(features):
        if not isinstance(f, Mapping) or f.get("type") != "Feature" or not isinstance(f.get("geometry"), Mapping):
            raise ProjectError(f"{slide}: annotation {i} is not a GeoJSON Feature with a geometry")
        try:
            json.dumps(f, allow_nan=False)
        except (TypeError, ValueError) as exc:  # QuPath rejects NaN and infinity
            raise ProjectError(f"{slide}: annotation {i} cannot be written as JSON ({exc})") from None
        out.append(dict(f))
    return out


def _feature_classes(features: Iterable[Mapping[str, Any]]) -> dict[str, list[int]]:
    classes: dict[str, list[int]] = {}
    for f in features:
        cls = (f.get("properties") or {}).get("classification")
        if isinstance(cls, Mapping) and isinstance(cls.get("name"), str):
            color = cls.get("color")
            classes.setdefault(cls["name"], list(color)[:3] if isinstance(color, list) else class_color(cls["name"]))
    return classes


def zeus_entry_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Entry metadata (str -> str) with ``zeus.version``, ``zeus.date`` and ``zeus.status`` filled in."""
    out = {
        "zeus.version": __version__,
        "zeus.date": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
        "zeus.status": "pre-segmented",
    }
    for key, value in (metadata or {}).items():
        if value is not None:
            out[str(key)] = str(value)
    return out


def entry_uri(entry: Mapping[str, Any]) -> str | None:
    """The image URI of a ``project.qpproj`` entry (``serverBuilder.uri``; ``None`` when it has none)."""
    builder = entry.get("serverBuilder")
    for _ in range(8):  # wrapped builders (e.g. a rotated image) keep the image server builder inside
        if not isinstance(builder, Mapping):
            return None
        if isinstance(builder.get("uri"), str):
            return builder["uri"]
        builder = builder.get("builder")
    return None


def entry_info(entry: Mapping[str, Any]) -> EntryInfo:
    """What identifies a ``project.qpproj`` entry, for ``bridge.entry_match``."""
    meta = entry.get("metadata") if isinstance(entry.get("metadata"), Mapping) else {}
    builder = entry.get("serverBuilder")
    image_meta = builder.get("metadata") if isinstance(builder, Mapping) else None
    width = height = None
    if isinstance(image_meta, Mapping):
        width, height = _int_or_none(image_meta.get("width")), _int_or_none(image_meta.get("height"))
    if width is None or height is None:
        width, height = _int_or_none(meta.get("zeus.width")), _int_or_none(meta.get("zeus.height"))
    return EntryInfo(
        key=str(entry.get("entryID")),
        uri=entry_uri(entry),
        image_name=str(entry["imageName"]) if isinstance(entry.get("imageName"), str) else None,
        metadata={str(k): str(v) for k, v in meta.items() if v is not None},
        width=width,
        height=height,
    )


def _int_or_none(value: Any) -> int | None:
    try:
        v = int(str(value))
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def check_entry_ids(entries: Sequence[Any], project_file: str | os.PathLike[str]) -> None:
    """Refuse a project whose entries share an ID (one-line ``ProjectError``).

    QuPath keeps each image's data in ``data/<entryID>``: two entries with one ID share (and overwrite) one
    image's annotations, and ZEUS could not tell which entry is the slide's. Repair it in QuPath (remove one
    entry and add the image again) or restore a ``project.qpproj.bak-*``.
    """
    seen: dict[str, Any] = {}
    for entry in entries:
        if not isinstance(entry, dict) or "entryID" not in entry:
            continue
        key = str(entry["entryID"])
        if key in seen:
            names = f"{seen[key].get('imageName', '?')!s} and {entry.get('imageName', '?')!s}"
            raise ProjectError(f"{project_file}: two entries have the ID {key} ({names}); their data would be "
                               f"mixed: remove one in QuPath, or restore a {PROJECT_FILE}.bak-* file")
        seen[key] = entry


class FilesProject:
    """A QuPath project folder written without QuPath (see the module docstring).

    Changes are staged by ``add_or_update_image`` and written by ``save()``.
    """

    backend = "files"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        if p.suffix == ".qpproj":
            self.project_file, self.path = p, p.parent
        else:
            self.path, self.project_file = p, p / PROJECT_FILE
        if self.path.exists() and not self.path.is_dir():
            raise ProjectError(f"{self.path}: not a folder, cannot hold a QuPath project")
        self._data: dict[str, Any] = self._load()
        self._classes: list[dict[str, Any]] | None = None  # loaded on demand
        self._pending_geojson: dict[str, list[dict[str, Any]]] = {}
        self._pending_tiles: dict[str, list[dict[str, Any]]] = {}
        self._dirty = False
        self._uri_map: UriMap = ()
        self._claimed: set[str] = set()  # entries matched to a slide in this session
        self.updates: list[ImageUpdate] = []

    # ----------------------------------------------------------------------------------- reading

    def _load(self) -> dict[str, Any]:
        if not self.project_file.exists():
            now = _now_ms()
            return {
                "version": QUPATH_VERSION_WRITTEN,
                "createTimestamp": now,
                "modifyTimestamp": now,
                "uri": None,  # set by save(), through the uri_map of the images
                "lastID": 0,
                "images": [],
            }
        try:
            data = json.loads(self.project_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProjectError(f"{self.project_file}: cannot read the QuPath project ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("images", []), list):
            raise ProjectError(f"{self.project_file}: not a QuPath project file (no 'images' list)")
        data.setdefault("images", [])
        check_entry_ids(data["images"], self.project_file)
        return data

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The image entries (as in ``project.qpproj``, including staged changes)."""
        return self._data["images"]

    def find_entry(self, uri: str) -> dict[str, Any] | None:
        """The entry whose server URI names the same file as ``uri``, if any."""
        for entry in self.entries:
            if isinstance(entry, dict) and (u := entry_uri(entry)) is not None and same_file_uri(u, uri):
                return entry
        return None

    def match_entry(self, slide: SlideKey) -> dict[str, Any] | None:
        """The entry that is ``slide`` by the rules of ``bridge.entry_match`` (not one matched earlier)."""
        infos = [entry_info(e) for e in self.entries if isinstance(e, dict) and "entryID" in e]
        found = match_entry(infos, slide, self._claimed)
        if found is None:
            return None
        return next(e for e in self.entries if isinstance(e, dict) and str(e.get("entryID")) == found.key)

    def _next_id(self) -> int:
        ids = [e.get("entryID") for e in self.entries if isinstance(e, dict)]
        return next_entry_id(ids, self._data.get("lastID"), self.path / "data")

    def _load_classes(self) -> list[dict[str, Any]]:
        if self._classes is None:
            path = self.path / "classifiers" / "classes.json"
            if path.exists():
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                    classes = data["pathClasses"]
                    if not isinstance(classes, list):
                        raise TypeError("pathClasses is not a list")
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise ProjectError(f"{path}: cannot read the project classes ({exc})") from None
                self._classes = classes
            else:
                self._classes = [{"name": n, "color": c} for n, c in QUPATH_DEFAULT_CLASSES]
        return self._classes

    # ----------------------------------------------------------------------------------- changing

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
        provider: str = "bioformats",
        tiles: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Stage an entry for ``slide_path`` (new, or the existing one of the same file) and its annotations.

        ``levels``: the pyramid's level sizes (level 0 first) as the slide reader reports them. With
        them the entry carries the image metadata as QuPath writes it; without them it carries none
        and QuPath reads it from the file when the image is first opened (QuPath would otherwise use
        wrong levels). ``mpp`` then only reaches QuPath through the file itself.
        ``tiles``: the image's ZEUS heatmap tiles (``bridge.heatmap_tiles``), written as
        ``data/<entryID>/zeus_tiles.geojson``; an empty sequence clears an earlier heatmap (an existing
        file is replaced by an empty collection); ``None`` leaves the heatmap as it is.
        Returns the entry ID (QuPath's ``ProjectImageEntry.getID()``).
        """
        if provider not in PROVIDERS:
            raise ProjectError(f"unknown image provider {provider!r} (choose from {', '.join(PROVIDERS)})")
        features = _check_features(geojson_features, str(slide_path))
        tile_features = None if tiles is None else _check_features(
            check_tiles(tiles, f"{slide_path} (heatmap tiles)"), f"{slide_path} (heatmap tiles)")
        uri = path_to_file_uri(slide_path, uri_map)
        name = image_name or Path(os.fspath(slide_path)).name
        slide_key = SlideKey(path=map_path(slide_path), uris=(uri, path_to_file_uri(slide_path)), name=name,
                             width=int(width), height=int(height))
        entry = self.match_entry(slide_key)
        created = entry is None
        if entry is None:
            entry_id = self._next_id()
            provider_class, args = PROVIDERS[provider]
            builder: dict[str, Any] = {"builderType": "uri"}
            if provider_class is not None:
                builder["providerClassName"] = provider_class
            builder["uri"] = uri
            builder["args"] = list(args)
            if levels is not None:
                builder["metadata"] = server_metadata(name, width, height, levels, mpp, magnification, tile_size)
            entry = {
                "serverBuilder": builder,
                "entryID": entry_id,
                "randomizedName": str(uuid.uuid4()),
                "imageName": name,
                "metadata": {},
            }
            self.entries.append(entry)
            self._data["lastID"] = entry_id
        # an existing entry keeps its URI: QuPath may have rewritten it to where the annotator found the image
        self._claimed.add(str(entry["entryID"]))
        self._uri_map = uri_map
        if not isinstance(entry.get("metadata"), dict):
            entry["metadata"] = {}
        entry["metadata"].update(zeus_entry_metadata(metadata))
        entry["metadata"][META_SLIDE] = slide_key.path
        entry["metadata"][META_URI] = uri
        entry_key = str(entry["entryID"])
        self._pending_geojson[entry_key] = features
        if tile_features is not None:
            self._pending_tiles[entry_key] = tile_features
        classes = self._load_classes()
        known = {c.get("name") for c in classes if isinstance(c, dict)}
        for cls_name, rgb in _feature_classes(features).items():
            if cls_name not in known:
                classes.append({"name": cls_name, "color": packed_argb(rgb)})
                known.add(cls_name)
        self._dirty = True
        self.updates.append(ImageUpdate(entry_key, str(entry.get("imageName", name)), created, len(features)))
        return entry_key

    # ----------------------------------------------------------------------------------- writing

    def save(self) -> None:
        """Back up what will be replaced, then write every staged change atomically."""
        if not self._dirty:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        stamp = self._backup_stamp()
        script = groovy_script_text(IMPORT_SCRIPT)
        targets: list[tuple[Path, str]] = []
        for entry_id, features in self._pending_geojson.items():
            text = json.dumps({"type": "FeatureCollection", "features": features}, allow_nan=False)
            targets.append((self.path / "data" / entry_id / ZEUS_GEOJSON, text))
        for entry_id, tile_features in self._pending_tiles.items():
            target = self.path / "data" / entry_id / ZEUS_TILES
            if tile_features or target.exists():  # no tiles now: an empty collection clears the old heatmap
                targets.append((target, json.dumps({"type": "FeatureCollection", "features": tile_features},
                                                   allow_nan=False)))
        classes_text = json.dumps({"pathClasses": self._load_classes()}, indent=2, ensure_ascii=False)
        targets.append((self.path / "classifiers" / "classes.json", classes_text))
        targets.append((self.path / "scripts" / IMPORT_SCRIPT, script))
        for name in (EXPORT_SCRIPT, SEGMENT_SCRIPT):
            targets.append((self.path / "scripts" / name, groovy_script_text(name)))
        self._data["modifyTimestamp"] = max(_now_ms(), int(self._data.get("createTimestamp") or 0))
        if not isinstance(self._data.get("uri"), str):  # QuPath fails on a null project URI
            self._data["uri"] = path_to_file_uri(self.project_file.absolute(), self._uri_map, ascii=False)
        project_text = json.dumps(self._data, indent=2, ensure_ascii=False, allow_nan=False)
        targets.append((self.project_file, project_text))  # last: it references the data written before

        try:
            for target, text in targets:
                self._backup(target, text, stamp)
            with OutputSet(self.path) as staged:  # every file of the change lands, or none does
                for target, text in targets:
                    staged.path(target.relative_to(self.path).as_posix()).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ProjectError(f"{self.path}: cannot write the QuPath project ({exc})") from None
        self._pending_geojson.clear()
        self._pending_tiles.clear()
        self._dirty = False

    def _backup_stamp(self) -> str:
        base = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        stamp, n = base, 1
        while (self.path / f"{PROJECT_FILE}.bak-{stamp}").exists():
            n += 1
            stamp = f"{base}-{n}"
        return stamp

    @staticmethod
    def _backup(target: Path, new_text: str, stamp: str) -> None:
        if not target.exists():
            return
        try:
            if target.read_text(encoding="utf-8") == new_text:
                return
        except (OSError, UnicodeDecodeError):
            pass
        shutil.copy2(target, target.with_name(f"{target.name}.bak-{stamp}"))

    def close(self) -> None:
        """Nothing to release (present for the ``ProjectWriter`` interface)."""

    def __enter__(self) -> FilesProject:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.save()
        self.close()
