"""Write several output files as one set: all of them appear in the output folder, or none does.

``OutputSet(folder)`` is a context manager. Inside it, ``outputs.path(name)`` gives the path to
write each file to: a hidden staging folder inside ``folder`` (same file system, so moving is a
rename). When the block ends normally, every staged file replaces its namesake in ``folder``; when
it raises, the staged files are deleted and ``folder`` is as it was (a folder that did not exist
is removed again). If moving the files in fails half-way (a full disk cannot do that, a rename
needs no space, but a permission change can), the files already moved are taken back and the
files they replaced are restored before the error is raised.

A process killed while staging leaves only the hidden ``.zeus-staging-*`` folder behind; no output
is half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

STAGING_PREFIX = ".zeus-staging-"


class OutputSet:
    """Stage files for ``folder`` and move them in together (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._staging: Path | None = None
        self._created: list[Path] = []  # folders made for the set, innermost last
        self._names: list[str] = []

    def __enter__(self) -> OutputSet:
        missing = []
        p = self.folder.absolute()
        while not p.exists():
            missing.append(p)
            p = p.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = list(reversed(missing))
        try:
            self._staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.folder))
        except BaseException:
            self._remove_created()
            raise
        return self

    def path(self, name: str) -> Path:
        """Where to write the output file ``name`` (a plain file name inside the folder)."""
        if self._staging is None:
            raise RuntimeError("OutputSet.path() outside its with-block")
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
        if name not in self._names:
            self._names.append(name)
        return self._staging / name

    def final(self, name: str) -> Path:
        """Where the output file ``name`` will be once the set is written."""
        return self.folder / name

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        staging = self._staging
        self._staging = None
        if staging is None:
            return
        try:
            if exc_type is None:
                self._commit(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            self._remove_created()
            raise
        shutil.rmtree(staging, ignore_errors=True)
        if exc_type is not None:
            self._remove_created()

    def _commit(self, staging: Path) -> None:
        old = staging / ".replaced"
        old.mkdir()
        moved: list[str] = []
        kept: list[str] = []
        try:
            for name in self._names:
                staged = staging / name
                if not staged.exists():
                    continue  # asked for but not written: nothing to publish under this name
                target = self.folder / name
                if target.exists() or target.is_symlink():
                    os.replace(target, old / name)
                    kept.append(name)
                os.replace(staged, target)
                moved.append(name)
        except BaseException:
            for name in moved:
                (self.folder / name).unlink(missing_ok=True)
            for name in kept:
                os.replace(old / name, self.folder / name)
            raise

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()  # only when empty: nothing else was put there meanwhile
            except OSError:
                break
        self._created = []
