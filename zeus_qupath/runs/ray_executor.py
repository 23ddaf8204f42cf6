"""Segment a run's slides as Ray tasks: one slide per task (one GPU each when the cluster has GPUs, else one CPU).

Each task runs the local pipeline on its slide and writes the same outputs, cache entries and state files
(the output folder must be shared by the workers). Ray is optional (``pip install ray``); a local Ray
instance listens on the loopback interface only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import ZeusError
from .jobs import Outcome, RunSettings, SlideFailure, SlideJob, failure_outcome, load_settings_models, reason
from .local_executor import run_local


def _ray_segment(settings: RunSettings, job: SlideJob) -> Outcome:
    """A Ray task: load the models, segment one slide with the local pipeline, return its outcome."""
    from dataclasses import replace

    settings = replace(settings, progress=False)
    t0 = time.perf_counter()
    try:
        models = load_settings_models(settings)
        outcome = next(iter(run_local([job], settings, models)))
    except Exception as exc:
        outcome = failure_outcome(job, exc, t0)
    outcome.error = None  # exceptions stay in the worker; the failure's reason travels
    return outcome


def _init_ray(address: str | None) -> tuple[Any, bool]:
    """Connect to ``address`` or start a local instance on the loopback interface; (ray, started)."""
    if address is None:
        # Ray picks a routable address unless told this is a single-machine instance
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise ZeusError("--executor ray needs Ray: pip install 'zeus-qupath[ray]' (or pip install ray)") from None
    if ray.is_initialized():
        return ray, False
    ray_log = logging.getLogger("ray")
    level = ray_log.level
    ray_log.setLevel(logging.ERROR)  # Ray's start-up notices are not the user's business
    # the environment switch above is read when Ray is imported; if it was imported earlier, set its value
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    cluster_switch = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if address is None and cluster_switch:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        if address is None:
            ray.init(num_cpus=min(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as exc:
        raise ZeusError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {reason(exc)}") from exc
    finally:
        ray_log.setLevel(level)
        if address is None and cluster_switch:
            constants.ENABLE_RAY_CLUSTER = cluster_switch
    return ray, True


def run_ray(jobs: Sequence[SlideJob], settings: RunSettings, address: str | None = None) -> Iterator[Outcome]:
    """Segment ``jobs`` as Ray tasks (one GPU each when the cluster has GPUs); outcomes as they complete."""
    if not jobs:
        return
    ray, started = _init_ray(address)
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0)) > 0
        task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=0)(_ray_segment)
        refs = {task.remote(settings, job): job for job in jobs}
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                job = refs.pop(ready[0])
                try:
                    yield ray.get(ready[0])
                except Exception as exc:  # the worker died (e.g. out of memory): the slide failed
                    yield Outcome(job, failure=SlideFailure(job.entry.path, job.entry.stem, reason(exc),
                                                            type(exc).__name__))
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()
