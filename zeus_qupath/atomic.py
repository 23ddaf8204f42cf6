"""Atomic file output: write to a temporary file in the same folder, then rename; outputs as a set; folders
checked for writing before any work."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from .errors import ZeusError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    ``suffix`` defaults to the target's own suffix so that libraries that pick a format from the
    file name (numpy, Pillow, tifffile) still do so.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(  # the writer's pid in the name lets a later run remove what a killed one left
        prefix=f".{target.name}.{os.getpid()}-", suffix=suffix if suffix is not None else target.suffix,
        dir=target.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
            if not entry.name.startswith(prefix):
                continue
            pid_text = entry.name[len(prefix):].split("-", 1)[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
                entry.unlink(missing_ok=True)
                removed += 1
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``path`` only when the block succeeds."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_set(paths: Sequence[str | os.PathLike[str]]) -> Iterator[list[Path]]:
    """Temporary paths for several outputs that appear together or not at all.

    Yields one temporary path per target (same folder, same suffix). When the block succeeds every
    temporary file is renamed onto its target, in the given order (put the file whose presence marks a
    finished result last); when it fails, or a file was not written, all of them are removed and no
    target is touched.
    """
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(_temp_beside(Path(p))) for p in paths]
        try:
            yield tmps
        except OSError as exc:  # name the output, not its temporary file
            names = {str(t): Path(p).name for t, p in zip(tmps, paths, strict=True)}
            if exc.filename is not None and str(exc.filename) in names:
                exc.filename = names[str(exc.filename)]
            raise
        missing = [str(t) for t in tmps if not t.exists()]
        if missing:
            raise FileNotFoundError(f"output not written: {missing[0]}")
        for tmp, target in zip(tmps, paths, strict=True):
            os.replace(tmp, target)


@contextlib.contextmanager
def _temp_beside(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
    finally:
        tmp_path.unlink(missing_ok=True)  # renamed already on success: nothing to remove


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
