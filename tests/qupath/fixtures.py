"""Pytest helpers for the real-QuPath harness: one prepared ``QuPath`` per version, or a skip with the reason.

With ``ZEUS_TEST_REQUIRE_QUPATH=1`` (``.ci/run`` sets it) a QuPath version, Java or Groovy that cannot be found
FAILS the test instead of skipping it, so CI cannot pass with the real-QuPath tests silently left out.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from .harness import QuPath, QuPathUnavailable

REQUIRE_ENV = "ZEUS_TEST_REQUIRE_QUPATH"


def qupath_required() -> bool:
    """Whether missing QuPath/Java/Groovy must fail the tests (``ZEUS_TEST_REQUIRE_QUPATH=1``)."""
    return os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip with ``reason``; fail instead under ``ZEUS_TEST_REQUIRE_QUPATH=1``."""
    if qupath_required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: real QuPath must run here)", pytrace=False)
    pytest.skip(reason)


def qupath_or_skip(version: str, tmp_path_factory: pytest.TempPathFactory, *,
                   java_home: Path | None = None) -> QuPath:
    """``QuPath.prepare`` for ``version``, compiled once per session into the session's temp folder."""
    try:
        return QuPath.prepare(version, tmp_path_factory.getbasetemp() / "qupath-build", java_home=java_home)
    except QuPathUnavailable as exc:
        skip_or_fail(f"QuPath {version}: {exc}")
        raise  # not reached


def only_boundary_differences(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label masks differ only on boundaries: at every pixel where they differ, each mask's value
    occurs within one pixel (3 x 3 window) in the other mask (Java2D's fill rule against ours, up to one pixel)."""
    for y, x in np.argwhere(a != b):
        win = (slice(max(y - 1, 0), y + 2), slice(max(x - 1, 0), x + 2))
        if b[y, x] not in a[win] or a[y, x] not in b[win]:
            return False
    return True
