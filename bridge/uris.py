"""Slide paths as QuPath stores them: ``file:`` URIs written the way ``java.io.File.toURI()`` does.

The compute machine and the annotators' desktops usually see the same files under different
names (``/data/slides`` on the GPU server, ``Z:\\slides`` or ``\\\\server\\share`` on Windows).
A URI map rewrites a path by its first matching prefix before it becomes a URI:

- POSIX ``/data/slides/a b.svs``      -> ``file:/data/slides/a%20b.svs``
- Windows drive ``Z:\\slides\\a.svs``   -> ``file:/Z:/slides/a.svs`` (as in QuPath's own projects)
- UNC ``\\\\server\\share\\a.svs``        -> ``file:////server/share/a.svs`` (what ``File.toURI()`` gives)

Characters are quoted like ``java.net.URI``'s multi-argument constructors: everything outside
``A-Z a-z 0-9 - _ . ! ~ * ' ( ) : @ & = + $ , ; /`` is percent-encoded (UTF-8, upper-case hex).
``ascii=True`` also encodes non-ASCII letters, as ``URI.toASCIIString()`` does (QuPath's JSON
writer uses it for image URIs); ``ascii=False`` keeps them, as ``URI.toString()`` does.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

from zeus_qupath.errors import ProjectError

_SAFE_ASCII = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.!~*'():@&=+$,;/")
_WIN_DRIVE = re.compile(r"^[A-Za-z]:([\\/]|$)")
_UNC = re.compile(r"^(\\\\|//)[^\\/]")

UriMap = Sequence[tuple[str, str]]


def parse_uri_map(items: Iterable[str]) -> list[tuple[str, str]]:
    """Parse ``SRC=DST`` strings (e.g. ``/data/slides=Z:\\slides``) into ``(src, dst)`` pairs."""
    out: list[tuple[str, str]] = []
    for item in items:
        src, sep, dst = item.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise ProjectError(f"URI map entry {item!r} must look like SRC=DST, e.g. /data/slides=Z:\\slides")
        out.append((src.strip(), dst.strip()))
    return out


def path_style(path: str) -> str:
    """``"windows"`` (drive letter), ``"unc"`` (\\\\server\\share or //server/share) or ``"posix"``."""
    if _WIN_DRIVE.match(path):
        return "windows"
    if _UNC.match(path):
        return "unc"
    return "posix"


def _slashes(path: str) -> str:
    return path.replace("\\", "/") if path_style(path) != "posix" else path


def _strip_trailing(path: str) -> str:
    p = _slashes(path)
    while len(p) > 1 and p.endswith("/") and not re.fullmatch(r"[A-Za-z]:/", p):
        p = p[:-1]
    return p


def _absolute(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    if path_style(p) != "posix":
        return p  # a Windows path named on a POSIX machine: already absolute
    return os.path.abspath(p)


def _match_prefix(path: str, src: str) -> str | None:
    """The remainder of ``path`` after ``src`` (``""`` or starting with ``/``), or ``None``."""
    p = _slashes(path)
    windows = path_style(src) != "posix"
    s = _strip_trailing(src) if windows else os.path.abspath(src)
    cp, cs = (p.lower(), s.lower()) if windows else (p, s)
    if cp == cs:
        return ""
    if cs.endswith("/") and cp.startswith(cs):
        return "/" + p[len(s):]
    if cp.startswith(cs + "/"):
        return p[len(s):]
    return None


def map_path(path: str | os.PathLike[str], uri_map: UriMap = ()) -> str:
    """Rewrite ``path`` by the first ``(src, dst)`` pair whose ``src`` is a prefix of it (whole components).

    The rest of the path is appended to ``dst`` with ``dst``'s separators. Unmatched paths come back absolute.
    """
    local = _absolute(path)
    candidates = [local]
    if path_style(local) == "posix":
        resolved = os.path.realpath(local)
        if resolved != local:
            candidates.append(resolved)
    for src, dst in uri_map:
        for candidate in candidates:
            rest = _match_prefix(candidate, src)
            if rest is None:
                continue
            if path_style(dst) == "posix":
                base = dst.rstrip("/")
                return (base + rest) if base else (rest or "/")
            base = dst.replace("/", "\\").rstrip("\\")
            if rest:
                return base + rest.replace("/", "\\")
            return base + "\\" if re.fullmatch(r"[A-Za-z]:", base) else base
    return local


def _quote(text: str, ascii_only: bool) -> str:
    if ascii_only:
        text = unicodedata.normalize("NFC", text)  # toASCIIString() normalises before encoding
    out: list[str] = []
    for ch in text:
        if ch in _SAFE_ASCII:
            keep = True
        elif ord(ch) < 128 or ascii_only:
            keep = False
        else:  # non-ASCII in toString(): kept unless it is a space or control character
            keep = not (ch.isspace() or unicodedata.category(ch).startswith("C"))
        out.append(ch if keep else "".join(f"%{b:02X}" for b in ch.encode("utf-8")))
    return "".join(out)


def file_uri(path: str, *, ascii: bool = True) -> str:
    """The ``file:`` URI that ``new File(path).toURI()`` gives for an absolute ``path`` (no mapping)."""
    style = path_style(path)
    if style == "posix" and not path.startswith("/"):
        raise ProjectError(f"cannot make a file URI of the relative path {path!r}")
    sp = path if style == "posix" else path.replace("\\", "/")
    # java.io.File normalises the path: repeated separators collapse, a trailing one goes
    head = "//" if style == "unc" else ""
    sp = head + re.sub("/+", "/", sp[len(head):])
    if len(sp) > 1 and sp.endswith("/") and not re.fullmatch(r"[A-Za-z]:/", sp):
        sp = sp[:-1]
    if style == "windows":
        sp = "/" + sp
    if sp.startswith("//"):
        sp = "//" + sp  # File.toURI() writes UNC paths with four slashes
    return "file:" + _quote(sp, ascii)


def path_to_file_uri(path: str | os.PathLike[str], uri_map: UriMap = (), *, ascii: bool = True) -> str:
    """Map ``path`` with ``uri_map`` (first matching prefix) and return its QuPath ``file:`` URI."""
    return file_uri(map_path(path, uri_map), ascii=ascii)


def file_uri_to_path(uri: str) -> str:
    """The path a ``file:`` URI names (``file:/Z:/a.svs`` -> ``Z:\\a.svs``, ``file:////h/s/a`` -> ``\\\\h\\s\\a``)."""
    if not uri.startswith("file:"):
        raise ProjectError(f"not a file URI: {uri!r}")
    rest = unquote(uri[len("file:"):])
    if rest.startswith("////"):
        return "\\\\" + rest[4:].replace("/", "\\")
    if rest.startswith("//") and not rest.startswith("///"):  # file://host/share/... (java.nio form)
        return "\\\\" + rest[2:].replace("/", "\\")
    rest = "/" + rest.lstrip("/")
    if re.match(r"^/[A-Za-z]:(/|$)", rest):
        return rest[1:].replace("/", "\\")
    return rest


def same_file_uri(a: str, b: str) -> bool:
    """Whether two file URIs name the same file (percent-encoding and, for Windows paths, case ignored)."""
    try:
        pa, pb = file_uri_to_path(a), file_uri_to_path(b)
    except ProjectError:
        return a == b
    pa, pb = unicodedata.normalize("NFC", pa), unicodedata.normalize("NFC", pb)
    if path_style(pa) != "posix" or path_style(pb) != "posix":
        return pa.lower() == pb.lower()
    return pa == pb
