"""User-facing errors: each carries one line that the CLI prints instead of a traceback."""


class ZeusError(Exception):
    """An error caused by the user's input or environment; its message is shown as is."""


class SlideError(ZeusError):
    """The slide cannot be opened or read, or lacks a needed property (e.g. pixel size)."""


class PromptError(ZeusError):
    """The prompt file is missing, malformed, or incomplete."""


class ModelError(ZeusError):
    """The model is unknown, its code is not installed, or its weights cannot be found."""


class GeoJSONError(ZeusError):
    """A GeoJSON file is malformed or holds no usable geometry."""


class ProjectError(ZeusError):
    """A QuPath project cannot be read or written."""


def one_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of ``text``, at most ``limit`` characters: what a user-facing error shows."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."
