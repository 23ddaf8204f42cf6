"""The ZEUS QuPath extension loads on QuPath 0.4.4 to 0.7.0: every QuPath member it uses is declared the same at
each release tag (a source-level scan, ``tests/qupath/api_scan.py``), and it implements every abstract method of the
QuPath interfaces it implements.

Only 0.4.4 was run in a window (tests/gui); 0.5.1, 0.6.0 and 0.7.0 are checked from their sources only: qupath-core
from the sources tarballs beside the jars, qupath-gui-fx and qupath-core-processing from the declarations stored in
``tests/data/qupath-api/declarations.json`` (extracted from the tags; blob IDs recorded).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qupath.api_scan import STORED, TAGS, Ref, TagSources, declared_methods, generate, references
from qupath.extension import build_extension
from qupath.fixtures import skip_or_fail
from qupath.harness import QuPathUnavailable, find_java, qupath_root

pytestmark = pytest.mark.jvm

EXTENSION_CLASS = "zeus.qupath.extension.ZeusExtension"


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    try:
        jar = build_extension(tmp_path_factory.mktemp("extension"))
        javap = find_java(17) / "bin" / "javap"
    except QuPathUnavailable as exc:
        skip_or_fail(str(exc))
    tags = {}
    for version in TAGS:
        if not (qupath_root() / version / f"qupath-core-{version}-sources.tar.gz").is_file():
            skip_or_fail(f"no qupath-core {version} sources under {qupath_root()}")
        tags[version] = TagSources(version, qupath_root())
    return {"jar": jar, "javap": javap, "refs": references(jar, javap), "tags": tags,
            "implemented": declared_methods(jar, javap, EXTENSION_CLASS)}


def test_every_qupath_member_the_extension_uses_is_the_same_in_each_tag(scan):
    refs = scan["refs"]
    # the scan reads the compiled calls: the menu, the preferences and QuPath's Groovy engine are among them
    names = {f"{r.owner.rsplit('.', 1)[-1]}.{r.name}" for r in refs}
    assert {"QuPathGUI.getMenu", "PathPrefs.createPersistentPreference", "ExecutableLanguage.execute",
            "GroovyLanguage.getInstance", "ScriptParameters$Builder.setArgs"} <= names
    assert any(not r.name and r.owner.endswith("QuPathExtension") for r in refs)
    problems = [f"{version}: {problem}" for version, tag in scan["tags"].items() for ref in refs
                if (problem := tag.check(ref, scan["implemented"]))]
    assert not problems, "\n".join(problems)


def test_the_scan_sees_members_that_changed(scan):
    """Not vacuous: members known to differ between the tags are reported (QuPath's own changes)."""
    tags = scan["tags"]
    lookup = Ref("qupath.lib.gui.QuPathGUI", "lookupMenuItem", ("String",), "MenuItem")  # 0.6 added String... parts
    assert tags["0.4.4"].check(lookup) is None and tags["0.5.1"].check(lookup) is None
    assert "lookupMenuItem(String, String[])" in tags["0.6.0"].check(lookup)
    viewer = Ref("qupath.lib.gui.QuPathGUI", "getViewer", (), "QuPathViewerPlus")  # 0.5 returns QuPathViewer
    assert tags["0.4.4"].check(viewer) is None
    assert "QuPathViewer getViewer()" in tags["0.5.1"].check(viewer)
    static = Ref("qupath.lib.gui.QuPathGUI", "getImageData", (), "ImageData", static=True)
    assert "not declared so" in tags["0.7.0"].check(static)
    extension = next(r for r in scan["refs"] if not r.name)
    lacking = {m for m in scan["implemented"] if m[0] != "getName"}
    assert "getName()" in tags["0.7.0"].check(extension, lacking)
    assert "qupath.lib.NoSuchClass not found" in tags["0.5.1"].check(Ref("qupath.lib.NoSuchClass", "x"))


@pytest.mark.skipif(not os.environ.get("ZEUS_QUPATH_GIT"), reason="set ZEUS_QUPATH_GIT to a clone of qupath/qupath "
                                                                    "(with its tags) to regenerate the declarations")
def test_stored_declarations_are_what_the_tags_hold(scan):
    """With a clone of github.com/qupath/qupath: the stored declarations are regenerated and compared."""
    import json

    fresh = generate(Path(os.environ["ZEUS_QUPATH_GIT"]), scan["jar"], scan["javap"], qupath_root())
    assert fresh == json.loads(STORED.read_text(encoding="utf-8"))
