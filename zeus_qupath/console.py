"""What a ``zeus`` command shows on stderr: one line per error, zeus's own warnings, nothing else.

Third-party libraries are noisy when an input is bad: a truncated slide makes zarr's event loop log
"Task was destroyed but it is pending!", print "Exception ignored in ..." tracebacks and warn about
coroutines never awaited, some of it while the interpreter shuts down. :func:`configure_console`
routes log records of ``zeus_qupath`` loggers at WARNING and above to stderr as ``zeus: warning: ...``
and drops everything else (other libraries' records, unraisable exceptions, Python warnings), unless
``debug`` is set, when everything is shown with tracebacks. It is meant for the ``zeus`` process,
which owns its stderr, and may be called again (the last call wins).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings

_HANDLER_NAME = "zeus-console"


class _ZeusOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "zeus_qupath" or record.name.startswith("zeus_qupath.")


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        lines = record.getMessage().strip().splitlines() or [""]
        return f"zeus: {record.levelname.lower()}: {lines[0]}"


def _ignore_unraisable(_unraisable: object) -> None:  # e.g. a library's coroutine destroyed at exit
    return None


def configure_console(debug: bool) -> None:
    """Set up logging, warnings and the unraisable-exception hook of this process for ``zeus``."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    if debug:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.setLevel(logging.DEBUG if os.environ.get("ZEUS_LOG_DEBUG") else logging.INFO)
        sys.unraisablehook = sys.__unraisablehook__
        warnings.resetwarnings()
    else:
        handler.addFilter(_ZeusOnly())
        handler.setFormatter(_OneLine())
        handler.setLevel(logging.WARNING)
        root.setLevel(logging.WARNING)
        sys.unraisablehook = _ignore_unraisable
        warnings.simplefilter("ignore")
    # a handler on the root logger keeps logging.basicConfig (which libraries call) from adding its own;
    # one a library added already (a plain stderr StreamHandler) goes
    for other in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(other)
    root.addHandler(handler)


def os_error_line(exc: OSError) -> str:
    """One line for an operating-system error: what failed, on which file, and why."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif exc.errno == errno.EROFS:
        reason = "read-only file system"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    names = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    where = f" ({' -> '.join(names)})" if names else ""
    return f"{reason}{where}"
