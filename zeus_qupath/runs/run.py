"""A segmentation run over a cohort of slides: validate everything, skip what is done, segment the rest.

The models (one, or an ensemble: ``--model a,b``) and prompts are loaded and checked before the
first slide is read. Each slide's state hash covers every parameter that decides its outputs; a
slide whose state matches and whose outputs are intact is skipped (``status: skipped``), the others
run through an executor (:mod:`.local_executor`: this process, or :mod:`.ray_executor`: Ray tasks). ``run.json``
(parameters, models, prompt hash, versions, every slide's report, the failures) is rewritten
atomically after each slide, so it is current even if the run is killed.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .. import __version__
from ..errors import ZeusError
from ..identity import FingerprintMemo, file_fingerprint, stable_hash
from ..models.ensemble import RunModels
from ..models.specs import parse_model_specs
from ..output_set import remove_stale_temporaries, writable_dir
from ..outputs import RUN_JSON, RunRecord, SlideReport, read_run_record, write_run_record
from ..params import DEFAULT_MODEL, SegmentParams
from .discovery import SlideEntry, collect_slides
from .jobs import RunSettings, SlideFailure, SlideJob, load_settings_models
from .local_executor import run_local
from .ray_executor import run_ray
from .state import STATE_DIR, STATE_VERSION, SlideLocks, StateStore, report_from_state, run_record_lock
from .summary import format_summary

__all__ = ["RunConfig", "RunReport", "run_parameters", "run_segment", "versions"]

CACHE_DIR = ".cache"
FINGERPRINT_DIR = "fingerprints"  # slide fingerprints kept with their stat guards, in the cache (or .state)
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class RunConfig:
    slides: tuple[str, ...]
    prompts: str
    out_dir: str
    model: str = DEFAULT_MODEL  # one spec, or several joined by commas (an ensemble)
    pretrained: str | None = None  # one per model, comma-separated, when there are several
    positive_class: str | None = None
    device: str = "auto"
    precision: str = "auto"
    params: SegmentParams = field(default_factory=SegmentParams)
    progress: bool = True
    manifest: str | None = None  # CSV with columns slide[,mpp]
    cache_dir: str | None = None  # embedding cache (default: <out_dir>/.cache)
    use_cache: bool = True
    resume: bool = True  # skip slides done before with the same parameters
    skip_errors: bool = False  # continue past a broken slide (the run still reports it and fails)
    executor: str = "local"  # local or ray
    ray_address: str | None = None
    prefetch: int = 2  # decoded regions read ahead beyond one per worker
    screening_k: int | None = None  # --prompt-screening top-K (KEEP's), None: every prompt (ZEUS)
    random_weights: bool = False  # --random-weights: open_clip models without --pretrained, seeded (tests)
    adapter: str | None = None  # --adapter FILE: zeus learn's adapter scores the slides (checked before any slide)


@dataclass
class RunReport:
    config: dict[str, Any]  # what run.json holds
    slides: list[SlideReport]  # done and skipped slides, in cohort order
    path: str
    failures: list[SlideFailure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def done(self) -> list[SlideReport]:
        return [r for r in self.slides if r.status == "done"]

    @property
    def skipped(self) -> list[SlideReport]:
        return [r for r in self.slides if r.status == "skipped"]

    def summary(self) -> str:
        return format_summary(self.slides, self.failures, self.seconds)


def versions() -> dict[str, str]:
    out = {"zeus-qupath": __version__, "python": platform.python_version()}
    for pkg in ("torch", "open_clip_torch", "tiffslide", "shapely", "rasterio", "numpy", "ray"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def run_parameters(config: RunConfig, models: RunModels) -> dict[str, Any]:
    """Every parameter that decides a slide's outputs (hashed into its state; batch size and workers are not)."""
    p = config.params
    return {
        "state_version": STATE_VERSION,
        "models": [ident.to_dict() for ident in models.identities],
        "precision": config.precision,
        "prompts_sha256": models.prompts.sha256,
        "positive_class": models.prompts.positive_class,
        "prompt_screening": config.screening_k,
        **({"adapter": models.score_options["adapter"].sha256} if "adapter" in models.score_options else {}),
        "segment": {"patch_size": p.patch_size, "stride": p.stride, "target_mpp": p.target_mpp, "mpp": p.mpp,
                    "threshold": str(p.threshold), "min_area_um2": p.min_area_um2,
                    "min_hole_area_um2": p.min_hole_area_um2, "tolerance_px": p.tolerance_px,
                    "detect_tissue": p.detect_tissue, "tissue": p.tissue, "heatmap_tiles": p.heatmap_tiles,
                    **({"sampling": p.sampling} if p.sampling != "exact" else {})},  # exact runs keep their hash
    }


def _settings(config: RunConfig) -> RunSettings:
    if config.executor not in EXECUTORS:
        raise ZeusError(f"--executor must be one of {', '.join(EXECUTORS)}, got {config.executor!r}")
    cache = None
    if config.use_cache:
        cache = str(Path(config.cache_dir) if config.cache_dir else Path(config.out_dir) / CACHE_DIR)
    return RunSettings(models=parse_model_specs(config.model, config.pretrained, config.random_weights),
                       prompts=config.prompts,
                       positive_class=config.positive_class, out_dir=config.out_dir, params=config.params,
                       device=config.device, precision=config.precision, cache_dir=cache, prefetch=config.prefetch,
                       progress=config.progress, screening_k=config.screening_k, adapter=config.adapter)


def _previous_record(out: Path) -> RunRecord | None:
    """The folder's run.json as it is now (None when there is none or it cannot be read: it is replaced)."""
    try:
        return read_run_record(out)
    except ZeusError:
        return None


def _has_outputs(out: Path, report: SlideReport) -> bool:
    """Whether an earlier run's slide still has its polygons in ``out`` (else it is no longer listed)."""
    recorded = report.outputs.get("geojson") or f"{report.stem}.geojson"
    return (out / Path(str(recorded).replace("\\", "/")).name).is_file()


def ran_in(encoder: Any) -> dict[str, Any]:
    """The precision a loaded model computes in: its weights' dtypes and the autocast dtype on its device.

    ``computes`` is what the matrix products ran in: the autocast dtype where autocast is on (CUDA with
    --precision auto/bf16/fp16), else the weights' dtype (fp32 on the CPU). Embeddings are stored as fp32.
    """
    from ..models.base import autocast_dtype

    weights = sorted({str(p.dtype).removeprefix("torch.") for p in encoder.model.parameters()})
    autocast = autocast_dtype(encoder.device, encoder.precision)
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
    computes = short.get(str(autocast).removeprefix("torch."), str(autocast)) if autocast is not None else \
        "+".join(short.get(w, w) for w in weights)
    return {"requested": encoder.precision, "device": str(encoder.device),
            "weights": [short.get(w, w) for w in weights],
            "autocast": None if autocast is None else short.get(str(autocast).removeprefix("torch.")),
            "computes": computes}


def _model_info(spec: str, pretrained: str | None, encoder: Any, ident: Any) -> dict[str, Any]:
    return {"spec": spec, "pretrained": pretrained, "name": encoder.name, "embed_dim": encoder.embed_dim,
            "logit_scale": encoder.logit_scale, "input_size": encoder.preprocess.size,
            "device": str(encoder.device), "precision": ran_in(encoder), "weights_sample_sha256": ident.weights}


def run_segment(config: RunConfig, on_slide: Callable[[SlideReport], None] | None = None) -> RunReport:
    """Segment every slide of ``config``; everything is validated before the first slide is read."""
    t_start = time.perf_counter()
    entries = collect_slides(config.slides, config.manifest)
    if config.prefetch < 0:
        raise ZeusError(f"--prefetch must be 0 or more, got {config.prefetch}")
    settings = _settings(config)
    out = writable_dir(config.out_dir, "--out")  # before any model is loaded: fail in a second, not a minute
    if settings.cache_dir is not None:
        writable_dir(settings.cache_dir, "--cache")
    # Ray workers load their own models; here they are loaded on the CPU only to validate and identify them
    if config.adapter is not None:  # a damaged adapter file fails here, before any model is loaded
        from ..adapter import Adapter

        Adapter.load(config.adapter)
    models = load_settings_models(replace(settings, device="cpu") if config.executor == "ray" else settings)
    parameters = run_parameters(config, models)
    run_hash = stable_hash(parameters)
    prompts = models.prompts
    meta = {
        "model": config.model,
        "pretrained": ",".join(Path(m.pretrained).name if m.pretrained else "" for m in settings.models)
        if any(m.pretrained for m in settings.models) else None,
        "embed_dim": models.encoders[0].embed_dim,
        "prompts": Path(config.prompts).name,
        "prompts_sha256": prompts.sha256,
        "threshold": str(config.params.threshold),
        "zeus_version": __version__,
    }
    settings = replace(settings, meta=meta, parameters=parameters)
    out.mkdir(parents=True, exist_ok=True)
    store = StateStore(out)
    locks = SlideLocks(out)
    memo = FingerprintMemo(Path(settings.cache_dir) / FINGERPRINT_DIR if settings.cache_dir
                           else out / STATE_DIR / FINGERPRINT_DIR)
    reports: dict[str, SlideReport] = {}

    def plan(entry: SlideEntry) -> SlideJob | None:
        """The slide's job, or None when it was done before with the same parameters (it is skipped)."""
        fingerprint = file_fingerprint(entry.path, memo)
        store.check_owner(entry.stem, entry.path, fingerprint)  # a taken stem is refused, never overwritten
        state_hash = stable_hash({"run": run_hash, "slide": fingerprint, "mpp": entry.mpp})
        record = store.completed(entry.stem, state_hash) if config.resume else None
        if record is not None:
            reports[entry.stem] = report_from_state(record, out)
            store.clean_partial(entry.stem)
            return None
        return SlideJob(entry, fingerprint, state_hash)

    jobs: list[SlideJob] = []
    busy: list[SlideEntry] = []  # another zeus run into this folder is working on them
    try:
        for entry in entries:
            if not locks.try_acquire(entry.stem):
                busy.append(entry)
                continue
            job = plan(entry)
            if job is None:
                locks.release(entry.stem)
            else:
                jobs.append(job)
    except BaseException:
        locks.release_all()
        raise

    model_infos = [_model_info(m.spec, m.pretrained, e, i)
                   for m, e, i in zip(settings.models, models.encoders, models.identities, strict=True)]
    if config.executor == "ray":  # loaded here on the CPU only to check them; each Ray worker runs on its own device
        for info in model_infos:
            info["precision"] = {"requested": config.precision, "device": "each Ray worker's",
                                 "computes": "fp32 on a CPU worker; on a CUDA worker as --precision decides there"}
    record = RunRecord(
        started=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        command="segment",
        model={**model_infos[0], "spec": config.model, "pretrained": config.pretrained},
        models=model_infos,
        prompts={"file": config.prompts, "sha256": prompts.sha256, "classes": prompts.class_names,
                 "positive_class": prompts.positive_class,
                 "texts_per_class": {c.name: len(c.texts()) for c in prompts.classes}},
        parameters={**{k: v for k, v in vars(config.params).items() if k != "threshold"},
                    "threshold": str(config.params.threshold), "precision": config.precision,
                    "prompt_screening": config.screening_k},
        parameters_sha256=run_hash,
        executor=config.executor,
        cache=settings.cache_dir,
        versions=versions(),
        sampling=config.params.sampling,
        adapter=models.score_options["adapter"].summary() if "adapter" in models.score_options else None,
        run_id=uuid.uuid4().hex,
    )
    failures: list[SlideFailure] = []
    stems = {e.stem for e in entries}
    run_path = out / RUN_JSON
    remove_stale_temporaries(run_path)  # what a killed run left while rewriting run.json

    def write_run_json(final: bool) -> None:
        ordered = [reports[e.stem] for e in entries if e.stem in reports]
        record.slides = ordered
        record.failed = [f.to_dict() for f in failures]
        record.summary = {"slides": len(entries), "done": sum(r.status == "done" for r in ordered),
                          "skipped": sum(r.status == "skipped" for r in ordered), "failed": len(failures)}
        record.complete = len(ordered) == len(entries)
        if final:
            record.finished = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            record.seconds = round(time.perf_counter() - t_start, 3)
        with run_record_lock(out):  # read, merged and written by one run at a time
            record.carry_earlier(_previous_record(out), stems, lambda r: _has_outputs(out, r))
            write_run_record(out, record)

    bar = tqdm(total=len(entries), initial=len(reports), desc="slides", unit="slide", disable=not config.progress,
               file=sys.stderr, dynamic_ncols=True, position=0)

    def execute(batch: list[SlideJob]) -> None:
        outcomes = run_local(batch, settings, models) if config.executor == "local" else \
            run_ray(batch, settings, config.ray_address)
        try:
            for outcome in outcomes:
                locks.release(outcome.job.entry.stem)  # its outputs and state are final: other runs may go on
                bar.update(1)
                if outcome.report is not None:
                    reports[outcome.job.entry.stem] = outcome.report
                    if on_slide:
                        on_slide(outcome.report)
                else:
                    assert outcome.failure is not None
                    failures.append(outcome.failure)
                    if not config.skip_errors:
                        if outcome.error is not None:
                            raise outcome.error
                        raise ZeusError(f"{Path(outcome.failure.slide).name}: {outcome.failure.reason}")
                write_run_json(final=False)
        finally:
            outcomes.close()

    try:
        execute(jobs)
        for entry in busy:  # wait for the other run, then take over whatever it did not finish
            print(f"zeus: {entry.stem}: another zeus run is segmenting it into {out}; waiting for it",
                  file=sys.stderr)
            locks.acquire(entry.stem)
            job = plan(entry)
            if job is None:
                locks.release(entry.stem)
                bar.update(1)
            else:
                execute([job])
    finally:
        locks.release_all()
        bar.close()
        write_run_json(final=True)
    ordered = [reports[e.stem] for e in entries if e.stem in reports]
    return RunReport(record.to_dict(), ordered, str(run_path), failures, time.perf_counter() - t_start)
