"""The ZEUS extension in QuPath 0.4.4's real desktop window under Xvfb: one QuPath start, the whole walk.

QuPath 0.4.4's GUI (``../shared/qupath/gui-0.4.4``: the real qupath-gui-fx compiled from the tag, on Debian's
JavaFX 11; its README names the stand-ins) starts with the extension jar built from ``bridge/extension`` and a ZEUS
project written by ``zeus segment --project --tiles`` (the tiny test model, a synthetic slide as a plain RGB TIFF:
QuPath opens it with its ImageJ reader here). ``walk_startup.groovy`` drives Extensions > ZEUS through its menu
items and the Settings window, against a live ``zeus serve``; after each step it writes QuPath's state (hierarchy,
dialogs) and waits for this test's screenshot. Screenshots go to the pytest temp folder and, when
``ZEUS_GUI_SCREENSHOTS`` is set, are copied there (CI keeps them).

The independent references: the GeoJSON files ``zeus segment`` wrote, the service's own answer to the same
request, shapely geometry, and the files the export wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import shapely
from shapely import affinity
from shapely.geometry import shape

from zeus_qupath.bridge.service import ServiceConfig, make_server
from zeus_qupath.params import SegmentParams

from qupath.extension import build_extension, gui_dir
from qupath.fixtures import skip_or_fail
from qupath.harness import QuPathUnavailable, find_java, find_runtime

pytestmark = [pytest.mark.gui, pytest.mark.jvm, pytest.mark.slow]

TOKEN = "gui-walk-token-0123456789abcdef"
W, H, MPP = 2048, 1536, 0.5
WALK = Path(__file__).resolve().parent / "walk_startup.groovy"
STEPS = ("menu", "settings-wrong-token", "settings-connected", "import", "edit", "segment", "reimport",
         "segment-selected", "heatmap", "learn-refused", "export", "learn", "done")
HANG_S = 900  # a step that has not finished after this long never will (a hung window): fail, not wait forever
IMAGEJ_SERVER = "qupath.imagej.images.servers.ImageJServerBuilder"


def plain_rgb_tiff(tmp: Path) -> Path:
    """A synthetic slide as one plain RGB TIFF (QuPath's ImageJ reader opens it; no Bio-Formats here)."""
    import tifffile

    from zeus_qupath.samples.synthetic import make_synthetic_slide

    src = make_synthetic_slide(tmp / "src" / "case.tif", W, H, seed=5, mpp=MPP).path
    with tifffile.TiffFile(src) as tif:
        pixels = tif.series[0].levels[0].asarray()
    slide = tmp / "slides" / "case.tif"
    slide.parent.mkdir(parents=True)
    tifffile.imwrite(slide, pixels, photometric="rgb", resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
    return slide


def zeus_project(tmp: Path, slide: Path, tiny_model) -> Path:
    """``zeus segment --project --tiles`` on the slide; entries then point at QuPath's ImageJ reader (STAND-IN)."""
    project = tmp / "project"
    cmd = [str(Path(sys.executable).parent / "zeus"), "segment", str(slide), "--project", str(project),
           "--backend", "files", "--model", f"open_clip:{tiny_model.config_path}",
           "--pretrained", str(tiny_model.checkpoint_path), "--prompts", "spindle_cell", "--tissue", "coarse",
           "--tiles", "--device", "cpu", "--out", str(tmp / "zeus-out"), "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    qpproj = project / "project.qpproj"
    data = json.loads(qpproj.read_text(encoding="utf-8"))
    for entry in data["images"]:
        entry["serverBuilder"]["providerClassName"] = IMAGEJ_SERVER
        entry["serverBuilder"]["args"] = []
    qpproj.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return project


def java_launcher(tmp: Path) -> Path:
    """run-gui.sh's JAVA: QuPath on a Java 17+ runtime without the java.awt.geom.Area bug (harness.find_runtime),
    its SeedPrefs.java step on a JDK (source-file mode needs jdk.compiler, which a bare runtime lacks)."""
    runtime = find_runtime(17, tmp / "java-check") / "bin" / "java"
    jdk = find_java(17) / "bin" / "java"
    launcher = tmp / "java"
    launcher.write_text(f'#!/bin/sh\ncase "$*" in *SeedPrefs.java*) exec "{jdk}" "$@";; esac\nexec "{runtime}" "$@"\n')
    launcher.chmod(0o755)
    return launcher


def features(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["features"]


def geometry(a: dict):
    return shape(a["geometry"])


def same(a, b, rel: float = 1e-4) -> bool:
    return a.symmetric_difference(b).area <= rel * max(a.area, b.area)


@pytest.fixture(scope="module")
def walk(tmp_path_factory, tiny_model):
    """Runs the walk once; the states of its steps by name, the screenshots, the project and the service answer."""
    tmp = tmp_path_factory.mktemp("gui-walk")
    try:
        gui = gui_dir()
        launcher = java_launcher(tmp)
    except QuPathUnavailable as exc:
        skip_or_fail(str(exc))
    for tool in ("Xvfb", "import"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} not installed (Debian packages: {gui / 'apt-packages.txt'})")
    jar = build_extension(tmp)
    slide = plain_rgb_tiff(tmp)
    project = zeus_project(tmp, slide, tiny_model)

    config = ServiceConfig(port=0, token=TOKEN, roots=(str(slide.parent), str(project)),
                           model=f"open_clip:{tiny_model.config_path}",
                           pretrained=str(tiny_model.checkpoint_path), device="cpu",
                           params=SegmentParams(tissue="coarse"))
    server = make_server(config)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    refused = post_learn(server.url, project)  # before the export: nothing to learn from (the walk's step 9a)
    walk_dir, shots, xtmp = tmp / "walk", tmp / "screenshots", tmp / "x"
    for d in (walk_dir, shots, xtmp):
        d.mkdir()
    keep = os.environ.get("ZEUS_GUI_SCREENSHOTS")
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    env.update(JAVA=str(launcher), TMPDIR=str(xtmp), JAVA_OPTS=" ".join([
        f"-Dzeus.walk.dir={walk_dir}", f"-Dzeus.walk.url={server.url}", f"-Dzeus.walk.token={TOKEN}",
        f"-Dzeus.extension.events={tmp / 'events.jsonl'}", f"-XX:ErrorFile={tmp / 'hs_err_%p.log'}"]))
    log = (tmp / "qupath.log").open("wb")
    proc = subprocess.Popen([str(gui / "run-gui.sh"), "--home", str(tmp / "home"), "--extension", str(jar),
                             "--startup-script", str(WALK), "-p", str(project / "project.qpproj"), "-i", "case.tif"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    states: dict[str, dict] = {}
    try:
        for number, name in enumerate(STEPS, 1):
            base = f"{number:02d}-{name}"
            state_file = walk_dir / f"{base}.json"
            waited = 0.0
            while not state_file.exists():
                error = walk_dir / "walk-error.txt"
                log.flush()
                startup_failed = b"Error running startup.groovy" in (tmp / "qupath.log").read_bytes()
                if proc.poll() is not None or error.exists() or startup_failed or waited > HANG_S:
                    log.flush()
                    tail = (tmp / "qupath.log").read_text(errors="replace")[-4000:]
                    pytest.fail(f"the walk stopped before {base}: "
                                f"{error.read_text() if error.exists() else 'QuPath exited'}\n{tail}")
                time.sleep(0.2)
                waited += 0.2
            states[name] = json.loads(state_file.read_text(encoding="utf-8"))
            png = shots / f"{base}.png"
            subprocess.run([str(gui / "shot.sh"), str(png)], env=env, check=True, capture_output=True)
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                shutil.copy2(png, Path(keep) / png.name)
            (walk_dir / f"{base}.shot").touch()
        try:
            proc.wait(timeout=60)  # the walk ends QuPath itself
        except subprocess.TimeoutExpired:
            pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    req = urllib.request.Request(server.url + "/segment", data=json.dumps({"slide": str(slide)}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        answer = json.loads(resp.read())["features"]
    learned = post_learn(server.url, project)  # the same request as Learn's, after the walk: the same answer
    server.shutdown()
    server.server_close()
    return {"states": states, "shots": shots, "project": project, "answer": answer, "refused": refused,
            "learned": learned}


def post_learn(url: str, project: Path) -> tuple[int, dict]:
    """POST /learn for the project as the extension sends it: (status, JSON answer)."""
    req = urllib.request.Request(url + "/learn", data=json.dumps({"project": str(project)}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def zeus_annotations(state: dict) -> dict[str, dict]:
    return {a["id"]: a for a in state["annotations"] if a.get("name") == "ZEUS Tumor"}


def test_walk_in_the_qupath_window(walk):
    states, project = walk["states"], walk["project"]
    entry = project / "data" / "1"
    written = features(entry / "zeus_annotations.geojson")
    tiles = features(entry / "zeus_tiles.geojson")
    for name in STEPS:  # every step left a screenshot of the window
        assert any(p.name.endswith(f"-{name}.png") and p.stat().st_size > 10_000 for p in walk["shots"].iterdir())

    # the menu: every item, Learn disabled with its reason until the connection check (then offered: POST /learn)
    items = {i["id"]: i for i in states["menu"]["items"]}
    assert set(items) == {"zeus-segment-image", "zeus-segment-selected", "zeus-import", "zeus-heatmap", "zeus-export",
                          "zeus-learn", "zeus-settings"}
    assert items["zeus-segment-image"]["text"] == "Segment current image"
    assert not items["zeus-segment-image"]["disabled"]
    assert items["zeus-learn"]["disabled"]

    # the connection check says what is wrong, then that it is connected with the same API
    assert "wrong token" in states["settings-wrong-token"]["result"], states["settings-wrong-token"]["result"]
    connected = states["settings-connected"]
    assert connected["result"].startswith("OK: Connected: zeus-qupath ") and "(API 1)" in connected["result"]
    assert not connected["learn"]["disabled"] and connected["learn"]["text"] == "Learn from this project's corrections"

    # Import: QuPath holds exactly what zeus segment wrote, and the heatmap tiles
    imported = zeus_annotations(states["import"])
    assert states["import"]["event"]["ok"], states["import"]["event"]
    assert sorted(imported) == sorted(f["id"] for f in written)
    for f in written:
        assert same(geometry(imported[f["id"]]), shape(f["geometry"]))
    assert states["import"]["tiles"] == len(tiles) > 0

    # the annotator's edit, then Segment current image against the live service
    moved_id = states["edit"]["moved"]
    moved = geometry(zeus_annotations(states["edit"])[moved_id])
    assert same(moved, affinity.translate(geometry(imported[moved_id]), 40, 0))
    seg = states["segment"]
    assert seg["event"]["ok"], seg["event"]
    after = zeus_annotations(seg)
    assert same(geometry(after[moved_id]), moved)  # the edited annotation is kept as edited
    expected = [f for f in walk["answer"]
                if f["id"] != moved_id and shape(f["geometry"]).intersection(moved).area <= 1.0]
    others = [geometry(a) for i, a in after.items() if i != moved_id]
    assert len(others) == len(expected)  # the service's answer, less what overlaps the edit
    assert same(shapely.union_all(others), shapely.union_all([shape(f["geometry"]) for f in expected]))

    # a second import changes nothing: the edit survives, nothing is doubled
    again = zeus_annotations(states["reimport"])
    assert states["reimport"]["event"]["ok"]
    assert sorted(again) == sorted(after)
    assert same(geometry(again[moved_id]), moved)

    # Segment selected annotation(s): new outlines inside the annotator's rectangle, which stays; the edit stays
    sel = states["segment-selected"]
    assert sel["event"]["ok"], sel["event"]
    rect = next(geometry(a) for a in sel["annotations"] if a["id"] == sel["rectangle"])
    inside = {i: geometry(a) for i, a in zeus_annotations(sel).items() if i not in again}
    assert inside and all(g.difference(rect).area <= 1.0 for g in inside.values()), sel["event"]
    assert same(geometry(zeus_annotations(sel)[moved_id]), moved)

    # the heatmap: the measurement map opened on the ZEUS score
    heat = states["heatmap"]
    assert heat["event"]["ok"], heat["event"]
    assert heat["maps"] == {"open": True, "selected": "ZEUS score: Tumor", "fillDetections": True}
    assert heat["tiles"] == len(tiles) and "ZEUS score: Tumor" in heat["scoreMeasurements"]

    # the export: labels.json and the image's GeoJSON, with the annotator's edit in it
    assert states["export"]["event"]["ok"], states["export"]["event"]
    export = project / "export"
    labels = json.loads((export / "labels.json").read_text(encoding="utf-8"))
    assert "Tumor" in json.dumps(labels)
    exported = {f["id"]: shape(f["geometry"]) for f in features(export / "case.tif.geojson")}
    assert (export / "case.tif-labels.png").is_file()
    assert same(exported[moved_id], moved)

    # Learn before the export: the service's refusal, its one line as is, no result window
    status, reference = walk["refused"]
    assert status == 422 and "no QuPath export found" in reference["error"], reference
    assert states["learn-refused"]["event"] == {"action": "learn", "ok": False, "message": reference["error"]}
    assert states["learn-refused"]["dialog"] is False

    # Learn: the service's answer shown as is (a refusal's error line; a result's message, adapter, monospace table)
    # (the same request after the walk is the reference: learning is deterministic, the adapter's name its hash)
    learn, (status, reference) = states["learn"], walk["learned"]
    assert status == 200 and learn["event"]["ok"], (status, reference, learn["event"])
    dialog = learn["dialog"]
    assert dialog["message"] == reference["message"] and reference["table"].strip() in dialog["text"]
    assert "mono" in dialog["font"].lower(), dialog["font"]
    adapters = sorted((project / "zeus").glob("adapter-*.npz"))
    if reference["written"]:
        assert dialog["headline"] == f"Adapter written: {reference['adapter']}"
        assert adapters == [Path(reference["adapter"])]
    else:  # not better than zero-shot in cross-validation: a result, nothing written
        assert dialog["headline"].startswith("The adapter was not written: it was not better than zero-shot")
        assert adapters == []
