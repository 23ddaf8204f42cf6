"""The folders ``zeus serve`` may read: every slide, prompt, model config and weights file a request names must
resolve (real path, symlinks followed) inside one of them. Refusals are 400 (not a path), 403 (outside, or
``..``) and 404 (missing), each one line.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from zeus_qupath.errors import ZeusError
from zeus_qupath.samples import PROMPTS_DIR

from .service_schema import RequestError


def bundled_prompt_names() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.json"))


def bundled_prompts(name: str) -> Path | None:
    """The bundled prompt file called ``name`` (``spindle_cell`` or ``spindle_cell.json``), else None."""
    if "/" in name or "\\" in name:
        return None
    stem = name[:-5] if name.endswith(".json") else name
    path = PROMPTS_DIR / f"{stem}.json"
    return path if stem and path.is_file() else None


def looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith("~")


class Roots:
    """The allowed folders (real paths)."""

    def __init__(self, roots: tuple[str, ...] | list[str]) -> None:
        if not roots:
            raise ZeusError("no slide folders given: pass --root DIR for each folder whose slides QuPath may send")
        out = []
        for root in roots:
            real = Path(os.path.realpath(Path(root).expanduser()))
            if not real.is_dir():
                raise ZeusError(f"--root {root} is not a folder")
            out.append(real)
        self.folders: tuple[Path, ...] = tuple(dict.fromkeys(out))

    def check(self, value: str, what: str, *, kind: str = "file") -> Path:
        """The real path of ``value`` if it lies inside an allowed folder and exists as ``kind`` (file, dir, any)."""
        if not value.strip():
            raise RequestError(400, f"{what} must be a non-empty path")
        if "\x00" in value:
            raise RequestError(400, f"{what} path contains a NUL character")
        path = Path(value)
        if not path.is_absolute():
            raise RequestError(400, f"{what} must be an absolute path, got {value[:200]!r}")
        if ".." in path.parts:
            raise RequestError(403, f"{what} path must not contain '..': {value[:200]}")
        try:
            real = Path(os.path.realpath(path))
        except (OSError, ValueError):
            raise RequestError(400, f"{what} is not a usable path") from None
        if not any(real.is_relative_to(root) for root in self.folders):
            raise RequestError(403, f"{what} {value[:200]} is outside the folders this service may read "
                                    "(start zeus serve with --root FOLDER)")
        try:  # a name too long for the file system, a link loop: the request's fault, not the service's
            st = real.stat()
        except FileNotFoundError:
            raise RequestError(404, f"{what} not found: {value[:200]}") from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise RequestError(400, f"{what} is not a usable path ({reason}): {value[:200]}") from None
        if kind == "dir" and not stat.S_ISDIR(st.st_mode):
            raise RequestError(404, f"{what} is not a folder: {value[:200]}")
        if kind == "file" and not stat.S_ISREG(st.st_mode):
            raise RequestError(404, f"{what} is not a file: {value[:200]}")
        return real

    def prompts(self, value: str | None, default: Path) -> Path:
        """A request's prompt set: a bundled name, the default's name, or a file under the folders."""
        if value is None:
            return default
        name = value.strip()
        bundled = bundled_prompts(name)
        if bundled is not None:
            return bundled
        if not looks_like_path(name):
            if name in (default.name, default.stem):
                return default
            raise RequestError(404, f"no prompt set {name[:100]!r}: use one of {', '.join(bundled_prompt_names())}, "
                                    "or the path of a prompt file under the service's folders")
        return self.check(name, "prompt file")

    def model(self, spec: str) -> str:
        """A model spec whose files (an open_clip config or folder) must lie under the folders."""
        spec = spec.strip()
        if not spec:
            raise RequestError(400, "model must be a preset name or open_clip:NAME_OR_CONFIG_JSON")
        if spec.startswith("open_clip:"):
            rest = spec[len("open_clip:"):]
            if rest.startswith("local-dir:"):
                return "open_clip:local-dir:" + str(self.check(rest[len("local-dir:"):], "model folder", kind="dir"))
            if rest.endswith(".json") or looks_like_path(rest):
                return "open_clip:" + str(self.check(rest, "model config"))
        return spec

    def pretrained(self, value: str | None) -> str | None:
        """Weights named by a request: a tag as is, a file or folder only under the folders."""
        if value is None or not value.strip():
            return None
        value = value.strip()
        return str(self.check(value, "pretrained", kind="any")) if looks_like_path(value) else value
