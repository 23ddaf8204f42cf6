"""JSON from users' files, bounded: nesting depth, file size, and a one-line error for anything else.

Python's ``json`` module recurses once per nesting level, so a file of 100,000 ``[`` makes it raise
``RecursionError``, and a file a little under Python's recursion limit parses but makes the next
recursive step (shapely, our own readers) fail. :func:`parse_json` refuses both with the caller's
error class, and a key given twice in one object (``json`` keeps the last silently); :func:`max_depth`
measures a parsed value without recursing. :func:`read_json` is the one reader of users' JSON files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ZeusError

MAX_DEPTH = 64  # QuPath GeoJSON needs about 12 (GeometryCollections and derived classes a few more)
MAX_BYTES = 2_000_000_000


def max_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), counting only up to ``limit + 1``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return deepest


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_json(text: str | bytes, source: str, error: type[ZeusError] = ZeusError, limit: int = MAX_DEPTH) -> Any:
    """``json.loads(text)``, refusing invalid JSON and nesting deeper than ``limit`` with one ``error`` line."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise error(f"{source}: the key {exc.args[0]!r} appears twice in one object (one of them would be "
                    f"silently dropped)") from None
    except json.JSONDecodeError as exc:
        raise error(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise error(f"{source}: JSON nested too deeply (more than {limit} levels)") from None
    except (ValueError, TypeError) as exc:
        raise error(f"{source}: not valid JSON ({exc})") from None
    if max_depth(data, limit) > limit:
        raise error(f"{source}: JSON nested too deeply (more than {limit} levels)")
    return data


def read_json(path: str | os.PathLike[str], what: str, error: type[ZeusError] = ZeusError,
              limit: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> Any:
    """Read and parse a JSON file (UTF-8, a BOM allowed); one ``error`` line naming ``what`` and the file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise error(f"{what} {p.name} is {size / 1e9:.1f} GB, more than zeus reads ({max_bytes / 1e9:.0f} GB)")
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(f"{what} not found: {p}") from None
    except IsADirectoryError:
        raise error(f"{what} {p} is a folder, not a file") from None
    except UnicodeDecodeError:
        raise error(f"{what} {p.name} is not UTF-8 text") from None
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    return parse_json(text, p.name, error, limit)
