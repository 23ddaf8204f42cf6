"""Choose a QuPath project writer: paquo where a QuPath install is available, the QuPath-free one otherwise;
and the one lock every writer of a project holds (:func:`project_lock`)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from zeus_qupath.errors import ProjectError

from .project_files import FilesProject, ImageUpdate
from .uris import UriMap

BACKENDS = ("auto", "paquo", "files")
LOCK_FILE = ".zeus-project.lock"  # in the project folder; QuPath ignores it
LOCK_NOTICE_S = 2.0  # a writer waiting longer than this for the lock says so on stderr
LOCK_RETRIES = 100  # times a writer makes the folder again when the one before removed it


def project_root(path: str | os.PathLike[str]) -> Path:
    """The project folder of ``path`` (a folder or its ``project.qpproj``)."""
    p = Path(path)
    return p.parent if p.suffix == ".qpproj" else p


@contextlib.contextmanager
def project_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the project's writer lock: every zeus writer of a project (``project add``, ``segment --project``,
    either backend) reads, changes and saves it under this lock, so concurrent writers all land.

    The lock is the operating system's (``flock``/``LockFileEx`` through ``filelock``): a writer that dies,
    even by ``kill -9``, leaves none behind. A folder created only for the lock is removed again when nothing
    was written into it (before the lock is released; a writer waiting for it makes the folder again). A
    writer that waits says so, once, on stderr.
    """
    from filelock import FileLock, Timeout

    root = project_root(path)
    if root.exists() and not root.is_dir():
        raise ProjectError(f"{root}: not a folder, cannot hold a QuPath project")
    created = False
    lock = FileLock(str(root / LOCK_FILE), thread_local=False)
    noticed = False
    for _ in range(LOCK_RETRIES):
        try:
            if not root.exists():
                created = True
                root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProjectError(f"{root}: cannot create the QuPath project folder ({exc.strerror or exc})") from None
        try:
            try:
                lock.acquire(timeout=-1 if noticed else LOCK_NOTICE_S)
            except Timeout:  # another writer holds it: say why nothing happens, then wait for it
                print(f"zeus: another zeus writer is changing the QuPath project {root}; waiting for it",
                      file=sys.stderr, flush=True)
                noticed = True
                lock.acquire()
            break
        except FileNotFoundError:  # the writer before removed the folder it had made for nothing: make it again
            continue
        except OSError as exc:
            raise ProjectError(f"{root}: cannot lock the QuPath project ({exc.strerror or exc})") from None
    else:
        raise ProjectError(f"{root}: cannot lock the QuPath project (its folder keeps disappearing)")
    try:
        yield
    finally:
        try:  # a folder made only for the lock goes again, removed while the lock is still held
            if created and {p.name for p in root.iterdir()} <= {LOCK_FILE}:
                with contextlib.suppress(OSError):
                    (root / LOCK_FILE).unlink(missing_ok=True)
                    root.rmdir()
        finally:
            lock.release()


class ProjectWriter(Protocol):
    """What both project writers offer (``FilesProject``, ``PaquoProject``)."""

    backend: str
    updates: list[ImageUpdate]

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
        tiles: Sequence[Mapping[str, Any]] | None = None,
    ) -> str: ...

    def save(self) -> None: ...

    def close(self) -> None: ...


def paquo_status() -> tuple[bool, str]:
    """Whether paquo is importable and finds a QuPath install, without starting the JVM; and why not."""
    try:
        import paquo  # noqa: F401
    except ImportError:
        return False, "paquo is not installed (pip install paquo)"
    try:
        from paquo._config import settings, to_kwargs
        from paquo.jpype_backend import find_qupath
    except ImportError as exc:  # paquo's layout changed: let the real import decide
        return True, f"cannot check for QuPath before starting paquo ({exc})"
    try:
        find_qupath(**to_kwargs(settings))
    except (ValueError, OSError) as exc:
        return False, (f"paquo finds no QuPath install ({exc}); set PAQUO_QUPATH_DIR or run "
                       "`python -m paquo get_qupath --install-path DIR 0.5.1`")
    return True, "paquo and a QuPath install were found"


def choose_backend(backend: str) -> str:
    """``"paquo"`` or ``"files"``: the backend to try first for ``backend`` (``"auto"``, ``"paquo"``, ``"files"``).

    ``"auto"`` gives paquo when paquo finds a QuPath install, else files; ``"paquo"`` without them raises a
    ``ProjectError`` that says why. A caller of ``"auto"`` falls back to files if paquo then fails.
    """
    if backend not in BACKENDS:
        raise ProjectError(f"unknown project backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "files":
        return "files"
    ok, why = paquo_status()
    if ok:
        return "paquo"
    if backend == "paquo":
        raise ProjectError(f"the paquo backend is not available: {why}")
    return "files"


def open_project(path: str | os.PathLike[str], backend: str = "auto") -> ProjectWriter:
    """Open or create the QuPath project at ``path`` (a folder or its ``project.qpproj``).

    ``backend``: ``"paquo"`` (needs paquo and a QuPath install; a ``ProjectError`` says why when they
    are missing), ``"files"`` (QuPath-free), or ``"auto"`` (paquo when available, else files).
    """
    if choose_backend(backend) == "paquo":
        from .project_paquo import PaquoProject

        if backend == "paquo":
            return PaquoProject(path)
        try:
            return PaquoProject(path)
        except ProjectError:
            pass  # auto: fall back to the QuPath-free writer
    return FilesProject(path)
