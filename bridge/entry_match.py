"""Which entry of a QuPath project is a given slide: the rules both project writers follow.

An entry is found by what identifies its image, in this order (the first rule with a match wins):

1. its URI names the slide's file (as ZEUS writes it: mapped for the annotators, or the local path);
2. ZEUS's own entry metadata: ``zeus.slide`` (the slide path ZEUS read) or ``zeus.uri`` (the URI
   ZEUS wrote) names the slide. This finds an entry whose URI QuPath rewrote after the annotator
   relocated the image (QuPath keeps the entry's metadata);
3. its original name: the entry's image name, or the file name of its URI, is the slide's file
   name, the entry's image size (when it records one) is the slide's, and nothing says it is
   another image (``zeus.slide`` or a URI naming another file that exists here). This finds
   entries written before ZEUS recorded ``zeus.slide``, and entries of slides that were moved on
   the machine that runs ZEUS. Two such entries are ambiguous:
   ``ProjectError`` (one line), never a guess.

An entry already matched to another slide in the same run is never matched again.

Entry IDs: QuPath keeps each image's data in ``data/<entryID>/``. A new entry's ID is above every
ID in use, whether written as a number or a string (``"1"``), above the project's ``lastID`` and
above every numbered folder already in ``data/``, so a new image never shares a data folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from zeus_qupath.errors import ProjectError

from .uris import file_uri_to_path, path_style, same_file_uri

META_SLIDE = "zeus.slide"  # the slide path ZEUS read (on the machine that ran zeus)
META_URI = "zeus.uri"  # the URI ZEUS wrote for the annotators


@dataclass(frozen=True)
class EntryInfo:
    """What identifies one existing entry (read from ``project.qpproj`` or through paquo)."""

    key: str  # the entry's ID as a string
    uri: str | None
    image_name: str | None
    metadata: dict[str, str]
    width: int | None = None  # level-0 px, when the entry records its image size
    height: int | None = None


@dataclass(frozen=True)
class SlideKey:
    """What identifies the slide being published."""

    path: str  # absolute slide path, as ZEUS read it
    uris: tuple[str, ...]  # the URIs ZEUS would write for it (mapped first)
    name: str  # the image name (file name unless given)
    width: int
    height: int


def _uri_name(uri: str | None) -> str | None:
    if not uri:
        return None
    try:
        path = file_uri_to_path(uri)
    except ProjectError:
        return None
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or None


def _names_another_existing_file(uri: str | None, slide: SlideKey) -> bool:
    """The entry's URI names a file on this machine that is not the slide."""
    if not uri:
        return False
    try:
        path = file_uri_to_path(uri)
    except ProjectError:
        return False
    if path_style(path) != "posix" or not os.path.exists(path):
        return False
    try:
        return not os.path.samefile(path, slide.path)
    except OSError:
        return True


def _same_path(a: str, b: str) -> bool:
    if a == b:
        return True
    if path_style(a) != "posix" or path_style(b) != "posix":
        return a.replace("\\", "/").lower() == b.replace("\\", "/").lower()
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normpath(a) == os.path.normpath(b)


def match_entry(entries: Sequence[EntryInfo], slide: SlideKey, claimed: Iterable[str] = ()) -> EntryInfo | None:
    """The entry that is ``slide`` by the module's rules, or ``None`` when the slide is new.

    ``claimed``: keys of entries already matched to other slides in this run. Raises
    ``ProjectError`` when two entries match by name alone.
    """
    taken = set(claimed)
    free = [e for e in entries if e.key not in taken]

    by_uri = [e for e in free if e.uri and any(same_file_uri(e.uri, u) for u in slide.uris)]
    if by_uri:
        return by_uri[0]

    def zeus_names_slide(e: EntryInfo) -> bool:
        recorded = e.metadata.get(META_SLIDE)
        if recorded and _same_path(recorded, slide.path):
            return True
        uri = e.metadata.get(META_URI)
        return bool(uri) and any(same_file_uri(uri, u) for u in slide.uris)

    by_meta = [e for e in free if zeus_names_slide(e)]
    if by_meta:
        return by_meta[0]

    def same_name(e: EntryInfo) -> bool:
        if slide.name not in (e.image_name, _uri_name(e.uri)):
            return False
        recorded = e.metadata.get(META_SLIDE)
        if recorded and path_style(recorded) == "posix" and os.path.exists(recorded):
            return False  # ZEUS recorded another slide that is still here (rule 2 failed)
        if e.width is not None and e.height is not None and (e.width, e.height) != (slide.width, slide.height):
            return False
        return not _names_another_existing_file(e.uri, slide)

    by_name = [e for e in free if same_name(e)]
    if len(by_name) > 1:
        ids = ", ".join(e.key for e in by_name)
        raise ProjectError(
            f"{slide.path}: entries {ids} of the project could all be this slide (same name and size, no ZEUS "
            f"record of their slide); rename or remove all but one in QuPath, then run again")
    return by_name[0] if by_name else None


def _as_id(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def next_entry_id(entry_ids: Iterable[object], last_id: object, data_dir: str | os.PathLike[str] | None) -> int:
    """An entry ID above every ID in use (numbers or numeric strings), ``lastID`` and ``data/<n>`` folders."""
    used = [i for i in (_as_id(v) for v in entry_ids) if i is not None]
    last = _as_id(last_id)
    if last is not None:
        used.append(last)
    if data_dir is not None and Path(data_dir).is_dir():
        used.extend(i for i in (_as_id(p.name) for p in Path(data_dir).iterdir() if p.is_dir()) if i is not None)
    return max([0, *used]) + 1
