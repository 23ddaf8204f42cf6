"""Offline sample material: prompt sets, a synthetic slide generator and a tiny open_clip model.

- ``zeus_qupath.samples.synthetic``: H&E-like pyramidal TIFF slides with known tumor/tissue masks.
- ``zeus_qupath.samples.tiny_model``: a tiny open_clip model fitted on synthetic tiles, used to
  exercise the real open_clip code path offline (it is not a pathology model).
- ``prompts/*.json``: ZEUS prompt templates (see :func:`prompt_path`).
"""

from __future__ import annotations

from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


def prompt_path(name: str) -> Path:
    """Path of a bundled prompt file, e.g. ``prompt_path("spindle_cell")``."""
    path = PROMPTS_DIR / (name if name.endswith(".json") else f"{name}.json")
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.json")))
        raise FileNotFoundError(f"no bundled prompt set {name!r} (available: {available})")
    return path


__all__ = ["PROMPTS_DIR", "prompt_path"]
