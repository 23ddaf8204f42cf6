"""The real-QuPath harness itself: it skips with a reason, and picks the Java each QuPath ships with."""

from __future__ import annotations

from pathlib import Path

import pytest

from qupath.harness import QuPath, QuPathUnavailable, find_runtime, required_java


def test_missing_qupath_folder_is_a_clear_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEUS_TEST_QUPATH_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(QuPathUnavailable, match=r"QuPath 0\.6\.0 not found: .*qupath-core-0\.6\.0\.jar is missing"):
        QuPath.prepare("0.6.0", tmp_path / "build")


def test_each_version_gets_the_java_it_ships_with() -> None:
    assert [required_java(v) for v in ("0.4.4", "0.5.1", "0.6.0", "0.7.0")] == [17, 17, 21, 21]


def test_runtime_prefers_the_exact_major_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    homes = {}
    for major in (25, 21):
        home = tmp_path / f"jdk-{major}"
        (home / "bin").mkdir(parents=True)
        (home / "bin" / "java").write_text("")
        (home / "release").write_text(f'JAVA_VERSION="{major}.0.1"\n')
        homes[major] = home
    monkeypatch.setattr("qupath.harness._java_homes", lambda minimum: [homes[25], homes[21]])
    assert find_runtime(21) == homes[21]  # not 25: java.awt.geom.Area changed in 22 (qupath#2140)
    monkeypatch.setattr("qupath.harness._java_homes", lambda minimum: [homes[25]])
    assert find_runtime(21) == homes[25]  # the nearest newer one when there is no 21
    monkeypatch.setattr("qupath.harness._java_homes", lambda minimum: [])
    with pytest.raises(QuPathUnavailable, match="no Java 21"):
        find_runtime(21)
