"""A cohort of slides: which slides (files, folders, glob patterns, a CSV manifest) and which are done.

Per-slide state lives in ``<out>/.state/<stem>.json``. A slide's outputs are written atomically and
its state file last, so a state file means complete outputs. The state records a hash of every
parameter that decides the outputs (models and weights, prompts, patch geometry, threshold, the
slide's content fingerprint and pixel size) and the size and sha256 of each output: a later run with
the same parameters skips the slide when all of that still matches, and redoes it otherwise. Before
a slide is (re)done its state is removed and the temporary files that a killed run may have left
beside its outputs are deleted, so a crash or ``kill -9`` never leaves a half-written output behind.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_open
from .errors import SlideError, ZeusError
from .segment import SlideReport, output_paths, output_stem

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".jpg", ".jpeg", ".png", ".bmp", ".qptiff")
STATE_DIR = ".state"
STATE_VERSION = 1
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a cohort: its file, the stem its outputs are named after, its pixel size if given."""

    path: str
    stem: str
    mpp: float | None = None


@dataclass(frozen=True)
class SlideFailure:
    """A slide that could not be segmented, and why (one line)."""

    slide: str
    stem: str
    reason: str
    error_type: str
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    if p.exists():
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class StateStore:
    """Per-slide state files in ``<out>/.state``: written last, checked before a slide is skipped."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / STATE_DIR

    def path(self, stem: str) -> Path:
        return self.dir / f"{stem}.json"

    def load(self, stem: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path(stem).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def completed(self, stem: str, state_hash: str) -> dict[str, Any] | None:
        """The recorded report of a slide done with ``state_hash`` whose outputs are all intact, else None."""
        state = self.load(stem)
        if not state or state.get("version") != STATE_VERSION or state.get("state_hash") != state_hash:
            return None
        outputs = state.get("outputs")
        if not isinstance(outputs, dict) or set(outputs) != set(output_paths(self.out_dir, stem)):
            return None
        for rec in outputs.values():
            path = self.out_dir / rec.get("file", "")
            try:
                if path.stat().st_size != rec.get("size") or _sha256(path) != rec.get("sha256"):
                    return None
            except OSError:
                return None
        report = state.get("report")
        return report if isinstance(report, dict) else None

    def begin(self, stem: str) -> int:
        """Forget a slide's state and delete temporary files a killed run left beside its outputs."""
        self.path(stem).unlink(missing_ok=True)
        return self.clean_partial(stem)

    def clean_partial(self, stem: str) -> int:
        removed = 0
        patterns = [self.out_dir / f".{glob.escape(Path(p).name)}.*" for p in output_paths(self.out_dir, stem).values()]
        patterns.append(self.dir / f".{glob.escape(stem)}.json.*")
        for pattern in patterns:
            for tmp in glob.glob(str(pattern)):
                Path(tmp).unlink(missing_ok=True)
                removed += 1
        return removed

    def record(self, stem: str, state_hash: str, fingerprint: str, report: SlideReport,
               parameters: dict[str, Any] | None = None) -> Path:
        """Write the slide's state (after its outputs): parameters hash, output sizes and checksums, report."""
        outputs = {}
        for kind, p in report.outputs.items():
            path = Path(p)
            outputs[kind] = {"file": path.name, "size": path.stat().st_size, "sha256": _sha256(path)}
        state = {"version": STATE_VERSION, "stem": stem, "slide": report.slide, "fingerprint": fingerprint,
                 "state_hash": state_hash, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "outputs": outputs, "parameters": parameters or {}, "report": report.to_dict()}
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.path(stem)) as fh:
            json.dump(state, fh, indent=1, default=str)
        return self.path(stem)


class SlideLocks:
    """One run at a time per slide of an output folder: a lock file ``<out>/.state/<stem>.lock`` per slide.

    The locks are the operating system's (``flock``/``LockFileEx`` through ``filelock``), so a run that dies,
    even by ``kill -9``, leaves no lock behind. A second run into the same folder skips, or waits for, the
    slides the first one is working on instead of deleting its temporary files.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(out_dir) / STATE_DIR
        self._held: dict[str, Any] = {}

    def _lock(self, stem: str) -> Any:
        from filelock import FileLock

        self.dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.dir / f"{stem}.lock"), thread_local=False)

    def try_acquire(self, stem: str) -> bool:
        """Take the slide's lock if no other run holds it; True when this run holds it now."""
        from filelock import Timeout

        if stem in self._held:
            return True
        lock = self._lock(stem)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        self._held[stem] = lock
        return True

    def acquire(self, stem: str) -> None:
        """Wait for the slide's lock."""
        if stem not in self._held:
            lock = self._lock(stem)
            lock.acquire()
            self._held[stem] = lock

    def release(self, stem: str) -> None:
        lock = self._held.pop(stem, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for stem in list(self._held):
            self.release(stem)


def report_from_state(data: dict[str, Any], out_dir: str | os.PathLike[str], status: str = "skipped") -> SlideReport:
    """A :class:`SlideReport` from a state file's record, with outputs pointing into ``out_dir``."""
    fields = set(SlideReport.__dataclass_fields__)
    report = SlideReport(**{k: v for k, v in data.items() if k in fields})
    report.status = status
    report.outputs = output_paths(out_dir, report.stem)
    return report


def format_summary(reports: list[SlideReport], failures: list[SlideFailure], seconds: float) -> str:
    """The end-of-run table: every slide with its status, patch count, time, and the reason of a failure."""
    rows = [["slide", "status", "patches", "regions", "time s", "patches/s", "note"]]
    for r in reports:
        note = "; ".join(r.warnings) if r.status == "done" else "same parameters, outputs intact"
        if r.status == "done" and r.cache in ("hit", "partial"):
            note = (note + "; " if note else "") + f"embeddings from cache ({r.cache})"
        rows.append([r.stem, r.status, str(r.patches), str(r.regions),
                     f"{r.seconds.get('total', 0.0):.1f}" if r.status == "done" else "-",
                     f"{r.patches_per_s:.0f}" if r.status == "done" and r.patches_per_s else "-", note])
    for f in failures:
        rows.append([f.stem, "failed", "-", "-", f"{f.seconds:.1f}", "-", f.reason])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ----")
    done = sum(r.status == "done" for r in reports)
    skipped = sum(r.status == "skipped" for r in reports)
    lines.append(f"{len(reports) + len(failures)} slides: {done} done, {skipped} skipped, {len(failures)} failed "
                 f"in {seconds:.1f} s")
    return "\n".join(line.rstrip() for line in lines)
