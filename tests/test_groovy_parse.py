"""The Groovy scripts: parsed by a real Groovy parser, headers present, one keep-edits rule block.

Needs the ``groovy`` command (Debian package ``groovy``, Groovy 2.4) and a JDK; skipped without them (failed under
``ZEUS_TEST_REQUIRE_QUPATH=1``, as ``.ci/run`` sets it).
Groovy 2.4 parses without QuPath's jars (phase CONVERSION resolves no classes), which catches syntax
errors. The rule block is run on real QuPath objects, and compared with ``bridge/edits.py``, in
``tests/test_qupath_rule.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from zeus_qupath.bridge.edits import (
    BACKUP_INFIX,
    FLOAT32_REL_TOL,
    IMPORTED,
    OVERLAP_TOL_PX2,
    RECORD_FILE,
    RECORD_FORMAT,
    REPLACED,
)

from qupath.fixtures import skip_or_fail

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
        skip_or_fail("the `groovy` command is not installed (Debian: apt-get install -y groovy)")
    home = _java_home()
    if home is None:
        skip_or_fail("no Java runtime found for groovy (install a JDK or set JAVA_HOME)")
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


@pytest.mark.jvm
def test_every_script_parses_with_groovy(tmp_path: Path) -> None:
    parser = tmp_path / "parse_scripts.groovy"
    parser.write_text(PARSER, encoding="utf-8")
    result = _run_groovy(parser, *map(str, SCRIPTS))
    assert result.returncode == 0, result.stdout + result.stderr
    for script in SCRIPTS:
        assert f"PARSED {script}" in result.stdout


@pytest.mark.jvm
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
    assert "QuPath 0.4, 0.5, 0.6 and 0.7" in header
    assert "Parameters" in header
    # every parameter named in the header is defined in the script
    for name in re.findall(r"^ \*   ([A-Z][A-Z_]+)\b", header, re.M):
        assert re.search(rf"^\S.*\b{name} = ", text, re.M), f"{name} is documented but not defined"


def test_rule_block_is_shared_and_its_constants_are_pythons() -> None:
    """Every script that carries the rule block carries the import script's, byte for byte."""
    reference = RULE_BLOCK.search((GROOVY_DIR / "import_zeus_annotations.groovy").read_text(encoding="utf-8"))
    assert reference, "import_zeus_annotations.groovy has no keep-edits rule block"
    block = reference.group(0)
    for script in SCRIPTS:
        match = RULE_BLOCK.search(script.read_text(encoding="utf-8"))
        if match:
            assert match.group(0) == block, f"{script.name} carries another version of the keep-edits rule"
    rel = re.search(r"double FLOAT32_REL_TOL = (\S+)", block)
    overlap = re.search(r"double OVERLAP_TOL_PX2 = (\S+)", block)
    assert rel and float(rel.group(1)) == FLOAT32_REL_TOL
    assert overlap and float(overlap.group(1)) == OVERLAP_TOL_PX2
    for name, value in (("RECORD_FILE", RECORD_FILE), ("RECORD_FORMAT", RECORD_FORMAT), ("IMPORTED", IMPORTED),
                        ("REPLACED", REPLACED), ("BACKUP_INFIX", BACKUP_INFIX)):
        assert f"String {name} = '{value}'" in block
    # the agreement of the two rules on real QuPath objects: tests/test_qupath_rule.py


# docs/GROOVY.md: what compiles on Debian's Groovy 2.4 but behaves differently (or fails) in QuPath's Groovy 4
GROOVY4_CHANGED = {
    r"\bnew\s+Date\s*\(\s*\)\s*\.\s*format\b|\bDate\s*\.\s*parse\b|\.format\s*\(\s*['\"][yMdHhms]":
        "Date/Calendar extension methods (groovy-dateutil in Groovy 2.5+)",
    r"\bgroovy\.util\.(XmlSlurper|XmlParser|AntBuilder|CliBuilder|GroovyTestCase)\b|\b(XmlSlurper|XmlParser|AntBuilder|"
    r"CliBuilder)\b": "classes moved out of groovy.util (Groovy 3) and removed there (Groovy 4)",
    r"@Grab\b": "@Grab (no Grape/Ivy in QuPath)",
    r"^\s*(abstract\s+|final\s+)?class\s+\w+": "a class declared in a script (closure access changed in Groovy 3)",
}


def _code(text: str) -> str:
    """The script without comments and string literals (so their words are not taken for code)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"'''.*?'''|\"\"\".*?\"\"\"", "''", text, flags=re.S)
    text = re.sub(r"'(\\.|[^'\\\n])*'|\"(\\.|[^\"\\\n])*\"", "''", text)
    return re.sub(r"//[^\n]*", "", text)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_avoid_what_groovy_4_changed(script: Path) -> None:
    code = _code(script.read_text(encoding="utf-8"))
    found = [f"{why}: {m.group(0).strip()!r}" for pattern, why in GROOVY4_CHANGED.items()
             for m in re.finditer(pattern, code, re.M)]
    assert found == [], found


def test_the_groovy_4_scan_finds_what_it_looks_for() -> None:
    bad = "import groovy.util.XmlSlurper\n@Grab('x:y:1')\nclass Foo {}\ndef d = new Date().format('yyyy')\n"
    ok = "// new Date().format('yyyy') in a comment\ndef s = 'class Foo and XmlSlurper in a string'\n"
    assert len([p for p in GROOVY4_CHANGED if re.search(p, _code(bad), re.M)]) == len(GROOVY4_CHANGED)
    assert not any(re.search(p, _code(ok), re.M) for p in GROOVY4_CHANGED)
