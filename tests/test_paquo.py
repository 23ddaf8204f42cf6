"""The paquo backend.

On real QuPath code: ``test_paquo_on_real_qupath_code`` builds, for each QuPath version of the
real-QuPath harness (``tests/qupath``: qupath-core 0.4.4/0.5.1/0.6.0/0.7.0 compiled from the release tags;
0.7.0 with paquo 0.9.0 on a Java 25 runtime without the Area bug),
a QuPath-shaped folder in a temp dir (``QuPath/lib/app/`` with qupath-core, its libraries,
``gui-stub.jar`` and the harness's TEST-ONLY image server jar; ``QuPath/lib/runtime`` -> a JDK home),
and runs the ``qupath``-marked tests below in a SUBPROCESS with ``PAQUO_QUPATH_DIR`` pointing at it:
paquo's JVM cannot be restarted in a process, and the test process must not fork after it started.
With ``PAQUO_QUPATH_DIR`` set to a full QuPath install, that install is used instead. The marked
tests skip when run directly, outside that subprocess.

The other tests run everywhere: they replace paquo and QuPath by ``StandInPaquo``, a test double of
the few paquo calls the backend makes, to check the backend's own logic: which annotations it removes
and adds, the URI map round trip, backups.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from shapely.geometry import Polygon, mapping, shape

from zeus_qupath.bridge.edits import same_geometry
from zeus_qupath.bridge.project import open_project
from zeus_qupath.bridge.uris import same_file_uri
from zeus_qupath.qupath_geojson import QuPathObject, annotation_feature, read_qupath_geojson

SLIDE = Path(__file__).resolve().parent / "data" / "wsi" / "CMU-1-Small-Region.svs"


def _qupath_dir() -> Path | None:
    value = os.environ.get("PAQUO_QUPATH_DIR")
    if not value:
        return None
    root = Path(value).expanduser()
    layouts = (root / "lib" / "app", root / "app", root / "Contents" / "app")  # Linux, Windows, macOS
    return root if any(p.is_dir() for p in layouts) else None


IN_SUBPROCESS = os.environ.get("ZEUS_PAQUO_SUBPROCESS") == "1"


def requires_qupath(test):
    test = pytest.mark.skipif(not SLIDE.is_file(), reason=f"test slide not found at {SLIDE} (tests/data)")(test)
    test = pytest.mark.skipif(
        not IN_SUBPROCESS or _qupath_dir() is None,
        reason="runs in the subprocess that test_paquo_on_real_qupath_code starts (PAQUO_QUPATH_DIR set there)",
    )(test)
    return pytest.mark.qupath(test)


def _features() -> list[dict]:
    tumor = Polygon([(200, 200), (1200, 200), (1200, 1400), (200, 1400)], [[(500, 500), (700, 500), (700, 700)]])
    normal = Polygon([(1500, 1800), (2100, 1800), (1800, 2600)])
    return [
        json.loads(json.dumps(annotation_feature(
            QuPathObject(tumor, class_name="Tumor", measurements={"Mean tumor score": 0.4})))),
        json.loads(json.dumps(annotation_feature(
            QuPathObject(normal, class_name="Normal", measurements={"Mean tumor score": 0.1})))),
    ]


def _add(project_dir: Path, features: list[dict], **kwargs):
    pytest.importorskip("paquo", reason="paquo is not installed (pip install paquo)")
    project = open_project(project_dir, backend="paquo")
    entry_id = project.add_or_update_image(SLIDE, features, width=2220, height=2967, mpp=0.499,
                                           metadata={"zeus.model": "test"}, **kwargs)
    project.save()
    return project, entry_id


def _annotations(project_dir: Path):
    from paquo.projects import QuPathProject

    qp = QuPathProject(project_dir / "project.qpproj", mode="r")
    (entry,) = qp.images
    return entry, list(entry.hierarchy.annotations)


@requires_qupath
def test_paquo_project_has_image_classes_annotations_and_metadata(tmp_path: Path) -> None:
    from paquo.images import QuPathImageType

    out = os.environ.get("ZEUS_PAQUO_OUT")
    project_dir = Path(out) / "project" if out else tmp_path / "project"  # the outer test loads it with QuPath
    features = _features()
    project, entry_id = _add(project_dir, features)
    assert project.backend == "paquo"
    entry, annotations = _annotations(project_dir)
    assert entry.entry_id == entry_id
    assert entry.image_type == QuPathImageType.BRIGHTFIELD_H_E
    assert (entry.width, entry.height) == (2220, 2967)
    assert entry.metadata["zeus.model"] == "test" and "zeus.version" in entry.metadata
    assert entry.metadata["zeus.slide"] == str(SLIDE)
    assert sorted(str(a.java_object.getID()) for a in annotations) == sorted(f["id"] for f in features)  # IDs kept
    by_name = {a.name: a for a in annotations}
    assert set(by_name) == {"ZEUS Tumor", "ZEUS Normal"}
    tumor = by_name["ZEUS Tumor"]
    assert tumor.path_class.name == "Tumor"
    assert len(tumor.roi.interiors) == 1
    assert tumor.roi.equals(shape(features[0]["geometry"]))
    assert tumor.measurements["Mean tumor score"] == pytest.approx(0.4)
    record = json.loads((project_dir / "data" / entry_id / "zeus_imported.json").read_text(encoding="utf-8"))
    assert record["objects"] == {f["id"]: "imported" for f in features}


@requires_qupath
def test_paquo_rerun_keeps_the_annotators_edits(tmp_path: Path) -> None:
    from paquo.projects import QuPathProject

    project_dir = tmp_path / "project"
    _add(project_dir, _features())
    # the annotator moves a vertex of the tumor and draws an object of their own
    with QuPathProject(project_dir / "project.qpproj", mode="r+") as qp:
        entry = qp.images[0]
        tumor = next(a for a in entry.hierarchy.annotations if a.name == "ZEUS Tumor")
        tumor.update_roi(Polygon([(200, 200), (1300, 200), (1200, 1400), (200, 1400)]))
        entry.hierarchy.add_annotation(roi=Polygon([(10, 10), (90, 10), (90, 90)]))
        entry.save()

    project, _ = _add(project_dir, _features())
    merge = project.last_merge
    # the untouched Normal is replaced; the new Tumor would lie over the corrected one: not added
    assert (merge.n_kept, merge.n_removed, merge.n_added, len(merge.blocked)) == (2, 1, 1, 1)
    _, annotations = _annotations(project_dir)
    names = sorted(str(a.name) for a in annotations)
    assert names == ["None", "ZEUS Normal", "ZEUS Tumor"]
    assert any(a.roi.bounds[2] == 1300 for a in annotations)

    # zeus export reads the corrected hierarchy through paquo
    from zeus_qupath.bridge.export import export_corrections

    report = export_corrections(project_dir, tmp_path / "export", backend="paquo")
    (slide,) = report.slides
    assert report.backend == "paquo"
    assert (slide.stats.created, slide.stats.edited, slide.stats.untouched) == (1, 1, 1)


@requires_qupath
def test_paquo_finds_the_entry_the_annotator_relocated(tmp_path: Path) -> None:
    from paquo.projects import QuPathProject

    project_dir = tmp_path / "cohort.v2"  # a dot in the folder name: paquo would take it for a file name
    _add(project_dir, _features())
    with QuPathProject(project_dir / "project.qpproj", mode="r+") as qp:  # QuPath rewrote the URI (relocated)
        qp.update_image_paths(uri2uri={qp.images[0].uri: "file:/C:/Users/ann/CMU-1-Small-Region.svs"})
    project, _ = _add(project_dir, _features())
    assert project.updates[-1].created is False
    data = json.loads((project_dir / "project.qpproj").read_text(encoding="utf-8"))
    assert len(data["images"]) == 1
    assert data["images"][0]["serverBuilder"]["uri"] == "file:/C:/Users/ann/CMU-1-Small-Region.svs"


@requires_qupath
def test_paquo_uri_map_rewrites_the_image_uri(tmp_path: Path) -> None:
    project_dir = tmp_path / "project"
    uri_map = [(str(SLIDE.parent), "Z:\\slides")]
    _add(project_dir, _features(), uri_map=uri_map)
    data = json.loads((project_dir / "project.qpproj").read_text(encoding="utf-8"))
    assert data["images"][0]["serverBuilder"]["uri"] == "file:/Z:/slides/CMU-1-Small-Region.svs"
    # a second run finds the entry under its mapped URI and works on the local file again
    project, entry_id = _add(project_dir, _features(), uri_map=uri_map)
    assert project.updates[-1].created is False
    data = json.loads((project_dir / "project.qpproj").read_text(encoding="utf-8"))
    assert len(data["images"]) == 1 and data["images"][0]["serverBuilder"]["uri"].startswith("file:/Z:/")


def _tiles_by_box(objects: Any) -> dict[tuple, dict[str, float]]:
    """(x0, y0, x1, y1) -> measurements (as float32) of tile objects (paquo's, QuPath's or GeoJSON features)."""
    import numpy as np

    out = {}
    for o in objects:
        if isinstance(o, dict):
            geometry, measurements = shape(o["geometry"]), o["properties"]["measurements"]
        else:
            geometry, measurements = (o.roi, o.measurements) if hasattr(o, "roi") else (o.geometry, o.measurements)
        key = tuple(round(v, 2) for v in geometry.bounds)
        assert key not in out, f"two tiles at {key}"
        out[key] = {str(k): float(np.float32(v)) for k, v in dict(measurements).items()}
    return out


OTHER_TILE = {"Tumor probability": 0.75}  # another tool's tile: never ZEUS's


@requires_qupath
def test_paquo_heatmap_tiles_replace_only_zeus_tiles(tmp_path: Path) -> None:
    from paquo.projects import QuPathProject

    out = os.environ.get("ZEUS_PAQUO_OUT")
    project_dir = Path(out) / "tiles" if out else tmp_path / "tiles"  # the outer test loads it with QuPath
    first, second = _tile_features(1, n=19, rows=26), _tile_features(2, n=12, rows=20)  # 494, then 240 tiles
    _add(project_dir, _features(), tiles=first)
    entry, _ = _annotations(project_dir)
    assert _tiles_by_box(entry.hierarchy.tiles) == _tiles_by_box(first)
    # the annotator draws an annotation; another tool adds a tile of its own
    with QuPathProject(project_dir / "project.qpproj", mode="r+") as qp:
        entry = qp.images[0]
        entry.hierarchy.add_annotation(roi=Polygon([(10, 10), (90, 10), (90, 90)]))
        entry.hierarchy.add_tile(roi=Polygon([(2000, 2800), (2100, 2800), (2100, 2900), (2000, 2900)]),
                                 measurements=OTHER_TILE)
        entry.save()

    _add(project_dir, _features(), tiles=second)  # a re-run with --tiles
    entry, annotations = _annotations(project_dir)
    tiles = _tiles_by_box(entry.hierarchy.tiles)
    assert tiles.pop((2000.0, 2800.0, 2100.0, 2900.0)) == OTHER_TILE
    assert tiles == _tiles_by_box(second)  # the earlier ZEUS tiles are gone, none twice
    assert sorted(str(a.name) for a in annotations) == ["None", "ZEUS Normal", "ZEUS Tumor"]


# ------------------------------------------------------------------------ paquo on real QuPath code


def qupath_shaped_folder(qupath: Any, root: Path) -> Path:
    """``root/QuPath`` laid out as paquo looks for a QuPath install (Linux), from the harness's jars."""
    app = root / "QuPath" / "lib" / "app"
    app.mkdir(parents=True)
    jars = [qupath.core_jar, *sorted((qupath.folder / "lib").glob("*.jar")), qupath.folder / "gui-stub.jar",
            qupath.test_server_jar]  # the last two: STAND-INS (GUI classes paquo touches; an image reader)
    for jar in jars:
        (app / jar.name).symlink_to(jar)
    (root / "QuPath" / "lib" / "runtime").symlink_to(qupath.java_home)
    return root / "QuPath"


@pytest.fixture(scope="module", params=("0.4.4", "0.5.1", "0.6.0", "0.7.0"))
def qupath(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from qupath.fixtures import qupath_or_skip

    return qupath_or_skip(request.param, tmp_path_factory)


@pytest.mark.jvm
@pytest.mark.slow
@pytest.mark.skipif(IN_SUBPROCESS, reason="this is the subprocess")
@pytest.mark.skipif(not SLIDE.is_file(), reason=f"test slide not found at {SLIDE} (tests/data)")
def test_paquo_on_real_qupath_code(qupath: Any, tmp_path: Path) -> None:
    pytest.importorskip("paquo", reason="paquo is not installed (pip install 'zeus-qupath[paquo]')")
    env = dict(os.environ, ZEUS_PAQUO_SUBPROCESS="1", ZEUS_PAQUO_OUT=str(tmp_path / "out"))
    if _qupath_dir() is None:
        env["PAQUO_QUPATH_DIR"] = str(qupath_shaped_folder(qupath, tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "qupath", str(Path(__file__))],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail and "failed" not in tail, tail

    # the project paquo wrote, loaded by QuPath's own ProjectIO (in the harness's JVM)
    view = qupath.load_project(tmp_path / "out" / "project")
    (entry,) = view.entries
    assert entry.name == SLIDE.name and entry.metadata["zeus.model"] == "test" and entry.has_image_data
    assert sorted(o.name or "" for o in entry.annotations) == ["ZEUS Normal", "ZEUS Tumor"]
    written = {o.id: o for o in read_qupath_geojson(tmp_path / "out" / "project" / "data" / entry.id /
                                                    "zeus_annotations.geojson")}
    assert {o.id for o in entry.annotations} == set(written)  # what the keep-edits rule will recognise
    assert all(same_geometry(o.geometry, written[o.id].geometry) for o in entry.annotations)

    # the heatmap paquo wrote, as QuPath's readHierarchy sees it
    (entry,) = qupath.load_project(tmp_path / "out" / "tiles").entries
    tiles = _tiles_by_box(o for o in entry.objects if o.object_type == "tile")
    assert tiles.pop((2000.0, 2800.0, 2100.0, 2900.0)) == OTHER_TILE
    assert tiles == _tiles_by_box(_tile_features(2, n=12, rows=20))
    assert sorted(o.name or "" for o in entry.annotations) == ["", "ZEUS Normal", "ZEUS Tumor"]


# ------------------------------------------------------------------------ stand-in for paquo + QuPath


class StandInAnnotation:
    """Test double of paquo's QuPathPathAnnotationObject (what the backend reads and sets)."""

    def __init__(self, roi: Any, path_class: Any = None, measurements: dict | None = None) -> None:
        self.roi, self.path_class, self.name = roi, path_class, None
        self.measurements = dict(measurements or {})
        self.id = f"00000000-0000-4000-8000-{id(self):012x}"[-36:]

    @classmethod
    def from_geojson(cls, feature: dict) -> StandInAnnotation:
        """As QuPath's GeoJSON reader: ID, class, name and measurements come with the object."""
        props = feature.get("properties") or {}
        cls_ = props.get("classification")
        pc = StandInPathClass(cls_["name"], tuple(cls_.get("color") or (0, 0, 0))) if cls_ else None
        obj = cls(shape(feature["geometry"]), pc, props.get("measurements"))
        obj.name, obj.id = props.get("name"), feature.get("id") or obj.id
        return obj

    def to_geojson(self) -> dict:
        geometry = json.loads(json.dumps(mapping(self.roi)))
        props: dict[str, Any] = {"objectType": "annotation"}
        if self.name is not None:
            props["name"] = self.name
        if self.path_class is not None:
            props["classification"] = {"name": self.path_class.name, "color": list(self.path_class.color)}
        if self.measurements:
            props["measurements"] = dict(self.measurements)
        return {"type": "Feature", "id": self.id, "geometry": geometry, "properties": props}


class StandInJavaObject:
    """Test double of a QuPath PathObject as QuPath's GeoJSON reader (``PathIO.readObjects``) makes it."""

    def __init__(self, roi: Any, object_type: str, measurements: dict | None = None) -> None:
        self.roi, self.object_type, self.measurements = roi, object_type, dict(measurements or {})

    def isTile(self) -> bool:  # noqa: N802 (Java's name)
        return self.object_type == "tile"


def stand_in_read_objects(file: Path) -> list[StandInJavaObject]:
    """Test double of ``PathIO.readObjects(File)``."""
    features = json.loads(Path(file).read_text(encoding="utf-8"))["features"]
    return [StandInJavaObject(shape(f["geometry"]), f["properties"].get("objectType", "annotation"),
                              f["properties"].get("measurements")) for f in features]


class StandInTile:
    """Test double of paquo's QuPathPathTileObject (a wrapper of the Java object)."""

    def __init__(self, java_object: StandInJavaObject) -> None:
        self.java_object = java_object

    @property
    def roi(self) -> Any:
        return self.java_object.roi

    @property
    def measurements(self) -> dict:
        return self.java_object.measurements


class StandInDetections(list):
    """paquo's detections view: tiles are detections; ``-=`` and ``|=`` change the hierarchy in one batch."""

    def __init__(self, hierarchy: StandInHierarchy) -> None:
        super().__init__()
        self.hierarchy = hierarchy

    def __isub__(self, objects: Any) -> StandInDetections:
        self.hierarchy.detection_batches += 1
        gone = {id(o) for o in objects}
        self[:] = [o for o in self if id(o) not in gone]
        return self

    def __ior__(self, objects: Any) -> StandInDetections:
        self.hierarchy.detection_batches += 1
        self.extend(objects)
        return self


class StandInHierarchy:
    def __init__(self) -> None:
        self.annotations = StandInAnnotations()
        self.detections = StandInDetections(self)
        self.batches = 0
        self.detection_batches = 0

    @property
    def tiles(self) -> list[StandInTile]:
        return [o for o in self.detections if isinstance(o, StandInTile)]

    @contextmanager
    def no_autoflush(self):
        self.batches += 1
        yield self

    def add_annotation(self, roi: Any, path_class: Any = None, measurements: dict | None = None) -> StandInAnnotation:
        annotation = StandInAnnotation(roi, path_class, measurements)
        self.annotations.append(annotation)
        return annotation


class StandInAnnotations(list):
    def discard(self, annotation: StandInAnnotation) -> None:
        self.remove(annotation)

    def add(self, annotation: StandInAnnotation) -> None:
        self.append(annotation)


class StandInEntry:
    def __init__(self, project_dir: Path, entry_id: int, uri: str) -> None:
        self.entry_id, self.uri = str(entry_id), uri
        self.entry_path = project_dir / "data" / str(entry_id)
        self.image_name = uri.rsplit("/", 1)[-1]
        self.width, self.height = 2220, 2967
        self.metadata: dict[str, str] = {}
        self.hierarchy = StandInHierarchy()
        self.image_type = None
        self.saved_with_uri: list[str] = []

    def save(self) -> None:
        self.saved_with_uri.append(self.uri)
        self.entry_path.mkdir(parents=True, exist_ok=True)
        (self.entry_path / "data.qpdata").write_text(str(len(self.hierarchy.annotations)), encoding="utf-8")


class StandInPathClass:
    def __init__(self, name: str, color: tuple = (0, 0, 0)) -> None:
        self.name, self.color = name, tuple(color)


def make_stand_in_paquo(state: dict) -> dict[str, types.ModuleType]:
    """Modules named like paquo's, backed by ``state`` (project path -> StandInProject)."""

    class StandInProject:
        def __new__(cls, path: Any, mode: str = "r") -> Any:
            path = Path(path).parent if Path(path).suffix == ".qpproj" else Path(path)
            key = str(Path(path))
            if key not in state:
                obj = super().__new__(cls)
                obj.dir, obj.images, obj.path_classes, obj.saves = Path(path), [], (), 0
                Path(path).mkdir(parents=True, exist_ok=True)
                (Path(path) / "project.qpproj").write_text("{}", encoding="utf-8")
                state[key] = obj
            return state[key]

        def add_image(self, path: str, image_type: Any = None) -> StandInEntry:
            entry = StandInEntry(self.dir, len(self.images) + 1, Path(path).absolute().as_uri())
            entry.image_type = image_type
            self.images.append(entry)
            return entry

        def update_image_paths(self, uri2uri: dict) -> None:
            for entry in self.images:
                entry.uri = uri2uri.get(entry.uri, entry.uri)

        def save(self, images: bool = True) -> None:
            self.saves += 1

    paquo = types.ModuleType("paquo")
    projects = types.ModuleType("paquo.projects")
    projects.QuPathProject = StandInProject
    images = types.ModuleType("paquo.images")
    images.QuPathImageType = types.SimpleNamespace(BRIGHTFIELD_H_E="Brightfield H&E")
    classes = types.ModuleType("paquo.classes")
    classes.QuPathPathClass = StandInPathClass
    pathobjects = types.ModuleType("paquo.pathobjects")
    pathobjects.QuPathPathAnnotationObject = StandInAnnotation
    pathobjects.QuPathPathTileObject = StandInTile
    config = types.ModuleType("paquo._config")
    config.settings, config.to_kwargs = {}, lambda s: {}
    java = types.ModuleType("paquo.java")
    java.File = Path
    java.PathIO = types.SimpleNamespace(readObjects=stand_in_read_objects)
    backend = types.ModuleType("paquo.jpype_backend")
    backend.find_qupath = lambda **kwargs: "a QuPath install"
    return {"paquo": paquo, "paquo.projects": projects, "paquo.images": images, "paquo.classes": classes,
            "paquo.pathobjects": pathobjects, "paquo._config": config, "paquo.jpype_backend": backend,
            "paquo.java": java}


@pytest.fixture
def stand_in_paquo(monkeypatch: pytest.MonkeyPatch) -> dict:
    state: dict = {}
    for name, module in make_stand_in_paquo(state).items():
        monkeypatch.setitem(sys.modules, name, module)
    return state


def test_backend_with_stand_in_adds_classes_annotations_and_metadata(tmp_path: Path, stand_in_paquo: dict) -> None:
    from zeus_qupath.bridge.project_paquo import PaquoProject

    slide = tmp_path / "slides" / "a.svs"
    project = open_project(tmp_path / "p")  # auto picks paquo: the stand-in "finds" QuPath
    assert isinstance(project, PaquoProject)
    features = _features()
    entry_id = project.add_or_update_image(slide, features, width=2220, height=2967, metadata={"zeus.model": "m"})
    (qp,) = stand_in_paquo.values()
    (entry,) = qp.images
    assert entry_id == "1" and entry.image_type == "Brightfield H&E"
    assert [pc.name for pc in qp.path_classes] == ["Tumor", "Normal"]
    assert qp.path_classes[0].color == (200, 0, 0)
    names = [a.name for a in entry.hierarchy.annotations]
    assert names == ["ZEUS Tumor", "ZEUS Normal"] and entry.hierarchy.batches == 1
    assert [a.id for a in entry.hierarchy.annotations] == [f["id"] for f in features]  # ZEUS's IDs kept
    tumor = entry.hierarchy.annotations[0]
    assert tumor.path_class.name == "Tumor" and len(tumor.roi.interiors) == 1
    assert entry.metadata["zeus.model"] == "m" and entry.metadata["zeus.status"] == "pre-segmented"
    assert entry.saved_with_uri == [entry.uri] and project.last_merge.n_added == 2
    record = json.loads((entry.entry_path / "zeus_imported.json").read_text(encoding="utf-8"))
    assert record["objects"] == {f["id"]: "imported" for f in features}


def test_backend_with_stand_in_keeps_edits_and_maps_uris(tmp_path: Path, stand_in_paquo: dict) -> None:
    from zeus_qupath.bridge.project_paquo import PaquoProject

    slide = tmp_path / "slides" / "a b.svs"
    uri_map = [(str(tmp_path / "slides"), "Z:\\wsi")]
    PaquoProject(tmp_path / "p").add_or_update_image(slide, _features(), width=2220, height=2967, uri_map=uri_map)
    (qp,) = stand_in_paquo.values()
    (entry,) = qp.images
    assert entry.uri == "file:/Z:/wsi/a%20b.svs"  # rewritten for the annotators' machines after saving
    assert len(entry.saved_with_uri) == 1  # saved while QuPath could read the local file
    assert same_file_uri(entry.saved_with_uri[0], slide.as_uri())

    # the annotator edits the tumor, reclassifies nothing, draws an object of their own
    tumor, normal = entry.hierarchy.annotations
    tumor.roi = shape({"type": "Polygon", "coordinates": [[[200, 200], [1250, 200], [1200, 1400], [200, 1400]]]})
    entry.hierarchy.add_annotation(Polygon([(10, 10), (90, 10), (90, 90)]))

    project = PaquoProject(tmp_path / "p")
    project.add_or_update_image(slide, _features(), width=2220, height=2967, uri_map=uri_map)
    merge = project.last_merge
    # the untouched Normal is replaced; the new Tumor lies over the annotator's corrected one: not added
    assert (merge.n_kept, merge.n_removed, merge.n_added, len(merge.blocked)) == (2, 1, 1, 1)
    assert normal not in entry.hierarchy.annotations and tumor in entry.hierarchy.annotations
    assert [a.name for a in entry.hierarchy.annotations] == ["ZEUS Tumor", None, "ZEUS Normal"]
    assert len(qp.images) == 1 and project.updates[-1].created is False
    assert same_file_uri(entry.saved_with_uri[-1], slide.as_uri()) and entry.uri == "file:/Z:/wsi/a%20b.svs"
    assert list((tmp_path / "p").glob("project.qpproj.bak-*"))
    assert list((tmp_path / "p" / "data" / "1").glob("data.qpdata.bak-*"))  # backed up before the change


def test_backend_with_stand_in_rejects_a_size_mismatch(tmp_path: Path, stand_in_paquo: dict) -> None:
    from zeus_qupath.bridge.project_paquo import PaquoProject
    from zeus_qupath.errors import ProjectError

    with pytest.raises(ProjectError, match="QuPath reads 2220x2967 px"):
        PaquoProject(tmp_path / "p").add_or_update_image(tmp_path / "a.svs", _features(), width=100, height=100)


def test_backend_with_stand_in_finds_an_entry_the_annotator_relocated(tmp_path: Path, stand_in_paquo: dict) -> None:
    from zeus_qupath.bridge.project_paquo import PaquoProject

    slide = tmp_path / "slides" / "a.svs"
    uri_map = [(str(tmp_path / "slides"), "Z:\\wsi")]
    PaquoProject(tmp_path / "p").add_or_update_image(slide, _features(), width=2220, height=2967, uri_map=uri_map)
    (qp,) = stand_in_paquo.values()
    (entry,) = qp.images
    assert entry.metadata["zeus.uri"] == "file:/Z:/wsi/a.svs" and entry.metadata["zeus.slide"] == str(slide)
    entry.uri = "file:/C:/Users/ann/a.svs"  # QuPath rewrote it where the annotator found the image

    project = PaquoProject(tmp_path / "p")
    project.add_or_update_image(slide, _features(), width=2220, height=2967, uri_map=uri_map)
    assert len(qp.images) == 1 and project.updates[-1].created is False
    assert same_file_uri(entry.saved_with_uri[-1], slide.as_uri())  # worked on the local file
    assert entry.uri == "file:/C:/Users/ann/a.svs"  # and gave the annotator's URI back


def _tile_features(seed: int, n: int = 6, rows: int = 1) -> list[dict]:
    """ZEUS heatmap tiles as zeus segment --tiles writes them (zeus_qupath.heatmap): rows x n patches."""
    import numpy as np

    from zeus_qupath.heatmap import tile_collection
    from zeus_qupath.outputs import PatchScores

    coords = np.array([[112 * i, 112 * j] for j in range(rows) for i in range(n)], np.int64)
    values = np.random.default_rng(seed).normal(0, 0.1, (len(coords), 2)).astype(np.float32)
    scores = PatchScores(coords, values, ("normal", "tumor"), "tumor", 448, 112, 2220, 2967, 0.5)
    return tile_collection(scores)["features"]


def test_backend_with_stand_in_replaces_only_zeus_tiles(tmp_path: Path, stand_in_paquo: dict) -> None:
    from zeus_qupath.bridge.heatmap_tiles import ZEUS_TILES
    from zeus_qupath.bridge.project_paquo import PaquoProject

    slide = tmp_path / "slides" / "a.svs"
    first = _tile_features(1)
    PaquoProject(tmp_path / "p").add_or_update_image(slide, _features(), width=2220, height=2967, tiles=first)
    (qp,) = stand_in_paquo.values()
    (entry,) = qp.images
    hierarchy = entry.hierarchy
    assert [t.measurements for t in hierarchy.tiles] == [f["properties"]["measurements"] for f in first]
    assert json.loads((entry.entry_path / ZEUS_TILES).read_text(encoding="utf-8"))["features"] == first
    # another tool's tile (no ZEUS score) and the annotator's annotation stay whatever ZEUS does
    other = StandInTile(StandInJavaObject(Polygon([(0, 0), (50, 0), (50, 50), (0, 50)]), "tile",
                                          {"Tumor probability": 0.9}))
    hierarchy.detections.append(other)
    drawn = hierarchy.add_annotation(Polygon([(10, 10), (90, 10), (90, 90)]))

    second = _tile_features(2, n=4)
    batches = hierarchy.detection_batches
    PaquoProject(tmp_path / "p").add_or_update_image(slide, _features(), width=2220, height=2967, tiles=second)
    assert hierarchy.detection_batches == batches + 2  # one removal, one addition
    zeus = [t for t in hierarchy.tiles if t is not other]
    assert [t.measurements for t in zeus] == [f["properties"]["measurements"] for f in second]  # no duplicates
    assert other in hierarchy.tiles and drawn in hierarchy.annotations
    assert len(list(entry.entry_path.glob(f"{ZEUS_TILES}.bak-*"))) == 1

    PaquoProject(tmp_path / "p").add_or_update_image(slide, _features(), width=2220, height=2967)  # None: as is
    assert len(hierarchy.tiles) == len(second) + 1
    PaquoProject(tmp_path / "p").add_or_update_image(slide, _features(), width=2220, height=2967, tiles=[])
    assert hierarchy.tiles == [other] and drawn in hierarchy.annotations
    assert json.loads((entry.entry_path / ZEUS_TILES).read_text(encoding="utf-8"))["features"] == []
    backups = sorted(entry.entry_path.glob(f"{ZEUS_TILES}.bak-*"))  # within one second too: none overwritten
    assert [json.loads(b.read_text(encoding="utf-8"))["features"] for b in backups] == [first, second]
