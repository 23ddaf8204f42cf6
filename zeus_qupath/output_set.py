"""The one way zeus-qupath writes files: a set of files appears in its folder completely, or not at all.

``OutputSet(folder)`` is a context manager. Inside it, ``outputs.path(name)`` gives the path to write
each file to (``name`` a file name, or a relative path such as ``data/3/zeus_annotations.geojson``): a
hidden staging folder ``.zeus-staging-<pid>-*`` inside ``folder`` (same file system, so moving is a
rename). When the block ends normally, every staged file replaces its namesake in ``folder``, in the order
they were first asked for (put the file whose presence marks a finished result last); a file asked for
but not written is an error and nothing is moved. When the block raises, the staged files are deleted
and ``folder`` is as it was (a folder that did not exist is removed again). If moving the files in fails
half-way (a rename needs no space, but a permission change can fail it), the files already moved are
taken back and the files they replaced are restored before the error is raised.

A process killed while staging leaves only its staging folder behind, with its pid in the name; the next
``OutputSet`` in that folder removes the staging folders of writers that are no longer running (a live
writer's are kept). No output is ever half-written.

One file alone: :func:`atomic_path` / :func:`atomic_open` (a temporary ``.<name>.<pid>-*`` beside it,
renamed when the block succeeds; :func:`remove_stale_temporaries` removes those of dead writers).
:func:`writable_dir` checks an output folder before any work is done.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO

from .errors import ZeusError

STAGING_PREFIX = ".zeus-staging-"


def _alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (another user's counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's live process (or a platform without signal 0)
        return True
    return True


def _writer_pid(name: str, prefix: str) -> int | None:
    text = name[len(prefix):].split("-", 1)[0] if name.startswith(prefix) else ""
    return int(text) if text.isdigit() else None


def remove_dead_staging(folder: str | os.PathLike[str]) -> int:
    """Remove the staging folders that killed writers left in ``folder``; returns how many."""
    removed = 0
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            pid = _writer_pid(entry.name, STAGING_PREFIX)
            if pid is not None and entry.is_dir() and not entry.is_symlink() and not _alive(pid):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    return removed


def _plain_relative(name: str) -> PurePosixPath:
    rel = PurePosixPath(name.replace("\\", "/")) if name else PurePosixPath(".")
    if not name or rel.is_absolute() or any(part in ("", ".", "..") for part in rel.parts) or not rel.parts \
            or Path(name).is_absolute():
        raise ValueError(f"not a plain file name or relative path: {name!r}")
    return rel


class OutputSet:
    """Stage files for ``folder`` and move them in together (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._staging: Path | None = None
        self._created: list[Path] = []  # folders made for the set, innermost last
        self._names: list[str] = []
        self._retired: list[str] = []

    def __enter__(self) -> OutputSet:
        missing = []
        p = self.folder.absolute()
        while not p.exists() and not p.is_symlink():
            missing.append(p)
            p = p.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = list(reversed(missing))
        try:
            remove_dead_staging(self.folder)
            self._staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.folder))
        except BaseException:
            self._remove_created()
            raise
        return self

    def path(self, name: str) -> Path:
        """Where to write the output file ``name`` (a file name, or a path relative to the folder)."""
        if self._staging is None:
            raise RuntimeError("OutputSet.path() outside its with-block")
        rel = str(_plain_relative(name))
        if rel not in self._names:
            self._names.append(rel)
        staged = self._staging / rel
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def retire(self, name: str) -> None:
        """An earlier output ``name`` that this set replaces with nothing: it is removed when the set is
        written (and kept when it is not), e.g. a tiles file a run without ``--tiles`` would leave stale."""
        rel = str(_plain_relative(name))
        if rel not in self._retired:
            self._retired.append(rel)

    def final(self, name: str) -> Path:
        """Where the output file ``name`` will be once the set is written."""
        return self.folder / str(_plain_relative(name))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        staging = self._staging
        self._staging = None
        if staging is None:
            return
        try:
            if exc_type is None:
                self._commit(staging)
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            self._remove_created()
            self._name_output(error, staging)
            raise
        shutil.rmtree(staging, ignore_errors=True)
        if exc_type is not None:
            self._remove_created()
            self._name_output(exc, staging)

    def _name_output(self, error: BaseException | None, staging: Path) -> None:
        """An OSError on a staged file names the output it was for (its folder included), not the staging copy."""
        if not isinstance(error, OSError):
            return
        if error.filename is None and error.errno is not None:  # written through a file object (zip, PNG)
            error.filename = str(self.folder)
            return
        for attr in ("filename", "filename2"):
            name = getattr(error, attr, None)
            if name is None:
                continue
            try:
                rel = Path(os.fspath(name)).relative_to(staging)
            except (TypeError, ValueError):
                continue
            setattr(error, attr, str(self.folder / rel))

    def _commit(self, staging: Path) -> None:
        unwritten = [name for name in self._names if not (staging / name).is_file()]
        if unwritten:
            raise FileNotFoundError(errno.ENOENT, "output not written", str(self.folder / unwritten[0]))
        old = staging / ".replaced"
        old.mkdir()
        moved: list[str] = []
        kept: list[str] = []
        retired: list[str] = []
        made: list[Path] = []
        try:
            for n, name in enumerate(self._names):
                staged = staging / name
                target = self.folder / name
                parent = target.parent
                missing = []
                while not parent.exists():
                    missing.append(parent)
                    parent = parent.parent
                target.parent.mkdir(parents=True, exist_ok=True)
                made.extend(reversed(missing))
                if target.exists() or target.is_symlink():
                    os.replace(target, old / str(n))
                    kept.append(name)
                os.replace(staged, target)
                moved.append(name)
                remove_stale_temporaries(target)  # what killed writers of this file left beside it
            for n, name in enumerate(self._retired):
                target = self.folder / name
                if name not in self._names and (target.exists() or target.is_symlink()):
                    os.replace(target, old / f"retired-{n}")
                    retired.append(name)
        except BaseException:
            for name in moved:
                (self.folder / name).unlink(missing_ok=True)
            for name in kept:
                os.replace(old / str(self._names.index(name)), self.folder / name)
            for name in retired:
                os.replace(old / f"retired-{self._retired.index(name)}", self.folder / name)
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()  # only when empty: nothing else was put there meanwhile
            except OSError:
                break
        self._created = []


# ------------------------------------------------------------------------------------------ one file


def _temp_name_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}-"  # the writer's pid: a later run removes what a killed one left


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    ``suffix`` defaults to the target's own suffix so that libraries that pick a format from the
    file name (numpy, Pillow, tifffile) still do so.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_name_prefix(target),
                               suffix=suffix if suffix is not None else target.suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:  # through a file object
            exc.filename = str(target)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``path`` only when the block succeeds."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def remove_stale_temporaries(path: str | os.PathLike[str]) -> int:
    """Remove the temporary files that writers of ``path`` left when they were killed (kill -9, power loss).

    Only files whose writer process (the pid in their name) is gone on this machine are removed, so a
    concurrent run's file being written is never touched. Returns how many were removed.
    """
    target = Path(path)
    prefix = f".{target.name}."
    removed = 0
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            pid = _writer_pid(entry.name, prefix)
            if pid is not None and not _alive(pid) and not entry.is_dir():
                entry.unlink(missing_ok=True)
                removed += 1
    return removed


def writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` checked as a folder this process can write into (or create), before any work is done.

    Nothing is left behind: a folder that does not exist yet is not created; the nearest existing parent is
    checked instead. Raises a one-line ZeusError naming ``what`` (e.g. ``--out``) for a path that is a file,
    a read-only or foreign folder, or a folder that cannot be created.
    """
    p = Path(path).expanduser()
    probe_in = p
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise ZeusError(f"{what} {p}: {probe_in} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".zeus-write-test.", dir=probe_in)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOSPC: "no space left on device"}.get(
                      exc.errno or 0, exc.strerror or str(exc))
        raise ZeusError(f"cannot write to {what} {p}: {reason}") from None
    return p
