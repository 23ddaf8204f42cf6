"""Which slides a run segments: files, folders, glob patterns, or a CSV manifest (columns slide[,mpp]).

Each slide gets the stem its outputs are named after; two slides that would write the same outputs are refused.
"""

from __future__ import annotations

import csv
import glob
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlideError, ZeusError
from ..outputs import output_stem
from ..slide import SLIDE_SUFFIXES, check_slide_file

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a cohort: its file, the stem its outputs are named after, its pixel size if given."""

    path: str
    stem: str
    mpp: float | None = None



def _folder_slides(folder: Path) -> list[Path]:
    found = sorted(f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(SLIDE_SUFFIXES)
                   and not f.name.startswith("."))
    if not found:
        raise SlideError(f"no slide files in folder {folder}")
    return found


def _expand(item: str) -> list[Path]:
    p = Path(item).expanduser()
    if p.is_dir():
        return _folder_slides(p)
    if p.exists() or p.is_symlink():
        check_slide_file(p)  # a FIFO or device would block; a link loop is not "not found"
        return [p]
    if _GLOB_CHARS & set(item):
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
        files = [m for m in matches if m.is_file() and not m.name.startswith(".")]
        if not files:
            raise SlideError(f"no slides match {item}")
        return files
    raise SlideError(f"slide not found: {p}")


def _parse_mpp(text: str, where: str) -> float | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ZeusError(f"{where}: mpp must be a positive number, got {text!r}")
    return value


def read_manifest(path: str | os.PathLike[str]) -> list[tuple[Path, float | None]]:
    """(slide path, mpp or None) per row of a CSV manifest with columns ``slide`` and optionally ``mpp``.

    Relative slide paths are taken from the manifest's folder; blank lines and lines starting with ``#``
    are ignored.
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ZeusError(f"manifest not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ZeusError(f"cannot read manifest {p}: {exc}") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ZeusError(f"manifest {p.name} is empty")
    reader = csv.DictReader(lines)
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if "slide" not in fields:
        raise ZeusError(f"manifest {p.name}: needs a header row with a 'slide' column (and optionally 'mpp')")
    rows = []
    for n, row in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        if not row.get("slide"):
            raise ZeusError(f"manifest {p.name} line {n}: empty slide")
        slide = Path(row["slide"]).expanduser()
        rows.append((slide if slide.is_absolute() else p.parent / slide,
                     _parse_mpp(row.get("mpp", ""), f"manifest {p.name} line {n}")))
    return rows


def collect_slides(items: list[str] | tuple[str, ...], manifest: str | None = None) -> list[SlideEntry]:
    """The cohort: slides from files, folders (their slide files), glob patterns and a manifest, in order.

    A slide listed twice counts once. Two different slides whose outputs would share a name fail.
    """
    found: list[tuple[Path, float | None]] = []
    for item in items:
        found.extend((p, None) for p in _expand(item))
    if manifest:
        for path, mpp in read_manifest(manifest):
            if not path.exists():
                raise SlideError(f"slide not found: {path} (from {Path(manifest).name})")
            found.append((path, mpp))
    if not found:
        raise SlideError("no slides given: name slide files, folders or patterns, or pass --manifest FILE")
    entries: list[SlideEntry] = []
    seen: dict[str, int] = {}
    stems: dict[str, str] = {}
    for path, mpp in found:
        real = os.path.realpath(path)
        if real in seen:
            if mpp is not None and entries[seen[real]].mpp is None:
                entries[seen[real]] = SlideEntry(entries[seen[real]].path, entries[seen[real]].stem, mpp)
            continue
        stem = output_stem(path)
        if stem in stems:
            raise SlideError(f"two slides would write the same outputs {stem}.*: {stems[stem]} and {path}")
        stems[stem] = str(path)
        seen[real] = len(entries)
        entries.append(SlideEntry(str(Path(path).absolute()), stem, mpp))
    return entries
