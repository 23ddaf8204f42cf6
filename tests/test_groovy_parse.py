"""The Groovy scripts: parsed by a real Groovy parser, headers present, keep-edits rule equal to Python's.

Needs the ``groovy`` command (Debian package ``groovy``, Groovy 2.4) and a JDK; skipped without them.
Groovy 2.4 parses without QuPath's jars (phase CONVERSION resolves no classes), which catches syntax
errors; the keep-edits rule block needs no QuPath class, so it is also *run* here on stand-in objects
and must agree with ``bridge/edits.py`` case by case.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from shapely.affinity import translate
from shapely.geometry import Polygon

from zeus_qupath.bridge.edits import AREA_ABS_TOL_PX2, AREA_REL_TOL, CENTROID_TOL_PX, is_untouched_zeus
from zeus_qupath.bridge.qupath_geojson import QuPathObject
from zeus_qupath.geojson import (
    MEAS_AREA_PX,
    MEAS_CENTROID_X,
    MEAS_CENTROID_Y,
    MEAS_VERTICES,
    ZEUS_NAME_PREFIX,
    vertex_count,
)

GROOVY_DIR = Path(__file__).resolve().parents[1] / "groovy"
SCRIPTS = sorted(GROOVY_DIR.glob("*.groovy"))
RULE_BLOCK = re.compile(r"// >>> ZEUS keep-edits rule.*?// <<< ZEUS keep-edits rule", re.S)

PARSER = """
import org.codehaus.groovy.control.CompilationUnit
import org.codehaus.groovy.control.Phases
int failed = 0
for (String path : args) {
    try {
        def unit = new CompilationUnit()
        unit.addSource(new File(path))
        unit.compile(Phases.CONVERSION)
        println "PARSED " + path
    } catch (Throwable e) {
        failed++
        println "FAILED " + path + ": " + e.getMessage()
    }
}
System.exit(failed == 0 ? 0 : 1)
"""


def _java_home() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return home
    java = shutil.which("java")
    if java is None:
        return None
    return str(Path(os.path.realpath(java)).parents[1])  # <jdk>/bin/java -> <jdk>


def _groovy_env() -> dict[str, str]:
    if shutil.which("groovy") is None:
        pytest.skip("the `groovy` command is not installed (Debian: apt-get install -y groovy)")
    home = _java_home()
    if home is None:
        pytest.skip("no Java runtime found for groovy (install a JDK or set JAVA_HOME)")
    return {**os.environ, "JAVA_HOME": home}


def _run_groovy(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["groovy", str(script), *args], capture_output=True, text=True, env=_groovy_env())


def test_scripts_exist() -> None:
    names = {p.name for p in SCRIPTS}
    assert names == {
        "import_zeus_annotations.groovy",
        "zeus_segment_current_image.groovy",
        "export_training_data.groovy",
    }


def test_every_script_parses_with_groovy(tmp_path: Path) -> None:
    parser = tmp_path / "parse_scripts.groovy"
    parser.write_text(PARSER, encoding="utf-8")
    result = _run_groovy(parser, *map(str, SCRIPTS))
    assert result.returncode == 0, result.stdout + result.stderr
    for script in SCRIPTS:
        assert f"PARSED {script}" in result.stdout


def test_parser_rejects_a_broken_script(tmp_path: Path) -> None:
    # guards the test above against a parser that accepts anything
    parser = tmp_path / "parse_scripts.groovy"
    parser.write_text(PARSER, encoding="utf-8")
    broken = tmp_path / "broken.groovy"
    broken.write_text("def x = [1, 2\nprintln(x\n", encoding="utf-8")
    result = _run_groovy(parser, str(broken))
    assert result.returncode == 1
    assert f"FAILED {broken}" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_header_names_versions_and_parameters(script: Path) -> None:
    text = script.read_text(encoding="utf-8")
    header = text[: text.index("*/")]
    assert header.lstrip().startswith("/*")
    assert script.name in header
    assert "QuPath 0.4, 0.5 and 0.6" in header
    assert "Parameters" in header
    # every parameter named in the header is defined in the script
    for name in re.findall(r"^ \*   ([A-Z][A-Z_]+)\b", header, re.M):
        assert re.search(rf"^\S.*\b{name} = ", text, re.M), f"{name} is documented but not defined"


def test_rule_block_is_the_same_in_both_scripts_and_matches_python() -> None:
    blocks = {}
    for name in ("import_zeus_annotations.groovy", "zeus_segment_current_image.groovy"):
        match = RULE_BLOCK.search((GROOVY_DIR / name).read_text(encoding="utf-8"))
        assert match, f"{name} has no keep-edits rule block"
        blocks[name] = match.group(0)
    assert len(set(blocks.values())) == 1
    block = next(iter(blocks.values()))
    assert f"def ZEUS_NAME_PREFIX = '{ZEUS_NAME_PREFIX}'" in block
    assert f"def MEAS_AREA_PX = '{MEAS_AREA_PX}'" in block
    assert f"def MEAS_VERTICES = '{MEAS_VERTICES}'" in block
    assert f"def MEAS_CENTROID_X = '{MEAS_CENTROID_X}'" in block
    assert f"def MEAS_CENTROID_Y = '{MEAS_CENTROID_Y}'" in block
    rel = re.search(r"double AREA_REL_TOL = (\S+)", block)
    absolute = re.search(r"double AREA_ABS_TOL_PX2 = (\S+)", block)
    centroid = re.search(r"double CENTROID_TOL_PX = (\S+)", block)
    assert rel and float(rel.group(1)) == AREA_REL_TOL
    assert absolute and float(absolute.group(1)) == AREA_ABS_TOL_PX2
    assert centroid and float(centroid.group(1)) == CENTROID_TOL_PX


def _groovy_literal(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}L"
    if isinstance(value, float):
        return f"{value!r}d"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, dict):
        return "[" + (", ".join(f"{_groovy_literal(k)}: {_groovy_literal(v)}" for k, v in value.items()) or ":") + "]"
    raise TypeError(value)


def _rule_cases() -> list[tuple[str, QuPathObject]]:
    square = Polygon([(0, 0), (100, 0), (100, 100), (0, 100)])
    ring = Polygon([(0, 0), (300, 0), (300, 300), (0, 300)], [[(100, 100), (200, 100), (200, 200), (100, 200)]])

    def zeus(geom, written=None, *, name="ZEUS Tumor", cls="Tumor", drop=(), object_type="annotation",
             centroid=True):
        base = written if written is not None else geom
        meas = {MEAS_AREA_PX: float(base.area), MEAS_VERTICES: float(vertex_count(base)), "Mean tumor score": 0.3}
        if centroid:
            meas[MEAS_CENTROID_X], meas[MEAS_CENTROID_Y] = float(base.centroid.x), float(base.centroid.y)
        for key in (drop,) if isinstance(drop, str) else drop:
            meas.pop(key)
        return QuPathObject(geometry=geom, object_type=object_type, class_name=cls, name=name, measurements=meas)

    moved = Polygon([(0, 0), (100, 0), (130, 120), (0, 100)])
    extra_vertex = Polygon([(0, 0), (50, 0), (100, 0), (100, 100), (0, 100)])
    nearly = Polygon([(0, 0), (100, 0), (100, 100.0004), (0, 100)])  # +0.02 px^2: float noise
    shifted = translate(square, 25, 0)  # same area, same vertex count, centroid 25 px away
    nudged = translate(square, 0.3, 0)  # within the 0.5 px centroid tolerance
    ring_hole_moved = Polygon(ring.exterior, [[(150, 150), (250, 150), (250, 250), (150, 250)]])
    return [
        ("untouched", zeus(square)),
        ("untouched with hole", zeus(ring)),
        ("area within tolerance", zeus(nearly, written=square)),
        ("moved vertex", zeus(moved, written=square)),
        ("vertex added, same area", zeus(extra_vertex, written=square)),
        ("class changed", zeus(square, cls="Stroma")),
        ("class removed", zeus(square, cls=None)),
        ("renamed", zeus(square, name="my tumor")),
        ("area measurement deleted", zeus(square, drop=MEAS_AREA_PX)),
        ("vertex measurement deleted", zeus(square, drop=MEAS_VERTICES)),
        ("annotator drawn", QuPathObject(geometry=square, class_name="Tumor")),
        ("detection with marker", zeus(square, object_type="detection")),
        ("derived class", zeus(square, name="ZEUS Tumor: Positive", cls="Tumor: Positive")),
        ("moved as a whole", zeus(shifted, written=square)),
        ("nudged 0.3 px", zeus(nudged, written=square)),
        ("moved, written before centroids", zeus(shifted, written=square, centroid=False)),
        ("centroid x deleted", zeus(square, drop=MEAS_CENTROID_X)),
        ("centroid y deleted", zeus(square, drop=MEAS_CENTROID_Y)),
        ("ring moved as a whole", zeus(translate(ring, 0, -40), written=ring)),
        ("hole moved inside", zeus(ring_hole_moved, written=ring)),
    ]


def test_groovy_rule_agrees_with_python(tmp_path: Path) -> None:
    text = (GROOVY_DIR / "import_zeus_annotations.groovy").read_text(encoding="utf-8")
    block = RULE_BLOCK.search(text).group(0)
    lines = [
        block,
        "def fake = { boolean annotation, String name, String cls, Map meas, double area, long points,",
        "             double cx, double cy ->",
        "    def ml = new Expando(containsKey: { k -> meas.containsKey(k) },",
        "                         get: { k -> meas.containsKey(k) ? ((Number) meas[k]).doubleValue() : Double.NaN })",
        "    def centroid = new Expando(getX: { -> cx }, getY: { -> cy }, isEmpty: { -> false })",
        "    def geometry = new Expando(getNumPoints: { -> points }, getCentroid: { -> centroid })",
        "    def roi = new Expando(getArea: { -> area }, getGeometry: { -> geometry })",
        "    def pathClass = cls == null ? null : new Expando(toString: { -> cls })",
        "    return new Expando(isAnnotation: { -> annotation }, getName: { -> name }, getPathClass: { -> pathClass },",
        "                       getMeasurementList: { -> ml }, getROI: { -> roi })",
        "}",
    ]
    cases = _rule_cases()
    for label, obj in cases:
        args = ", ".join(
            _groovy_literal(v)
            for v in (obj.object_type == "annotation", obj.name, obj.class_name, obj.measurements,
                      float(obj.geometry.area), vertex_count(obj.geometry),
                      float(obj.geometry.centroid.x), float(obj.geometry.centroid.y))
        )
        lines.append(f"println {_groovy_literal(label)} + '=' + isUntouchedZeus(fake({args}))")
    harness = tmp_path / "rule_harness.groovy"
    harness.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = _run_groovy(harness)
    assert result.returncode == 0, result.stdout + result.stderr
    groovy = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    python = {label: str(is_untouched_zeus(obj)).lower() for label, obj in cases}
    assert groovy == python
    assert python["untouched"] == "true" and python["moved vertex"] == "false"
    assert python["moved as a whole"] == "false" and python["nudged 0.3 px"] == "true"
    assert python["moved, written before centroids"] == "true"  # the old rule cannot see a shift
    assert python["hole moved inside"] == "false" and python["ring moved as a whole"] == "false"
