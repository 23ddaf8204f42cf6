"""Cohorts: slide lists, manifests, per-slide state, resume after kill -9, broken slides, the summary."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import shape

from zeus_qupath.cli import main
from zeus_qupath.errors import SlideError, ZeusError
from zeus_qupath.outputs import PatchScores
from zeus_qupath.runs.discovery import collect_slides, read_manifest
from zeus_qupath.runs.state import StateStore


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three synthetic slides; the middle one is larger, so a run spends a while on it."""
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    d = tmp_path_factory.mktemp("cohort")
    (d / "slides").mkdir()
    sizes = {"a": (2560, 1792), "b": (6144, 4096), "c": (2560, 1792)}
    for i, (stem, (w, h)) in enumerate(sizes.items()):
        s = make_synthetic_slide(d / "slides" / f"{stem}.tif", w, h, seed=60 + i)
        for mask in (s.tumor_mask_path, s.tissue_mask_path):  # keep only the slides in the folder
            mask.rename(d / mask.name)
    return d


@pytest.fixture(scope="module")
def tiny_cli(tiny_model, spindle_prompts):
    return ["--model", f"open_clip:{tiny_model.config_path}", "--pretrained", str(tiny_model.checkpoint_path),
            "--prompts", str(spindle_prompts), "--device", "cpu", "--quiet"]


def check_outputs(out: Path, stem: str, size: tuple[int, int]) -> None:
    """Every output of a slide is complete and valid."""
    data = json.loads((out / f"{stem}.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    for feat in data["features"]:
        geom = shape(feat["geometry"])
        assert geom.is_valid and geom.area > 0
        minx, miny, maxx, maxy = geom.bounds
        assert minx >= 0 and miny >= 0 and maxx <= size[0] and maxy <= size[1]
    scores = PatchScores.load(out / f"{stem}.scores.npz")
    assert (scores.width, scores.height) == size and len(scores.coords) > 0 and np.isfinite(scores.scores).all()
    with Image.open(out / f"{stem}.overlay.png") as im:
        im.load()
        assert abs(im.width / im.height - size[0] / size[1]) < 0.01


def leftovers(out: Path) -> list[Path]:
    """Temporary files of interrupted writes anywhere in the output folder."""
    found = [p for p in out.iterdir() if p.name.startswith(".") and p.name not in (".state", ".cache")]
    found += [p for p in (out / ".state").iterdir() if p.name.startswith(".")] if (out / ".state").exists() else []
    found += list((out / ".cache").rglob(".*.tmp")) if (out / ".cache").exists() else []
    return found


@pytest.mark.slow
def test_kill_9_mid_cohort_then_resume(cohort, tiny_cli, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zeus_qupath", "segment", str(cohort / "slides"), *tiny_cli, "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while not (out / ".state" / "a.json").exists():
                assert proc.poll() is None, (tmp_path / "log.txt").read_text()
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)  # the first slide is done, the second is in progress
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = {p.stem for p in (out / ".state").glob("*.json")}
    assert "a" in done_before and len(done_before) < 3, done_before
    # what else a kill can leave (a write cut short: temporary files beside the outputs, the state, the cache)
    (out / ".b.scores.npz.k1ll3d.npz").write_bytes(b"PK\x03\x04 half")
    (out / ".state" / ".b.json.k1ll3d.json").write_text("{")
    host = socket.gethostname().replace(".", "_")
    cache_dir = out / ".cache" / "00"
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / f".x.npz.{host}.{proc.pid}.k1ll3d00.tmp").write_bytes(b"half")
    before = {s: (out / f"{s}.geojson").stat().st_mtime_ns for s in done_before}

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "run.json").read_text())
    status = {s["stem"]: s["status"] for s in run["slides"]}
    assert status == {s: "skipped" if s in done_before else "done" for s in "abc"}
    assert run["complete"] and run["summary"] == {"slides": 3, "done": 3 - len(done_before),
                                                  "skipped": len(done_before), "failed": 0}
    for s in done_before:
        assert (out / f"{s}.geojson").stat().st_mtime_ns == before[s]  # untouched
    assert "skipped" in res.stdout and "3 slides:" in res.stdout
    for stem, size in {"a": (2560, 1792), "b": (6144, 4096), "c": (2560, 1792)}.items():
        check_outputs(out, stem, size)
        assert StateStore(out).load(stem)["outputs"]["geojson"]["file"] == f"{stem}.geojson"
    assert leftovers(out) == []
    # a third run has nothing to do
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0 and "0 done, 3 skipped, 0 failed" in res.stdout


@pytest.mark.slow
def test_skip_errors_continues_and_reports(cohort, tiny_cli, tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    for stem in ("a", "c"):
        os.symlink(cohort / "slides" / f"{stem}.tif", slides / f"{stem}.tif")
    (slides / "broken.svs").write_bytes(b"II*\x00" + os.urandom(2000))
    out = tmp_path / "out"
    assert main(["segment", str(slides), *tiny_cli, "--out", str(out), "--skip-errors"]) == 1
    text = capsys.readouterr()
    row = next(line for line in text.out.splitlines() if line.startswith("broken"))
    assert "failed" in row and "broken.svs" in row
    assert "1 slide(s) failed" in text.err
    run = json.loads((out / "run.json").read_text())
    assert [f["stem"] for f in run["failed"]] == ["broken"] and run["failed"][0]["reason"]
    assert not run["complete"] and {s["stem"] for s in run["slides"]} == {"a", "c"}
    for stem in ("a", "c"):
        check_outputs(out, stem, (2560, 1792))
    assert not (out / "broken.geojson").exists() and not (out / ".state" / "broken.json").exists()
    # without --skip-errors the broken slide stops the run with its one-line error
    assert main(["segment", str(slides), *tiny_cli, "--out", str(out)]) == 2
    assert "broken.svs" in capsys.readouterr().err


@pytest.mark.slow
def test_tampered_output_is_redone_and_other_parameters_redo(cohort, tiny_cli, tmp_path, capsys):
    out = tmp_path / "out"
    a = str(cohort / "slides" / "a.tif")
    assert main(["segment", a, *tiny_cli, "--out", str(out)]) == 0
    capsys.readouterr()
    (out / "a.geojson").write_text('{"type": "FeatureCollection", "features": []}')  # edited by hand
    assert main(["segment", a, *tiny_cli, "--out", str(out)]) == 0
    assert "1 done, 0 skipped" in capsys.readouterr().out
    check_outputs(out, "a", (2560, 1792))
    assert main(["segment", a, *tiny_cli, "--out", str(out)]) == 0
    assert "0 done, 1 skipped" in capsys.readouterr().out
    assert main(["segment", a, *tiny_cli, "--out", str(out), "--min-area", "5000"]) == 0  # another parameter
    assert "1 done, 0 skipped" in capsys.readouterr().out
    assert main(["segment", a, *tiny_cli, "--out", str(out), "--min-area", "5000", "--redo"]) == 0
    assert "1 done, 0 skipped" in capsys.readouterr().out


def test_manifest_globs_and_slide_lists(cohort, tmp_path):
    slides = cohort / "slides"
    manifest = tmp_path / "m.csv"
    rel = os.path.relpath(slides / "b.tif", tmp_path)
    manifest.write_text(f"# cohort\nslide,mpp\n{rel},0.25\n{slides / 'a.tif'},\n\n")
    assert read_manifest(manifest) == [(tmp_path / rel, 0.25), (slides / "a.tif", None)]
    entries = collect_slides([str(slides / "c.tif"), str(slides / "[ab].tif")], str(manifest))
    assert [(e.stem, e.mpp) for e in entries] == [("c", None), ("a", None), ("b", 0.25)]
    assert [e.stem for e in collect_slides([str(slides)])] == ["a", "b", "c"]
    assert [e.path for e in collect_slides([str(cohort / "**" / "c.tif")])] == [str(slides / "c.tif")]
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.tif").write_bytes((slides / "a.tif").read_bytes())
    with pytest.raises(SlideError, match="same outputs a"):
        collect_slides([str(slides / "a.tif"), str(other / "a.tif")])
    with pytest.raises(SlideError, match="no slides match"):
        collect_slides([str(slides / "*.svs")])
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,mpp\na.tif,-1\n")
    with pytest.raises(ZeusError, match="line 2: mpp"):
        read_manifest(bad)
    bad.write_text("path\na.tif\n")
    with pytest.raises(ZeusError, match="'slide' column"):
        read_manifest(bad)


@pytest.mark.slow
def test_manifest_run_uses_its_pixel_sizes(cohort, tiny_cli, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide,mpp\n{cohort / 'slides' / 'a.tif'},0.8\n")
    out = tmp_path / "out"
    assert main(["segment", "--manifest", str(manifest), *tiny_cli, "--out", str(out)]) == 0
    assert PatchScores.load(out / "a.scores.npz").mpp == pytest.approx(0.8)
    assert main(["segment", *tiny_cli, "--out", str(out)]) == 2  # neither slides nor a manifest


def test_stale_temporaries_of_killed_writers_are_removed_live_ones_kept(tmp_path):
    from zeus_qupath.output_set import atomic_open, remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        target = tmp_path / "run.json"
        stale = tmp_path / f".run.json.{dead.pid}-abc.json"
        running = tmp_path / f".run.json.{live.pid}-def.json"
        other = tmp_path / f".other.json.{dead.pid}-ghi.json"
        for f in (stale, running, other):
            f.write_text("{}")
        assert remove_stale_temporaries(target) == 1
        assert not stale.exists() and running.exists() and other.exists()
        with atomic_open(target) as fh:  # our own temporary names carry our pid, so the rule finds them
            (name,) = [p.name for p in tmp_path.glob(f".run.json.{os.getpid()}-*")]
            fh.write("{}")
        assert name.endswith(".json") and target.read_text() == "{}"
    finally:
        live.kill()
        live.wait()
