"""Prompt sets and class prototypes, as ZEUS builds them.

File format: the ZEUS template JSON, accepted as is:
``{"0": {"classnames": {"normal": [...], "tumor": [...]}, "templates": ["... CLASSNAME ...", ...]}}``.
Extensions: several top-level groups (their names and templates are merged per class), templates given
per class (``"templates": {"tumor": [...], ...}``), and ``"positive_class"`` inside a group or at top level.

Prototype of a class: every (class name x template) text is encoded and L2-normalised; the prototype
is their mean, L2-normalised again.

Bundled sets (``samples/prompts/``, see its README): ``zeus_spindle_cell`` is ZEUS's published prompt
file, unchanged (the default); the others were written for this project.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import PromptError

if TYPE_CHECKING:
    from .models.base import Encoder  # for annotations only: importing it imports torch

PLACEHOLDER = "CLASSNAME"
DEFAULT_PROMPT_SET = "zeus_spindle_cell"  # ZEUS's published prompt file (cvblab/ZEUS, MIT)
POSITIVE_GUESSES = ("tumor", "tumour", "cancer", "neoplasm", "malignant", "carcinoma")


@dataclass(frozen=True)
class PromptClass:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    def texts(self) -> list[str]:
        """Every (template x class name) text, template-major."""
        return [t.replace(PLACEHOLDER, c) for t in self.templates for c in self.classnames]


@dataclass(frozen=True)
class PromptSet:
    classes: tuple[PromptClass, ...]
    positive_class: str
    source: str
    sha256: str

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)


def _str_list(value: object, what: str, source: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise PromptError(f"{source}: {what} must be a list of non-empty strings")
    return [v.strip() for v in value]


def parse_prompts(data: object, source: str, positive_class: str | None = None) -> PromptSet:
    """Validate and normalise a parsed prompt file."""
    if not isinstance(data, dict) or not data:
        raise PromptError(f"{source}: expected a JSON object of prompt groups like {{\"0\": {{...}}}}")
    file_positive = data.get("positive_class")
    groups = [v for k, v in data.items() if k != "positive_class"]
    if "classnames" in data:  # a single group without the "0" wrapper
        groups = [data]
    names: dict[str, list[str]] = {}
    templates: dict[str, list[str]] = {}
    for group in groups:
        if not isinstance(group, dict) or "classnames" not in group:
            raise PromptError(f"{source}: each prompt group needs \"classnames\" and \"templates\"")
        file_positive = group.get("positive_class", file_positive)
        classnames = group["classnames"]
        if not isinstance(classnames, dict) or not classnames:
            raise PromptError(f"{source}: \"classnames\" must map each class to its names")
        group_templates = group.get("templates")
        if group_templates is None or group_templates == [] or group_templates == {}:
            raise PromptError(f"{source}: no templates given")
        for cls, cls_names in classnames.items():
            names.setdefault(cls, []).extend(_str_list(cls_names, f"class names of {cls!r}", source))
            if isinstance(group_templates, dict):
                if cls not in group_templates:
                    raise PromptError(f"{source}: no templates for class {cls!r}")
                tmpl = _str_list(group_templates[cls], f"templates of {cls!r}", source)
            else:
                tmpl = _str_list(group_templates, "templates", source)
            templates.setdefault(cls, []).extend(tmpl)
    for cls, tmpl in templates.items():
        missing = [t for t in tmpl if PLACEHOLDER not in t]
        if missing:
            raise PromptError(f"{source}: template without {PLACEHOLDER} for class {cls!r}: {missing[0]!r}")
    folded: dict[str, str] = {}
    for cls in names:  # QuPath shows tumor and Tumor as one class (and export gives them one label)
        if cls.casefold() in folded:
            raise PromptError(f"{source}: classes {folded[cls.casefold()]!r} and {cls!r} differ only in case; "
                              f"QuPath would show them as one class: merge or rename them")
        folded[cls.casefold()] = cls
    if len(names) < 2:
        raise PromptError(f"{source}: need at least two classes, found {len(names)} ({', '.join(names) or 'none'})")
    classes = tuple(
        PromptClass(cls, tuple(dict.fromkeys(names[cls])), tuple(dict.fromkeys(templates[cls]))) for cls in names
    )
    positive = positive_class or file_positive
    if positive is not None and not isinstance(positive, str):
        raise PromptError(f"{source}: positive_class must be one class name (a string), "
                          f"got {json.dumps(positive)[:80]}")
    if positive is None:
        guesses = [c for c in names if c.lower() in POSITIVE_GUESSES]
        if len(guesses) != 1:
            raise PromptError(f"{source}: name the positive class with \"positive_class\" or --positive-class")
        positive = guesses[0]
    if positive not in names:
        raise PromptError(f"{source}: positive class {positive!r} is not one of {', '.join(names)}")
    canonical = json.dumps(
        {"classes": [[c.name, c.classnames, c.templates] for c in classes], "positive": positive}, sort_keys=True
    )
    return PromptSet(classes, positive, source, hashlib.sha256(canonical.encode()).hexdigest())


def load_prompts(path: str | os.PathLike[str], positive_class: str | None = None) -> PromptSet:
    """Read and validate a prompt file; a one-line PromptError on any problem."""
    from .json_input import read_json

    p = Path(path)
    data = read_json(p, "prompt file", PromptError)  # bounded nesting, duplicate keys refused: one line each
    return parse_prompts(data, p.name, positive_class)


def bundled_prompt_dir() -> Path:
    from .samples import PROMPTS_DIR

    return PROMPTS_DIR


def bundled_prompt_names() -> list[str]:
    """Names of the bundled prompt sets (file stems in ``samples/prompts``)."""
    return sorted(p.stem for p in bundled_prompt_dir().glob("*.json"))


def prompt_file(value: str | os.PathLike[str] | None) -> Path:
    """The prompt file for ``--prompts``: a file, or a bundled set's name; None is ZEUS's own set (the default)."""
    if value is None:
        value = DEFAULT_PROMPT_SET
    path = Path(value).expanduser()
    if path.is_file():
        return path
    name = str(value)
    stem = name[:-5] if name.endswith(".json") else name
    bundled = bundled_prompt_dir() / f"{stem}.json"
    if stem and "/" not in stem and "\\" not in stem and bundled.is_file():
        return bundled
    raise PromptError(f"prompt file not found: {value} (bundled sets: {', '.join(bundled_prompt_names())})")


def class_prototypes(encoder: Encoder, prompts: PromptSet, texts: dict[str, list[str]] | None = None) -> np.ndarray:
    """(C, D) unit prototypes: mean of each class's unit text embeddings, normalised again.

    ``texts`` overrides the texts of some classes (e.g. after prompt screening).
    """
    protos = []
    for cls in prompts.classes:
        cls_texts = (texts or {}).get(cls.name) or cls.texts()
        emb = encoder.encode_texts(cls_texts)
        mean = emb.mean(axis=0)
        protos.append(mean / np.linalg.norm(mean))
    return np.stack(protos).astype(np.float32)
