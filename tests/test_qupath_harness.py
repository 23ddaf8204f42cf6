"""The real-QuPath harness itself: it skips with a reason, and picks the Java each QuPath ships with."""

from __future__ import annotations

from pathlib import Path

import pytest

from qupath.fixtures import qupath_or_skip
from qupath.harness import QuPath, QuPathUnavailable, find_runtime, required_java


def test_missing_qupath_folder_is_a_clear_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEUS_TEST_QUPATH_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(QuPathUnavailable, match=r"QuPath 0\.6\.0 not found: .*qupath-core-0\.6\.0\.jar is missing"):
        QuPath.prepare("0.6.0", tmp_path / "build")


def test_missing_qupath_skips_or_fails_under_the_ci_switch(tmp_path_factory: pytest.TempPathFactory,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEUS_TEST_QUPATH_DIR", str(tmp_path_factory.mktemp("nowhere")))
    monkeypatch.delenv("ZEUS_TEST_REQUIRE_QUPATH", raising=False)
    with pytest.raises(pytest.skip.Exception, match="QuPath 0.7.0 not found"):
        qupath_or_skip("0.7.0", tmp_path_factory)
    monkeypatch.setenv("ZEUS_TEST_REQUIRE_QUPATH", "1")
    with pytest.raises(pytest.fail.Exception, match="ZEUS_TEST_REQUIRE_QUPATH=1"):
        qupath_or_skip("0.7.0", tmp_path_factory)


def test_each_version_gets_the_java_it_ships_with() -> None:
    assert [required_java(v) for v in ("0.4.4", "0.5.1", "0.6.0", "0.7.0")] == [17, 17, 21, 25]


def _fake_homes(tmp_path: Path, versions: list[str]) -> dict[str, Path]:
    homes = {}
    for full in versions:
        home = tmp_path / f"jdk-{full}"
        (home / "bin").mkdir(parents=True)
        (home / "bin" / "java").write_text("")
        (home / "release").write_text(f'JAVA_VERSION="{full}"\n')
        homes[full] = home
    return homes


def test_runtime_prefers_the_exact_major_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    homes = _fake_homes(tmp_path, ["25.0.1", "21.0.1"])
    no_bug = lambda home, root: False  # noqa: E731
    monkeypatch.setattr("qupath.harness._java_homes", lambda minimum: [homes["25.0.1"], homes["21.0.1"]])
    assert find_runtime(21, tmp_path, area_bug=no_bug) == homes["21.0.1"]  # QuPath 0.6 ships Java 21
    monkeypatch.setattr("qupath.harness._java_homes", lambda minimum: [homes["25.0.1"]])
    assert find_runtime(21, tmp_path, area_bug=no_bug) == homes["25.0.1"]  # the nearest newer one when there is no 21
    monkeypatch.setattr("qupath.harness._java_homes", lambda minimum: [])
    with pytest.raises(QuPathUnavailable, match="no Java 21"):
        find_runtime(21, tmp_path, area_bug=no_bug)


def test_runtime_with_the_area_bug_is_never_picked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    homes = _fake_homes(tmp_path, ["25.0.3", "25.0.2", "26.0.1"])
    bug = lambda home, root: home.name in ("jdk-25.0.3", "jdk-26.0.1")  # noqa: E731
    monkeypatch.setattr("qupath.harness._java_homes", lambda minimum: list(homes.values()))
    assert find_runtime(25, tmp_path, area_bug=bug) == homes["25.0.2"]
    monkeypatch.setattr("qupath.harness._java_homes", lambda minimum: [homes["25.0.3"], homes["26.0.1"]])
    with pytest.raises(QuPathUnavailable, match=r"without the java.awt.geom.Area bug.*25\.0\.3.*install_java"):
        find_runtime(25, tmp_path, area_bug=bug)
