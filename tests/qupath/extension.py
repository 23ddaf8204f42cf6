"""The ZEUS QuPath extension in the tests: its jar, built by ``bridge/extension/build.sh`` (javac + jar)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from qupath.harness import REPO, QuPathUnavailable, find_java, qupath_root

BUILD_SCRIPT = REPO / "bridge" / "extension" / "build.sh"
GUI_DIR_NAME = "gui-0.4.4"
JAVAFX = Path("/usr/share/java/javafx-controls.jar")  # Debian's JavaFX 11 (libopenjfx-java)


def gui_dir() -> Path:
    """QuPath 0.4.4's desktop GUI built for the tests (``<qupath root>/gui-0.4.4``), or QuPathUnavailable."""
    path = qupath_root() / GUI_DIR_NAME
    if not (path / "run-gui.sh").is_file():
        raise QuPathUnavailable(f"no QuPath 0.4.4 GUI at {path} (../shared/qupath/gui-0.4.4)")
    if not JAVAFX.is_file():
        raise QuPathUnavailable(f"no JavaFX at {JAVAFX} (Debian: apt-get install libopenjfx-java libopenjfx-jni; "
                                f"all the GUI needs: {path / 'apt-packages.txt'})")
    return path


def build_extension(out: Path) -> Path:
    """Build the extension jar into ``out`` (compiled against QuPath 0.4.4's GUI jars); its path."""
    jdk = find_java(17)
    env = {**os.environ, "JAVA_HOME": str(jdk), "QUPATH_GUI_DIR": str(gui_dir())}
    env.pop("QUPATH_APP_DIR", None)
    jar = out / "zeus-qupath-extension.jar"
    result = subprocess.run(["bash", str(BUILD_SCRIPT), str(jar)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"build.sh failed:\n{result.stdout}{result.stderr}")
    return jar
