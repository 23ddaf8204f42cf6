"""Which slides of a run are done: per-slide state files, and one run at a time per slide (locks).

Per-slide state lives in ``<out>/.state/<stem>.json``. A slide's outputs are written atomically and
its state file last, so a state file means complete outputs. The state records a hash of every
parameter that decides the outputs (models and weights, prompts, patch geometry, threshold, the
slide's content fingerprint and pixel size) and the size and sha256 of each output: a later run with
the same parameters skips the slide when all of that still matches, and redoes it otherwise. Before
a slide is (re)done its state is removed and the temporary files that a killed run may have left
beside its outputs are deleted, so a crash or ``kill -9`` never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ZeusError
from ..output_set import atomic_open, remove_dead_staging
from ..outputs import SlideReport, output_paths

STATE_DIR = ".state"
STATE_VERSION = 1


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
        if not isinstance(outputs, dict) or set(outputs) != set(output_paths(self.out_dir, stem, "tiles" in outputs)):
            return None  # the parameters in the state hash decide whether there are tiles
        for rec in outputs.values():
            path = self.out_dir / rec.get("file", "")
            try:
                if path.stat().st_size != rec.get("size") or _sha256(path) != rec.get("sha256"):
                    return None
            except OSError:
                return None
        report = state.get("report")
        return report if isinstance(report, dict) else None

    def check_owner(self, stem: str, slide: str, fingerprint: str) -> None:
        """Refuse ``slide`` when the outputs named ``<stem>.*`` here are another slide's (one-line ZeusError).

        A slide is its full path and its content: a slide at another path with other content (``a/s.tiff``
        after ``b/s.tiff``) would silently replace the first one's outputs. The same file moved, or the same
        path with new content, is the same slide.
        """
        state = self.load(stem)
        if not state or not isinstance(state.get("slide"), str):
            return
        owner = state["slide"]
        if os.path.realpath(owner) == os.path.realpath(slide) or state.get("fingerprint") == fingerprint:
            return
        raise ZeusError(f"{slide}: its outputs would be named {stem}.* in {self.out_dir}, which holds the outputs "
                        f"of another slide, {owner}; give it another --out (or rename one of them)")

    def begin(self, stem: str) -> int:
        """Forget a slide's state and delete temporary files a killed run left beside its outputs."""
        self.path(stem).unlink(missing_ok=True)
        return self.clean_partial(stem)

    def clean_partial(self, stem: str) -> int:
        """Remove what killed writers left for this slide: temporaries beside its outputs, dead staging folders."""
        removed = remove_dead_staging(self.out_dir)
        patterns = [self.out_dir / f".{glob.escape(Path(p).name)}.*"
                    for p in output_paths(self.out_dir, stem, tiles=True).values()]
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


@contextlib.contextmanager
def run_record_lock(out_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock under which a run reads, merges and writes the folder's run.json (``<out>/.state/run-json/``:
    a folder, so no slide's ``<stem>.lock`` can be its name)."""
    from filelock import FileLock

    folder = Path(out_dir) / STATE_DIR / "run-json"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / "lock"), thread_local=False):
        yield


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
    report = SlideReport.from_dict(data, "state file")
    report.status = status
    report.outputs = output_paths(out_dir, report.stem, tiles="tiles" in report.outputs)
    return report
