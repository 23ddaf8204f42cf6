"""A segmentation run over one or more slides: load the model and prompts once, segment each slide,
write ``run.json`` (parameters, model, prompt hash, versions, per-slide timings and patch counts)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import __version__
from .atomic import atomic_open
from .errors import SlideError
from .models import load_encoder
from .prompts import class_prototypes, load_prompts
from .segment import SegmentParams, SlideReport, segment_slide

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".jpg", ".jpeg", ".png", ".bmp", ".qptiff")


@dataclass(frozen=True)
class RunConfig:
    slides: tuple[str, ...]
    prompts: str
    out_dir: str
    model: str = "quiltnet-b32"
    pretrained: str | None = None
    positive_class: str | None = None
    device: str = "auto"
    precision: str = "auto"
    params: SegmentParams = field(default_factory=SegmentParams)
    progress: bool = True


@dataclass
class RunReport:
    config: dict[str, Any]
    slides: list[SlideReport]
    path: str


def expand_slides(items: Sequence[str]) -> list[str]:
    """Slide files from files and folders (a folder contributes its slide files, sorted)."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.is_file() and f.name.lower().endswith(SLIDE_SUFFIXES)
                           and not f.name.startswith("."))
            if not found:
                raise SlideError(f"no slide files in folder {p}")
            out.extend(found)
        elif p.exists():
            out.append(str(p))
        else:
            raise SlideError(f"slide not found: {p}")
    return out


def versions() -> dict[str, str]:
    out = {"zeus-qupath": __version__, "python": platform.python_version()}
    for pkg in ("torch", "open_clip_torch", "tiffslide", "shapely", "rasterio", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _progress_factory(enabled: bool, name: str) -> tuple[Callable[[int, int], Callable[[int], None]], list[tqdm]]:
    bars: list[tqdm] = []

    def factory(total: int, _: int = 0) -> Callable[[int], None]:
        bar = tqdm(total=total, desc=name, unit="patch", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                   leave=True)
        bars.append(bar)
        return bar.update

    return factory, bars


def run_segment(config: RunConfig, on_slide: Callable[[SlideReport], None] | None = None) -> RunReport:
    """Segment every slide of ``config``; everything is validated before the first slide is read."""
    slides = expand_slides(config.slides)
    prompts = load_prompts(config.prompts, config.positive_class)
    encoder = load_encoder(config.model, config.pretrained, config.device, config.precision)
    prototypes = class_prototypes(encoder, prompts)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": config.model,
        "pretrained": Path(config.pretrained).name if config.pretrained else None,
        "embed_dim": encoder.embed_dim,
        "prompts": Path(config.prompts).name,
        "prompts_sha256": prompts.sha256,
        "threshold": str(config.params.threshold),
        "zeus_version": __version__,
    }
    run_info: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "segment",
        "model": {"spec": config.model, "pretrained": config.pretrained, "name": encoder.name,
                  "embed_dim": encoder.embed_dim, "logit_scale": encoder.logit_scale,
                  "input_size": encoder.preprocess.size, "device": str(encoder.device)},
        "prompts": {"file": config.prompts, "sha256": prompts.sha256, "classes": prompts.class_names,
                    "positive_class": prompts.positive_class,
                    "texts_per_class": {c.name: len(c.texts()) for c in prompts.classes}},
        "parameters": {**{k: v for k, v in vars(config.params).items() if k != "threshold"},
                       "threshold": str(config.params.threshold)},
        "versions": versions(),
    }
    reports: list[SlideReport] = []
    run_path = out / "run.json"
    try:
        for slide in slides:
            factory, bars = _progress_factory(config.progress, Path(slide).name)
            try:
                report = segment_slide(slide, encoder, prompts, prototypes, config.params, out, meta, factory)
            finally:
                for bar in bars:
                    bar.close()
            reports.append(report)
            if on_slide:
                on_slide(report)
    finally:
        run_info["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        run_info["slides"] = [r.to_dict() for r in reports]
        run_info["complete"] = len(reports) == len(slides)
        with atomic_open(run_path) as fh:
            json.dump(run_info, fh, indent=2, default=str)
    return RunReport(run_info, reports, str(run_path))
