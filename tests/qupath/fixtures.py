"""Pytest helpers for the real-QuPath harness: one prepared ``QuPath`` per version, or a skip with the reason."""

from __future__ import annotations

import pytest

from .harness import QuPath, QuPathUnavailable


def qupath_or_skip(version: str, tmp_path_factory: pytest.TempPathFactory) -> QuPath:
    """``QuPath.prepare`` for ``version``, compiled once per session into the session's temp folder."""
    try:
        return QuPath.prepare(version, tmp_path_factory.getbasetemp() / "qupath-build")
    except QuPathUnavailable as exc:
        pytest.skip(f"QuPath {version}: {exc}")
