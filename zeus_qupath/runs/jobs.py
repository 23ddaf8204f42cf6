"""What an executor is given and gives back: the run's settings, one job per slide, one outcome per slide."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ZeusError
from ..models.ensemble import RunModels, load_run_models
from ..models.specs import ModelSpec
from ..outputs import SlideReport
from ..params import SegmentParams
from ..reader import DEFAULT_BLOCK_CELLS
from .discovery import SlideEntry


@dataclass(frozen=True)
class RunSettings:
    """Everything a worker needs to segment slides exactly like the run that planned them (picklable)."""

    models: tuple[ModelSpec, ...]
    prompts: str
    positive_class: str | None
    out_dir: str
    params: SegmentParams
    device: str = "auto"
    precision: str = "auto"
    cache_dir: str | None = None  # None: no embedding cache
    prefetch: int = 2
    block_cells: int = DEFAULT_BLOCK_CELLS
    progress: bool = True
    screening_k: int | None = None  # KEEP's prompt screening: keep each model's top-k prompt classifiers per slide
    adapter: str | None = None  # zeus learn's adapter file (--adapter): its scores replace the zero-shot ones
    meta: dict[str, Any] = field(default_factory=dict)  # recorded in every scores file
    parameters: dict[str, Any] = field(default_factory=dict)  # recorded in every state file


def load_settings_models(settings: RunSettings) -> RunModels:
    """The models ``settings`` name, loaded on its device (see :func:`~zeus_qupath.models.ensemble.load_run_models`)."""
    models = load_run_models(settings.models, settings.prompts, settings.positive_class, settings.device,
                             settings.precision, settings.screening_k)
    if settings.adapter is not None:
        from ..adapter import Adapter, applied_identity
        from ..identity import effective_precision

        if len(models.encoders) != 1 or settings.screening_k is not None:
            raise ZeusError("--adapter applies to one model without --prompt-screening (it was learned that way)")
        adapter = Adapter.load(settings.adapter)
        adapter.check(applied_identity(models.identities[0], effective_precision(models.encoders[0]),
                                       settings.params, models.prompts), f"adapter {Path(settings.adapter).name}")
        models.score_options["adapter"] = adapter
    return models


@dataclass(frozen=True)
class SlideFailure:
    """A slide that could not be segmented, and why (one line)."""

    slide: str
    stem: str
    reason: str
    error_type: str
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SlideJob:
    """One slide to segment, its content fingerprint and the state hash its outputs will be recorded with."""

    entry: SlideEntry
    fingerprint: str
    state_hash: str


@dataclass
class Outcome:
    """A slide's result: a report, or a failure (and, in this process, the exception behind it)."""

    job: SlideJob
    report: SlideReport | None = None
    failure: SlideFailure | None = None
    error: BaseException | None = None


def reason(exc: BaseException) -> str:
    """One line for a failed slide (the ZeusError's message, else the exception's first line)."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return text if isinstance(exc, ZeusError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def failure_outcome(job: SlideJob, exc: BaseException, t0: float) -> Outcome:
    fail = SlideFailure(job.entry.path, job.entry.stem, reason(exc), type(exc).__name__,
                        round(time.perf_counter() - t0, 3))
    return Outcome(job, failure=fail, error=exc)
