"""The output contract: what a run writes per slide and per folder, named, read and written in one place.

Per slide ``<stem>`` (:func:`output_stem`): ``<stem>.geojson`` (QuPath annotations), ``<stem>.scores.npz``
(:class:`PatchScores`), ``<stem>.overlay.png``, and with ``--tiles`` ``<stem>.tiles.geojson``
(:func:`output_paths` lists them all); per output folder ``run.json`` (the run summary, a :class:`RunRecord`
holding one :class:`SlideReport` per slide, written by :func:`write_run_record` and read by
:func:`read_run_record` only). A slide's outputs are written as one set (``output_set.OutputSet``).

A slide's identity in an output folder is its full path and content, not its stem: a run refuses a slide
whose stem another slide's outputs already hold there (``runs.state.StateStore.check_owner``).

The scores file is the interchange format between embedding and polygons (design.md section 7).
``<slide>.scores.npz`` holds ``coords`` int64 (N, 2) patch top-left (x, y) in level-0 px, ``scores``
float32 (N, C) cosine similarities, ``classes`` str (C,), ``positive_class`` str, ``patch_size`` and
``stride`` int (level-0 px), ``width`` and ``height`` int (level-0 px), ``mpp`` float (NaN if unknown)
and ``meta`` str (JSON). Anyone can write one and turn it into polygons without a GPU.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ZeusError, one_line
from .output_set import atomic_open, atomic_path

GEOJSON_SUFFIX = ".geojson"
SCORES_SUFFIX = ".scores.npz"
OVERLAY_SUFFIX = ".overlay.png"
TILES_SUFFIX = ".tiles.geojson"
RUN_JSON = "run.json"
_OME_SUFFIXES = (".ome.tiff", ".ome.tif")


def output_stem(slide_path: str | Path) -> str:
    """File stem for a slide's outputs (``a.ome.tif`` -> ``a``)."""
    name = Path(slide_path).name
    for suffix in _OME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


OUTPUT_KINDS = {"geojson": GEOJSON_SUFFIX, "scores": SCORES_SUFFIX, "overlay": OVERLAY_SUFFIX, "tiles": TILES_SUFFIX}


def output_paths(out_dir: str | Path, stem: str, tiles: bool = False) -> dict[str, str]:
    """A segmented slide's outputs by kind: geojson, scores, overlay, and with ``tiles`` (``--tiles``) tiles."""
    out = Path(out_dir)
    return {kind: str(out / f"{stem}{suffix}") for kind, suffix in OUTPUT_KINDS.items() if tiles or kind != "tiles"}


@dataclass
class SlideReport:
    """One slide's report: what ``run.json`` lists per slide and its state file records."""

    slide: str
    stem: str
    width: int
    height: int
    mpp: float | None
    patches: int
    tissue_fraction: float
    regions: int
    tumor_area_um2: float | None
    seconds: dict[str, float]
    patches_per_s: float
    outputs: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    status: str = "done"  # done (computed by this run) or skipped (done before with the same parameters)
    cache: str = "off"  # embedding cache: hit (nothing embedded), miss (no entry), partial (some patches/models), off
    cache_reused: int = 0  # scored patches whose features came from the cache (not embedded by this run)
    sampling: dict[str, Any] | None = None  # --sampling adaptive: patches embedded/skipped (sampling.py); None: exact

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["sampling"] is None:
            del out["sampling"]
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = RUN_JSON) -> SlideReport:
        """A report as written by :meth:`to_dict`, checked; a one-line :class:`ZeusError` when it is not one."""
        if not isinstance(data, dict):
            raise ZeusError(f"{where}: a slide report is not an object")
        slide = data.get("slide")
        if not isinstance(slide, str) or not slide:
            raise ZeusError(f"{where}: a slide report names no slide")
        try:
            width, height = int(data["width"]), int(data["height"])
        except (KeyError, TypeError, ValueError):
            raise ZeusError(f"{where}: the report of {slide} has no width/height") from None
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            raise ZeusError(f"{where}: the report of {slide} has no width/height")
        outputs = data.get("outputs", {})
        if not isinstance(outputs, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in outputs.items()):
            raise ZeusError(f"{where}: the report of {slide} lists no outputs")
        stem = data.get("stem")
        if not isinstance(stem, str) or not stem:
            geojson = outputs.get("geojson", "")
            stem = Path(geojson.replace("\\", "/")).name.removesuffix(GEOJSON_SUFFIX) or output_stem(slide)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.update(slide=slide, stem=stem, width=width, height=height, outputs=dict(outputs),
                      mpp=positive_number(data.get("mpp")))
        for name, default in (("patches", 0), ("tissue_fraction", 0.0), ("regions", 0), ("tumor_area_um2", None),
                              ("seconds", {}), ("patches_per_s", 0.0), ("warnings", [])):
            values.setdefault(name, default)
        return cls(**values)


@dataclass
class RunRecord:
    """``run.json``: a run's parameters, models, prompts and versions, and one :class:`SlideReport` per slide.

    Known fields are typed; fields this version does not know (added by later versions or other commands)
    are kept in ``extra`` and written back unchanged. ``earlier``: the records of earlier runs into the same
    folder, each with only its slides that this run did not segment and whose outputs are still there (so
    a folder's run.json lists every slide it holds, each with the parameters it was segmented with).
    """

    command: str = "segment"
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    model: dict[str, Any] = field(default_factory=dict)  # the first model's info; "spec" is what --model said
    models: list[dict[str, Any]] = field(default_factory=list)
    prompts: dict[str, Any] = field(default_factory=dict)  # file, sha256, classes, positive_class, texts_per_class
    parameters: dict[str, Any] = field(default_factory=dict)
    parameters_sha256: str | None = None
    executor: str | None = None
    cache: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    adapter: dict[str, Any] | None = None  # zeus learn's adapter, when the run used one
    sampling: str | None = None  # --sampling exact|adaptive, when recorded
    slides: list[SlideReport] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, int] = field(default_factory=dict)
    complete: bool = False
    run_id: str | None = None  # tells this run's own run.json from another run's
    earlier: list[RunRecord] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def every_slide(self) -> list[tuple[RunRecord, SlideReport]]:
        """Every slide the folder holds, with the record of the run that segmented it (this run's first)."""
        return [(self, r) for r in self.slides] + [(e, r) for e in self.earlier for r in e.slides]

    def carry_earlier(self, previous: RunRecord | None, stems: set[str],
                      present: Callable[[SlideReport], bool]) -> None:
        """Keep, from ``previous`` (the folder's run.json as this run finds it: another run's, or this run's own
        last write) and the runs it kept, the slides whose stem is not in ``stems`` (this run's cohort) and whose
        outputs are ``present``."""
        if previous is None:
            self.earlier = []
            return
        own = previous.run_id is not None and previous.run_id == self.run_id
        kept = []
        for rec in ([] if own else [previous]) + previous.earlier:
            slides = [r for r in rec.slides if r.stem not in stems and present(r)]
            if slides:
                kept.append(replace(rec, slides=slides, earlier=[], failed=[]))
        self.earlier = kept

    @property
    def model_spec(self) -> str | None:
        spec = self.model.get("spec")
        return str(spec) if spec else None

    @property
    def prompt_file(self) -> str | None:
        file = self.prompts.get("file")
        return str(file) if file else None

    @property
    def zeus_version(self) -> str | None:
        version = self.versions.get("zeus-qupath")
        return str(version) if version else None

    def slide(self, stem: str) -> SlideReport | None:
        return next((r for r in self.slides if r.stem == stem), None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in ("adapter", "sampling", "run_id") and value is None or f.name == "earlier" and not value:
                continue
            out[f.name] = [r.to_dict() for r in value] if f.name in ("slides", "earlier") else value
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = RUN_JSON) -> RunRecord:
        if not isinstance(data, dict) or not isinstance(data.get("slides", []), list):
            raise ZeusError(f"{where}: not a ZEUS run summary (no 'slides' list)")
        kinds = {"command": str, "started": str, "finished": str, "seconds": (int, float), "model": dict,
                 "models": list, "prompts": dict, "parameters": dict, "parameters_sha256": str, "executor": str,
                 "cache": str, "versions": dict, "adapter": dict, "sampling": str, "failed": list,
                 "summary": dict, "complete": bool, "run_id": str}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("slides", "earlier"):
                continue
            if key not in kinds:
                extra[key] = value
            elif value is not None:
                if not isinstance(value, kinds[key]) or isinstance(value, bool) and kinds[key] is not bool:
                    raise ZeusError(f"{where}: {key!r} is not a {getattr(kinds[key], '__name__', 'number')}")
                values[key] = value
        slides = [SlideReport.from_dict(r, where) for r in data.get("slides", [])]
        earlier = data.get("earlier", [])
        if not isinstance(earlier, list):
            raise ZeusError(f"{where}: 'earlier' is not a list")
        return cls(**values, slides=slides, earlier=[cls.from_dict(e, where) for e in earlier], extra=extra)


def read_run_record(folder: str | Path) -> RunRecord | None:
    """A folder's ``run.json`` (None when it has none); one-line :class:`ZeusError` when it is not a run summary."""
    path = Path(folder) / RUN_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ZeusError(f"{path}: cannot read the ZEUS run summary ({one_line(str(exc), 160)})") from None
    return RunRecord.from_dict(data, str(path))


def write_run_record(folder: str | Path, record: RunRecord) -> Path:
    """Write ``record`` as the folder's ``run.json`` (atomically)."""
    path = Path(folder) / RUN_JSON
    with atomic_open(path) as fh:
        json.dump(record.to_dict(), fh, indent=2, default=str)
    return path


def positive_number(value: Any) -> float | None:
    """A recorded size or pixel size as a finite positive float, else None (missing, malformed, NaN, <= 0)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


MAX_SIDE = 1 << 31  # level-0 px
MAX_CLASSES = 1000
MAX_META_BYTES = 64_000_000
REQUIRED = ("coords", "scores", "classes", "positive_class", "patch_size", "stride", "width", "height", "mpp", "meta")


@dataclass(frozen=True)
class PatchScores:
    coords: np.ndarray
    scores: np.ndarray
    classes: tuple[str, ...]
    positive_class: str
    patch_size: int
    stride: int
    width: int
    height: int
    mpp: float | None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.coords.shape[0]
        if self.coords.ndim != 2 or self.coords.shape[1] != 2:
            raise ZeusError(f"coords must be (N, 2), got {self.coords.shape}")
        if self.scores.ndim != 2 or self.scores.shape != (n, len(self.classes)):
            raise ZeusError(f"scores must be (N={n}, C={len(self.classes)}), got {self.scores.shape}")
        if self.positive_class not in self.classes:
            raise ZeusError(f"positive class {self.positive_class!r} is not one of {list(self.classes)}")
        if min(self.patch_size, self.stride, self.width, self.height) <= 0:
            raise ZeusError("patch_size, stride, width and height must be positive")
        if n and self.coords.min() < 0:  # any grid: one lattice, one per tissue contour (CLAM/ZEUS), or none
            raise ZeusError("coords must be non-negative level-0 px")
        if len(self.classes) < 2:
            raise ZeusError(f"need at least two classes, got {list(self.classes)}")
        if not isinstance(self.meta, dict):
            raise ZeusError("meta must be a dict")
        if not np.all(np.isfinite(self.scores)):
            raise ZeusError("scores contain NaN or infinite values")

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class)

    def save(self, path: str | os.PathLike[str]) -> None:
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(
                tmp,
                coords=self.coords.astype(np.int64),
                scores=self.scores.astype(np.float32),
                classes=np.array(self.classes, dtype=str),
                positive_class=np.array(self.positive_class),
                patch_size=np.array(self.patch_size, dtype=np.int64),
                stride=np.array(self.stride, dtype=np.int64),
                width=np.array(self.width, dtype=np.int64),
                height=np.array(self.height, dtype=np.int64),
                mpp=np.array(math.nan if self.mpp is None else self.mpp, dtype=np.float64),
                meta=np.array(json.dumps(self.meta)),
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PatchScores:
        """Read and validate a scores file; a one-line ZeusError for anything malformed or oversized.

        Array shapes and types are checked from the file's headers before any array is read, so a small
        crafted file cannot make zeus allocate more than its patch grid needs.
        """
        p = Path(path)
        try:
            with open(p, "rb") as fh:  # anything but a zip archive is refused before numpy guesses at it
                if fh.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
                    raise ZeusError("not a scores file (an .npz archive written by zeus segment or zeus score)")
            loaded = np.load(p, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ZeusError("not a scores file (an .npz archive)")
            with loaded as z:
                missing = [k for k in REQUIRED if k not in z.files]
                if missing:
                    raise ZeusError(f"not a scores file (missing {', '.join(missing)})")
                headers = {k: _npy_header(z, k) for k in REQUIRED}
                for key in ("positive_class", "patch_size", "stride", "width", "height", "mpp", "meta"):
                    if headers[key][0] != ():
                        raise ZeusError(f"{key} must be a single value, got shape {headers[key][0]}")
                for key in ("patch_size", "stride", "width", "height"):
                    if headers[key][1].kind not in "iu":
                        raise ZeusError(f"{key} must be an integer")
                if headers["meta"][1].kind != "U" or headers["positive_class"][1].kind != "U":
                    raise ZeusError("meta and positive_class must be strings")
                if headers["meta"][1].itemsize > MAX_META_BYTES * 4:
                    raise ZeusError(f"meta is larger than {MAX_META_BYTES // 1_000_000} MB")
                patch_size, stride = int(z["patch_size"]), int(z["stride"])
                width, height = int(z["width"]), int(z["height"])
                if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
                    raise ZeusError(f"slide size {width} x {height} px is not between 1 and {MAX_SIDE} px a side")
                if not (0 < patch_size <= MAX_SIDE and 0 < stride <= MAX_SIDE):
                    raise ZeusError("patch_size and stride must be positive pixel counts")
                (n, *rest), ctype = headers["coords"][:2]
                if rest != [2] or ctype.kind not in "iu":
                    raise ZeusError(f"coords must be integer (N, 2), got {ctype} {headers['coords'][0]}")
                # one grid, or one per tissue contour (CLAM/ZEUS): a few times the positions of one grid at most
                positions = 4 * (math.ceil(width / stride) + 1) * (math.ceil(height / stride) + 1)
                if n > positions:
                    raise ZeusError(f"{n:,} patches of stride {stride} cannot fit a {width} x {height} px slide")
                cshape, ctype = headers["classes"][:2]
                if len(cshape) != 1 or ctype.kind != "U" or not 2 <= cshape[0] <= MAX_CLASSES:
                    raise ZeusError(f"classes must be 2 to {MAX_CLASSES} names, got shape {cshape}")
                sshape, stype = headers["scores"][:2]
                if sshape != (n, cshape[0]) or stype.kind != "f":
                    raise ZeusError(f"scores must be float (N={n}, C={cshape[0]}), got {stype} {sshape}")
                mpp = float(z["mpp"])
                meta = json.loads(str(z["meta"]) or "{}")
                if not isinstance(meta, dict):
                    raise ZeusError(f"meta must be a JSON object, got {type(meta).__name__}")
                _check_tissue(meta.get("tissue"), width, height)
                classes = tuple(str(c) for c in z["classes"])
                if len(set(classes)) != len(classes) or not all(classes):
                    raise ZeusError(f"class names must be distinct and non-empty: {list(classes)}")
                coords = z["coords"].astype(np.int64)
                if n and (coords[:, 0].max() >= width or coords[:, 1].max() >= height):
                    i = int(np.argmax((coords[:, 0] >= width) | (coords[:, 1] >= height)))
                    raise ZeusError(f"patch {i} at {tuple(int(v) for v in coords[i])} lies outside the "
                                    f"{width} x {height} px slide")
                return cls(
                    coords=coords.reshape(n, 2),
                    scores=z["scores"].astype(np.float32).reshape(n, cshape[0]),
                    classes=classes,
                    positive_class=str(z["positive_class"]),
                    patch_size=patch_size,
                    stride=stride,
                    width=width,
                    height=height,
                    mpp=mpp if math.isfinite(mpp) and mpp > 0 else None,
                    meta=meta,
                )
        except FileNotFoundError:
            raise ZeusError(f"scores file not found: {p}") from None
        except IsADirectoryError:
            raise ZeusError(f"{p} is a folder, not a scores file") from None
        except ZeusError as exc:
            raise ZeusError(f"{p.name}: {exc}") from None
        except RecursionError:
            raise ZeusError(f"{p.name}: meta is nested too deeply") from None
        except (OSError, ValueError, TypeError, zipfile.BadZipFile, KeyError, EOFError) as exc:
            raise ZeusError(f"{p.name}: not a readable scores file ({one_line(str(exc), 160)})") from None


def _npy_header(z: Any, key: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran order) of one array of an open .npz, read from its header only."""
    with z.zip.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ZeusError(f"{key}: unsupported .npy version {version}")
    if dtype.hasobject:
        raise ZeusError(f"{key}: object arrays are not allowed")
    return tuple(int(v) for v in shape), dtype, bool(fortran)


def _check_tissue(info: Any, width: int, height: int) -> None:
    """The tissue mask in ``meta["tissue"]``: {"downsample": d, "png": base64 PNG} of about the slide / d."""
    if info is None:
        return
    if not isinstance(info, dict) or not isinstance(info.get("png"), str):
        raise ZeusError('meta "tissue" must be {"downsample": D, "png": BASE64_PNG}')
    ds = info.get("downsample")
    if isinstance(ds, bool) or not isinstance(ds, (int, float)) or not (math.isfinite(ds) and 1e-3 <= ds <= MAX_SIDE):
        raise ZeusError(f'meta "tissue" downsample must be a positive number, got {ds!r}')
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(base64.b64decode(info["png"], validate=True))) as im:
            w, h = im.size
            if im.format != "PNG":
                raise ZeusError('meta "tissue" png is not a PNG image')
            if abs(w - width / ds) > 2 + 0.01 * w or abs(h - height / ds) > 2 + 0.01 * h:
                raise ZeusError(f'meta "tissue" mask is {w} x {h} px, expected about {width / ds:.0f} x '
                                f"{height / ds:.0f} for the slide at downsample {ds:g}")
            im.load()
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ZeusError(f'meta "tissue" png cannot be decoded ({one_line(str(exc), 120)})') from None
