"""The QuPath-free project writer and slide URIs, checked against a real QuPath 0.6 project file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from shapely.geometry import Polygon

from zeus_qupath.bridge.project import open_project, paquo_status
from zeus_qupath.bridge.project_files import (
    BIOFORMATS,
    IMPORT_SCRIPT,
    ZEUS_GEOJSON,
    FilesProject,
    estimate_downsample,
    packed_argb,
    server_metadata,
)
from zeus_qupath.bridge.uris import (
    file_uri,
    file_uri_to_path,
    map_path,
    parse_uri_map,
    path_to_file_uri,
    same_file_uri,
)
from zeus_qupath.errors import ProjectError
from zeus_qupath.qupath_geojson import QuPathObject, annotation_feature, read_qupath_geojson

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT / "tests" / "data"
REAL_PROJECT = TESTDATA / "qupath-project-0.6"
SLIDE = TESTDATA / "wsi" / "CMU-1-Small-Region.svs"

needs_real_project = pytest.mark.skipif(
    not (REAL_PROJECT / "project.qpproj").is_file(),
    reason=f"the real QuPath 0.6 project is not at {REAL_PROJECT} (tests/data)",
)


def features(*classes: str) -> list[dict[str, Any]]:
    shapes = [Polygon([(100, 100), (900, 100), (900, 700), (100, 700)]),
              Polygon([(1000, 1000), (1500, 1000), (1200, 1600)])]
    return [annotation_feature(QuPathObject(shapes[i % 2], class_name=cls, measurements={"Mean tumor score": 0.3}))
            for i, cls in enumerate(classes)]


def structure(value: Any) -> Any:
    """Keys and value types of a JSON value (lists by their first element), for key-by-key comparison."""
    if isinstance(value, dict):
        return {k: structure(v) for k, v in value.items()}
    if isinstance(value, list):
        return [structure(value[0])] if value else []
    return type(value).__name__


# ------------------------------------------------------------------------------------------- URIs


def test_parse_uri_map() -> None:
    assert parse_uri_map(["/data/slides=Z:\\slides", "/mnt/wsi=//server/share"]) == [
        ("/data/slides", "Z:\\slides"), ("/mnt/wsi", "//server/share")]
    with pytest.raises(ProjectError, match="SRC=DST"):
        parse_uri_map(["/data/slides"])


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/data/slides/a.svs", "file:/Z:/slides/a.svs"),
        ("/data/slides/sub dir/a b.svs", "file:/Z:/slides/sub%20dir/a%20b.svs"),
        ("/data/slides/ŞUBAT/x.svs", "file:/Z:/slides/%C5%9EUBAT/x.svs"),
        ("/mnt/wsi/case 1/a.ndpi", "file:////server/share/case%201/a.ndpi"),
        ("/data/slides2/a.svs", "file:/data/slides2/a.svs"),  # whole components only
        ("/srv/x/c#1[2]%.tif", "file:/srv/x/c%231%5B2%5D%25.tif"),
        ("/srv/x/a,b;c=d&e+f$g@h!i~j'k(l)m*n.svs", "file:/srv/x/a,b;c=d&e+f$g@h!i~j'k(l)m*n.svs"),
    ],
)
def test_path_to_file_uri(path: str, expected: str) -> None:
    uri_map = [("/data/slides", "Z:\\slides"), ("/mnt/wsi/", "//server/share")]
    assert path_to_file_uri(path, uri_map) == expected


def test_mapping_to_a_posix_destination_and_the_first_match_wins() -> None:
    uri_map = [("/data", "/Volumes/lab"), ("/data/slides", "Z:\\slides")]
    assert map_path("/data/slides/a.svs", uri_map) == "/Volumes/lab/slides/a.svs"
    assert path_to_file_uri("/data/slides/a.svs", uri_map) == "file:/Volumes/lab/slides/a.svs"
    assert map_path("/data/slides/a.svs", [("/data/slides", "Z:\\")]) == "Z:\\a.svs"


def test_relative_path_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert path_to_file_uri("a.svs") == file_uri(str(tmp_path / "a.svs"))


def test_to_string_form_keeps_non_ascii() -> None:
    assert path_to_file_uri("/x/ü ñ.svs", ascii=False) == "file:/x/ü%20ñ.svs"


def test_uri_back_to_path_and_comparison() -> None:
    assert file_uri_to_path("file:/Z:/slides/a%20b.svs") == "Z:\\slides\\a b.svs"
    assert file_uri_to_path("file:////server/share/a.svs") == "\\\\server\\share\\a.svs"
    assert file_uri_to_path("file://server/share/a.svs") == "\\\\server\\share\\a.svs"
    assert file_uri_to_path("file:///data/a.svs") == "/data/a.svs"
    assert same_file_uri("file:/Z:/Slides/A.svs", "file:/z:/slides/a.svs")
    assert same_file_uri("file:/data/%C5%9E.svs", "file:/data/Ş.svs")
    assert not same_file_uri("file:/data/A.svs", "file:/data/a.svs")


@needs_real_project
def test_every_uri_of_the_real_project_round_trips() -> None:
    data = json.loads((REAL_PROJECT / "project.qpproj").read_text(encoding="utf-8"))
    uris = [e["serverBuilder"]["uri"] for e in data["images"]]
    assert len(uris) == 107 and any("%C5%9E" in u for u in uris)
    for uri in uris:
        path = file_uri_to_path(uri)
        assert path.startswith("E:\\")
        assert file_uri(path) == uri


def test_quoting_matches_java_file_to_uri(tmp_path: Path) -> None:
    java = shutil.which("java")
    if java is None:
        pytest.skip("no `java` to compare with java.io.File.toURI()")
    source = tmp_path / "ToUri.java"
    source.write_text(
        "public class ToUri { public static void main(String[] a) throws Exception {\n"
        "  for (String p : a) { String s = p.replace('\\\\', '/'); if (!s.startsWith(\"/\")) s = \"/\" + s;\n"
        "    if (s.startsWith(\"//\")) s = \"//\" + s;  // as java.io.File.toURI() does after slashify\n"
        "    java.net.URI u = new java.net.URI(\"file\", null, s, null);\n"
        "    System.out.println(u.toASCIIString() + \"\\t\" + u.toString()); } } }\n",
        encoding="utf-8",
    )
    paths = ["/data/a b.svs", "Z:\\slides\\ŞUBAT\\x y.svs", "\\\\server\\share\\c#1%[2].svs",
             "/srv/a,b;c=d&e+f$g@h!i~j'k(l)m*n^`{|}\"<>.svs", "/x/é ü.tif"]
    env = {**os.environ, "LC_ALL": "C.UTF-8", "JAVA_TOOL_OPTIONS": "-Dfile.encoding=UTF-8 -Dsun.jnu.encoding=UTF-8"}
    result = subprocess.run([java, str(source), *paths], capture_output=True, env=env)
    if result.returncode != 0:
        pytest.skip(f"cannot run a Java source file here: {result.stderr.decode(errors='replace')[-300:]}")
    lines = result.stdout.decode("utf-8").splitlines()
    assert len(lines) == len(paths)
    for path, line in zip(paths, lines, strict=True):
        ascii_form, plain_form = line.split("\t")
        assert file_uri(path) == ascii_form
        assert file_uri(path, ascii=False) == plain_form


# ------------------------------------------------------------------------------------------- metadata


@needs_real_project
def test_server_metadata_is_what_qupath_wrote_for_all_107_images() -> None:
    data = json.loads((REAL_PROJECT / "project.qpproj").read_text(encoding="utf-8"))
    for entry in data["images"]:
        real = entry["serverBuilder"]["metadata"]
        levels = [(lv["width"], lv["height"]) for lv in real["levels"]]
        ours = server_metadata(
            real["name"], real["width"], real["height"], levels,
            mpp=real["pixelCalibration"]["pixelWidth"]["value"],
            magnification=real["magnification"],
            tile_size=(real["preferredTileWidth"], real["preferredTileHeight"]),
        )
        assert ours == real, entry["imageName"]
        assert list(ours) == list(real)  # same key order too


def test_estimate_downsample_rules() -> None:
    assert estimate_downsample(114183, 75006, 28545, 18751) == 4.0
    assert estimate_downsample(114183, 75006, 1920, 1261) == pytest.approx(59.47583824841396, abs=0)
    assert estimate_downsample(1000, 1000, 333, 333) == 3.0


def test_metadata_without_pixel_size_and_bad_levels() -> None:
    meta = server_metadata("a.png", 200, 100, [(200, 100)], mpp=None)
    assert meta["pixelCalibration"]["pixelWidth"] == {"value": 1.0, "unit": "px"}
    assert "magnification" not in meta
    assert meta["levels"] == [{"downsample": 1.0, "width": 200, "height": 100}]
    with pytest.raises(ProjectError, match="level 0"):
        server_metadata("a.png", 200, 100, [(100, 50)], mpp=0.5)


def test_packed_argb_matches_qupath_classes() -> None:
    assert packed_argb((200, 0, 0)) == -3670016  # QuPath's Tumor
    assert packed_argb((150, 200, 150)) == -6895466  # Stroma
    assert packed_argb((0, 0, 180)) == -16777036  # Region*


# ------------------------------------------------------------------------------------------- projects


@needs_real_project
def test_adding_to_the_real_qupath_06_project(tmp_path: Path) -> None:
    project_dir = tmp_path / "project"
    shutil.copytree(REAL_PROJECT, project_dir)
    original_text = (project_dir / "project.qpproj").read_text(encoding="utf-8")
    original = json.loads(original_text)
    original_classes = json.loads((project_dir / "classifiers" / "classes.json").read_text(encoding="utf-8"))

    project = FilesProject(project_dir)
    slide = tmp_path / "slides" / "CMU-1 Small.svs"
    entry_id = project.add_or_update_image(
        slide, features("Tumor", "Normal"), width=2220, height=2967, mpp=0.499, levels=[(2220, 2967)],
        magnification=20.0, tile_size=(240, 240), uri_map=[(str(tmp_path / "slides"), "E:\\KONTROLHE_2025")],
        metadata={"zeus.model": "conch", "zeus.prompts": "spindle"},
    )
    project.save()

    written = json.loads((project_dir / "project.qpproj").read_text(encoding="utf-8"))
    assert entry_id == "108"
    assert written["lastID"] == 108
    assert written["images"][:107] == original["images"]  # QuPath's entries untouched
    assert {k: v for k, v in written.items() if k not in ("images", "lastID", "modifyTimestamp")} == {
        k: v for k, v in original.items() if k not in ("images", "lastID", "modifyTimestamp")}
    assert written["modifyTimestamp"] > original["modifyTimestamp"]

    new = written["images"][107]
    real = original["images"][0]
    assert list(new) == list(real)  # same keys in the same order
    assert structure({**new, "metadata": {}}) == structure(real)  # same value types, level by level
    builder = new["serverBuilder"]
    assert builder["builderType"] == "uri" and builder["providerClassName"] == BIOFORMATS
    assert builder["args"] == ["--series", "0"]
    assert builder["uri"] == "file:/E:/KONTROLHE_2025/CMU-1%20Small.svs"
    assert builder["metadata"]["pixelCalibration"]["pixelWidth"] == {"value": 0.499, "unit": "\u00b5m"}
    assert new["entryID"] == 108 and new["imageName"] == "CMU-1 Small.svs"
    assert len(new["randomizedName"]) == 36 and new["randomizedName"] != real["randomizedName"]
    assert new["metadata"]["zeus.model"] == "conch" and new["metadata"]["zeus.prompts"] == "spindle"
    assert {"zeus.version", "zeus.date", "zeus.status"} <= set(new["metadata"])
    assert all(isinstance(v, str) for v in new["metadata"].values())

    classes = json.loads((project_dir / "classifiers" / "classes.json").read_text(encoding="utf-8"))["pathClasses"]
    assert classes[: len(original_classes["pathClasses"])] == original_classes["pathClasses"]
    assert [c["name"] for c in classes[len(original_classes["pathClasses"]):]] == ["Normal"]  # Tumor existed

    objs = read_qupath_geojson(project_dir / "data" / "108" / ZEUS_GEOJSON)
    assert [o.class_name for o in objs] == ["Tumor", "Normal"]
    assert (project_dir / "scripts" / IMPORT_SCRIPT).read_text(encoding="utf-8") == (
        ROOT / "groovy" / IMPORT_SCRIPT).read_text(encoding="utf-8")

    backups = list(project_dir.glob("project.qpproj.bak-*"))
    assert len(backups) == 1 and backups[0].read_text(encoding="utf-8") == original_text
    assert list(project_dir.glob("classifiers/classes.json.bak-*"))
    assert not list(project_dir.rglob(".*.tmp")) and not list(project_dir.rglob(".project.qpproj.*"))


def test_new_project_and_readding_the_same_slide(tmp_path: Path) -> None:
    project_dir = tmp_path / "p"
    slide = tmp_path / "a.svs"
    with FilesProject(project_dir) as project:
        first_id = project.add_or_update_image(slide, features("Tumor"), width=800, height=600, mpp=0.5,
                                               levels=[(800, 600), (200, 150)], metadata={"zeus.model": "quilt"})
    data = json.loads((project_dir / "project.qpproj").read_text(encoding="utf-8"))
    assert first_id == "1" and data["lastID"] == 1 and len(data["images"]) == 1
    assert set(data) == {"version", "createTimestamp", "modifyTimestamp", "uri", "lastID", "images"}
    assert data["uri"] == file_uri(str(project_dir / "project.qpproj"), ascii=False)
    assert data["images"][0]["serverBuilder"]["metadata"]["levels"][1]["downsample"] == 4.0
    classes = json.loads((project_dir / "classifiers" / "classes.json").read_text(encoding="utf-8"))["pathClasses"]
    assert [c["name"] for c in classes][:2] == ["Tumor", "Stroma"]  # QuPath's defaults for a new project
    assert not list(project_dir.glob("*.bak-*"))  # nothing existed to back up

    # the annotator adds a description, metadata and a tag in QuPath; QuPath writes data.qpdata
    data["images"][0]["description"] = "checked"
    data["images"][0]["metadata"]["reviewer"] = "AB"
    data["images"][0]["tags"] = ["round1"]
    data["myExtension"] = {"keep": [1, 2.5, None]}
    (project_dir / "project.qpproj").write_text(json.dumps(data, indent=2), encoding="utf-8")
    qpdata = project_dir / "data" / "1" / "data.qpdata"
    qpdata.write_bytes(b"\xac\xed\x00\x05 written by QuPath")
    stamp = qpdata.stat().st_mtime_ns
    old_geojson = (project_dir / "data" / "1" / ZEUS_GEOJSON).read_text(encoding="utf-8")

    project = FilesProject(project_dir / "project.qpproj")
    second_id = project.add_or_update_image(str(slide), features("Tumor", "Tumor"), width=800, height=600,
                                            metadata={"zeus.model": "conch"})
    project.save()
    again = json.loads((project_dir / "project.qpproj").read_text(encoding="utf-8"))
    assert second_id == first_id and len(again["images"]) == 1 and again["lastID"] == 1
    entry = again["images"][0]
    assert entry["serverBuilder"] == data["images"][0]["serverBuilder"]
    assert entry["randomizedName"] == data["images"][0]["randomizedName"]
    assert entry["description"] == "checked" and entry["tags"] == ["round1"]
    assert entry["metadata"]["reviewer"] == "AB" and entry["metadata"]["zeus.model"] == "conch"
    assert again["myExtension"] == {"keep": [1, 2.5, None]}
    assert len(read_qupath_geojson(project_dir / "data" / "1" / ZEUS_GEOJSON)) == 2
    geo_backups = list((project_dir / "data" / "1").glob(f"{ZEUS_GEOJSON}.bak-*"))
    assert len(geo_backups) == 1 and geo_backups[0].read_text(encoding="utf-8") == old_geojson
    assert qpdata.read_bytes() == b"\xac\xed\x00\x05 written by QuPath" and qpdata.stat().st_mtime_ns == stamp
    assert project.updates[0].created is False and project.updates[0].n_features == 2


def test_provider_choices(tmp_path: Path) -> None:
    project = FilesProject(tmp_path / "p")
    project.add_or_update_image(tmp_path / "a.svs", [], width=10, height=10, provider="auto")
    project.add_or_update_image(tmp_path / "b.svs", [], width=10, height=10, provider="openslide")
    auto, openslide = (e["serverBuilder"] for e in project.entries)
    assert "providerClassName" not in auto and "metadata" not in auto  # QuPath reads the file itself
    assert openslide["providerClassName"].endswith("OpenslideServerBuilder") and openslide["args"] == []
    with pytest.raises(ProjectError, match="unknown image provider"):
        project.add_or_update_image(tmp_path / "c.svs", [], width=10, height=10, provider="vips")


def test_bad_features_and_bad_project_files(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="not a GeoJSON Feature"):
        FilesProject(tmp_path / "p").add_or_update_image(tmp_path / "a.svs", [{"type": "Polygon"}], width=1, height=1)
    nan = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]},
           "properties": {"measurements": {"x": float("nan")}}}
    with pytest.raises(ProjectError, match="annotation 0 cannot be written as JSON"):
        FilesProject(tmp_path / "p").add_or_update_image(tmp_path / "a.svs", [nan], width=1, height=1)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "project.qpproj").write_text("{ not json", encoding="utf-8")
    with pytest.raises(ProjectError, match="cannot read the QuPath project"):
        FilesProject(broken)
    (broken / "project.qpproj").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ProjectError, match="not a QuPath project"):
        FilesProject(broken)


def test_a_failed_save_leaves_the_project_file_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project_dir = tmp_path / "p"
    with FilesProject(project_dir) as project:
        project.add_or_update_image(tmp_path / "a.svs", features("Tumor"), width=100, height=100)
    before = (project_dir / "project.qpproj").read_text(encoding="utf-8")

    import zeus_qupath.output_set as output_set

    real_replace = output_set.os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if Path(src).name == Path(dst).name == "project.qpproj" and ".zeus-staging-" in str(src):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(output_set.os, "replace", failing_replace)
    project = FilesProject(project_dir)
    entry_id = project.add_or_update_image(tmp_path / "b.svs", features("Tumor"), width=100, height=100)
    with pytest.raises(ProjectError, match="disk full"):
        project.save()
    monkeypatch.undo()
    assert (project_dir / "project.qpproj").read_text(encoding="utf-8") == before
    # the set was taken back: the new entry's annotations, written before the project file, are gone again
    assert not (project_dir / "data" / entry_id).exists()
    assert not [p for p in project_dir.rglob(".*")]  # no temporary files or staging folders left behind


def test_open_project_backends(tmp_path: Path) -> None:
    assert isinstance(open_project(tmp_path / "a", backend="files"), FilesProject)
    with pytest.raises(ProjectError, match="unknown project backend"):
        open_project(tmp_path / "b", backend="qupath")
    available, why = paquo_status()
    if available:
        pytest.skip(f"paquo with a QuPath install is available here ({why}); fallback not testable")
    assert isinstance(open_project(tmp_path / "c"), FilesProject)  # auto falls back
    with pytest.raises(ProjectError, match="paquo backend is not available") as info:
        open_project(tmp_path / "d", backend="paquo")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- finding entries


def _entries(project_dir: Path) -> list[dict[str, Any]]:
    return json.loads((project_dir / "project.qpproj").read_text(encoding="utf-8"))["images"]


def _rewrite(project_dir: Path, change: Any) -> None:
    path = project_dir / "project.qpproj"
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _publish(project_dir: Path, slide: Path, *, width: int = 800, height: int = 600, uri_map: Any = ()) -> Any:
    with FilesProject(project_dir) as project:
        project.add_or_update_image(slide, features("Tumor"), width=width, height=height, uri_map=uri_map)
    return project.updates[-1]


def test_an_image_the_annotator_relocated_is_updated_not_added_again(tmp_path: Path) -> None:
    project_dir, slide = tmp_path / "p", tmp_path / "server" / "a.svs"
    uri_map = [(str(tmp_path / "server"), "Z:\\slides")]
    first = _publish(project_dir, slide, uri_map=uri_map)
    (entry,) = _entries(project_dir)
    assert entry["metadata"]["zeus.uri"] == "file:/Z:/slides/a.svs"
    assert entry["metadata"]["zeus.slide"] == str(slide)

    # QuPath could not find Z:\slides\a.svs; the annotator pointed it at C:\Users\ann\wsi\a.svs and renamed it
    annotators_uri = "file:/C:/Users/ann/wsi/a.svs"

    def relocate(data: dict) -> None:
        data["images"][0]["serverBuilder"]["uri"] = annotators_uri
        data["images"][0]["imageName"] = "case 7"

    _rewrite(project_dir, relocate)
    again = _publish(project_dir, slide, uri_map=uri_map)
    (entry,) = _entries(project_dir)
    assert again.entry_id == first.entry_id and again.created is False
    assert entry["serverBuilder"]["uri"] == annotators_uri and entry["imageName"] == "case 7"  # kept
    assert len(read_qupath_geojson(project_dir / "data" / first.entry_id / ZEUS_GEOJSON)) == 1


def test_entries_written_before_zeus_recorded_its_slide_are_found_by_name(tmp_path: Path) -> None:
    project_dir, slide = tmp_path / "p", tmp_path / "a.svs"
    slide.write_bytes(b"slide")
    _publish(project_dir, slide)

    def legacy(data: dict) -> None:  # an older zeus: no zeus.slide / zeus.uri; the annotator relocated it
        meta = data["images"][0]["metadata"]
        del meta["zeus.slide"], meta["zeus.uri"]
        data["images"][0]["serverBuilder"]["uri"] = "file:/Volumes/usb/a.svs"

    _rewrite(project_dir, legacy)
    update = _publish(project_dir, slide)
    assert update.created is False and len(_entries(project_dir)) == 1
    assert _entries(project_dir)[0]["metadata"]["zeus.slide"] == str(slide)  # recorded from now on

    # the same name at another size is another image
    other = tmp_path / "other" / "a.svs"
    assert _publish(project_dir, other, width=1000, height=600).created is True
    assert len(_entries(project_dir)) == 2


def test_a_slide_moved_on_the_server_keeps_its_entry(tmp_path: Path) -> None:
    project_dir = tmp_path / "p"
    old, new = tmp_path / "old" / "a.svs", tmp_path / "new" / "a.svs"
    for path in (old, new):
        path.parent.mkdir()
    old.write_bytes(b"slide")
    _publish(project_dir, old)
    old.rename(new)
    update = _publish(project_dir, new)
    assert update.created is False and len(_entries(project_dir)) == 1


def test_same_name_other_slides_get_their_own_entries(tmp_path: Path) -> None:
    project_dir = tmp_path / "p"
    a, b = tmp_path / "case1" / "slide.svs", tmp_path / "case2" / "slide.svs"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(b"slide")
    with FilesProject(project_dir) as project:  # in one run: the first entry is not matched twice
        ids = [project.add_or_update_image(p, features("Tumor"), width=800, height=600) for p in (a, b)]
    assert ids == ["1", "2"]
    # a later run: each finds its own entry (by URI, and ZEUS's record names the other slide for the other)
    assert _publish(project_dir, b).entry_id == "2" and _publish(project_dir, a).entry_id == "1"
    assert len(_entries(project_dir)) == 2


def test_two_entries_that_could_both_be_the_slide_are_refused(tmp_path: Path) -> None:
    project_dir = tmp_path / "p"
    with FilesProject(project_dir) as project:
        for folder in ("x", "y"):
            project.add_or_update_image(tmp_path / folder / "a.svs", features("Tumor"), width=800, height=600)

    def legacy(data: dict) -> None:
        for e in data["images"]:
            del e["metadata"]["zeus.slide"], e["metadata"]["zeus.uri"]

    _rewrite(project_dir, legacy)
    before = (project_dir / "project.qpproj").read_text(encoding="utf-8")
    with pytest.raises(ProjectError, match="entries 1, 2 of the project could all be this slide") as info:
        _publish(project_dir, tmp_path / "z" / "a.svs")
    assert "\n" not in str(info.value)
    assert (project_dir / "project.qpproj").read_text(encoding="utf-8") == before


def test_string_entry_ids_and_used_data_folders_are_never_reused(tmp_path: Path) -> None:
    project_dir = tmp_path / "p"
    _publish(project_dir, tmp_path / "a.svs")

    def stringify(data: dict) -> None:  # as some tools write it; QuPath reads "1" as entry 1
        data["images"][0]["entryID"] = "1"
        del data["lastID"]

    _rewrite(project_dir, stringify)
    assert _publish(project_dir, tmp_path / "a.svs").entry_id == "1"  # found, not added
    (project_dir / "data" / "5").mkdir()  # a folder of an entry removed from the project
    update = _publish(project_dir, tmp_path / "b.svs")
    assert update.created is True and update.entry_id == "6"
    assert [str(e["entryID"]) for e in _entries(project_dir)] == ["1", "6"]
    assert len(read_qupath_geojson(project_dir / "data" / "1" / ZEUS_GEOJSON)) == 1
    assert json.loads((project_dir / "project.qpproj").read_text(encoding="utf-8"))["lastID"] == 6


@pytest.fixture(scope="module", params=("0.4.4", "0.5.1", "0.6.0"))
def qupath(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from qupath.fixtures import qupath_or_skip

    return qupath_or_skip(request.param, tmp_path_factory)


@pytest.mark.jvm
def test_found_and_new_entries_load_in_real_qupath(qupath: Any, tmp_path: Path) -> None:
    """QuPath's own ProjectIO.loadProject reads the project after a relocation, a string entryID and a used
    data folder: one entry per slide, the annotator's URI kept, each image its own data folder."""
    project_dir, server = tmp_path / "p", tmp_path / "server"
    uri_map = [(str(server), "Z:\\slides")]
    _publish(project_dir, server / "a.svs", uri_map=uri_map)

    def annotator(data: dict) -> None:
        data["images"][0]["serverBuilder"]["uri"] = "file:/C:/Users/ann/wsi/a.svs"  # relocated in QuPath
        data["images"][0]["entryID"] = "1"
        del data["lastID"]

    _rewrite(project_dir, annotator)
    (project_dir / "data" / "5").mkdir()
    assert _publish(project_dir, server / "a.svs", uri_map=uri_map).created is False
    assert _publish(project_dir, server / "b.svs", uri_map=uri_map).entry_id == "6"

    view = qupath.load_project(project_dir)
    assert [e.id for e in view.entries] == ["1", "6"]
    a, b = view.entries
    assert a.uris == ["file:/C:/Users/ann/wsi/a.svs"] and b.uris == ["file:/Z:/slides/b.svs"]
    assert a.metadata["zeus.slide"] == str(server / "a.svs") and a.metadata["zeus.uri"] == "file:/Z:/slides/a.svs"
    assert a.entry_path != b.entry_path and b.entry_path.name == "6"
    assert (b.entry_path / ZEUS_GEOJSON).is_file() and (a.entry_path / ZEUS_GEOJSON).is_file()
