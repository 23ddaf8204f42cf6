"""What zeus-qupath writes, and nothing lost where runs, people and files collide (issue 16).

One output contract (outputs.py: run.json as a typed record, every output of a slide listed, tiles
included), one set writer (output_set.OutputSet: pid-named staging, dead writers' leftovers removed), a
slide's identity in an output folder (path and content, not stem), projects under one lock, export
never writing over its inputs, one identity check for the service's memory tier.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zeus_qupath.cli import main
from zeus_qupath.errors import ZeusError
from zeus_qupath.output_set import STAGING_PREFIX, OutputSet
from zeus_qupath.outputs import PatchScores, RunRecord, SlideReport, output_paths, read_run_record


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _scores(slide_name: str, width: int = 64, height: int = 48) -> PatchScores:
    coords = np.array([[0, 0], [32, 0], [0, 16], [32, 16]], dtype=np.int64)
    values = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]], dtype=np.float32)
    return PatchScores(coords=coords, scores=values, classes=("Tumor", "Normal"), positive_class="Tumor",
                       patch_size=32, stride=16, width=width, height=height, mpp=0.5, meta={"slide": slide_name})


# ------------------------------------------------------------------------------------------ the records


def test_output_paths_list_the_tiles_with_tiles():
    assert set(output_paths("o", "s")) == {"geojson", "scores", "overlay"}
    assert output_paths("o", "s", tiles=True)["tiles"] == str(Path("o") / "s.tiles.geojson")


def test_run_record_round_trip_keeps_unknown_fields_and_refuses_wrong_types(tmp_path):
    report = {"slide": "/data/a.svs", "stem": "a", "width": 100, "height": 80, "mpp": 0.5, "patches": 3,
              "tissue_fraction": 0.5, "regions": 1, "tumor_area_um2": 2.0, "seconds": {"total": 1.0},
              "patches_per_s": 3.0, "outputs": {"geojson": "/o/a.geojson"}, "status": "done"}
    data = {"command": "segment", "model": {"spec": "keep"}, "versions": {"zeus-qupath": "9"},
            "prompts": {"file": "p/x.json"}, "slides": [report], "sampling": "exact",
            "adapter": {"sha256": "ab"}, "a_later_field": [1, 2]}
    (tmp_path / "run.json").write_text(json.dumps(data))
    record = read_run_record(tmp_path)
    assert isinstance(record, RunRecord) and isinstance(record.slides[0], SlideReport)
    assert (record.model_spec, record.prompt_file, record.zeus_version) == ("keep", "p/x.json", "9")
    assert record.slides[0].width == 100 and record.slide("a") is record.slides[0]
    again = record.to_dict()
    assert again["a_later_field"] == [1, 2] and again["adapter"] == {"sha256": "ab"} and again["sampling"] == "exact"
    assert again["slides"][0]["outputs"] == report["outputs"]
    (tmp_path / "run.json").write_text(json.dumps({**data, "model": "keep"}))
    with pytest.raises(ZeusError, match="'model' is not a dict"):
        read_run_record(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({**data, "slides": [{**report, "width": "wide"}]}))
    with pytest.raises(ZeusError, match="has no width/height"):
        read_run_record(tmp_path)


# ------------------------------------------------------------------------------------------ one set writer


def test_output_set_names_staging_with_the_pid_and_refuses_a_missing_member(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(FileNotFoundError, match="output not written"), OutputSet(tmp_path) as out:
        staging = out.path("a.txt").parent
        assert staging.name.startswith(f"{STAGING_PREFIX}{os.getpid()}-")
        out.path("a.txt").write_text("new")
        out.path("b.txt")  # asked for, never written: the set is incomplete
    assert (tmp_path / "a.txt").read_text() == "old" and not (tmp_path / "b.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_output_set_removes_dead_writers_staging_keeps_live_ones(tmp_path):
    dead = tmp_path / f"{STAGING_PREFIX}{_dead_pid()}-x"
    live = tmp_path / f"{STAGING_PREFIX}{os.getppid()}-y"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "half.geojson").write_text("{")
    with OutputSet(tmp_path) as out:
        out.path("sub/one.txt").write_text("1")  # a relative path: written with the rest of the set
    assert (tmp_path / "sub" / "one.txt").read_text() == "1"
    assert not dead.exists() and live.exists()


def test_a_retired_output_goes_with_the_set_and_stays_when_the_set_fails(tmp_path):
    (tmp_path / "s.tiles.geojson").write_text("old")
    with pytest.raises(RuntimeError), OutputSet(tmp_path) as out:
        out.retire("s.tiles.geojson")
        out.path("s.geojson").write_text("new")
        raise RuntimeError("the writer failed")
    assert (tmp_path / "s.tiles.geojson").read_text() == "old" and not (tmp_path / "s.geojson").exists()
    with OutputSet(tmp_path) as out:
        out.retire("s.tiles.geojson")
        out.path("s.geojson").write_text("new")
    assert not (tmp_path / "s.tiles.geojson").exists() and (tmp_path / "s.geojson").read_text() == "new"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_polygons_tiles_cleans_what_a_killed_run_left_and_writes_both(tmp_path):
    scores_path = tmp_path / "s.scores.npz"
    _scores("s.png").save(scores_path)
    pid = _dead_pid()
    leftovers = [tmp_path / f"{STAGING_PREFIX}{pid}-q", tmp_path / f".s.tiles.geojson.{pid}-z.geojson"]
    leftovers[0].mkdir()
    leftovers[1].write_text("{")
    assert main(["polygons", str(scores_path), "--tiles"]) == 0
    assert json.loads((tmp_path / "s.tiles.geojson").read_text())["type"] == "FeatureCollection"
    assert json.loads((tmp_path / "s.geojson").read_text())["type"] == "FeatureCollection"
    assert not leftovers[0].exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def two_slides_one_stem(tmp_path_factory):
    """``a/s.tif`` and ``b/s.tif``: two different slides with one output stem."""
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("stems")
    for i, folder in enumerate(("a", "b")):
        (root / folder).mkdir()
        s = make_synthetic_slide(root / folder / "s.tif", 2560, 1792, seed=70 + i)
        for mask in (s.tumor_mask_path, s.tissue_mask_path):
            mask.unlink()
    return root


@pytest.fixture(scope="module")
def tiny_cli(tiny_model, spindle_prompts):
    return ["--model", f"open_clip:{tiny_model.config_path}", "--pretrained", str(tiny_model.checkpoint_path),
            "--prompts", str(spindle_prompts), "--device", "cpu", "--quiet", "--tissue", "coarse"]


@pytest.mark.slow
def test_tiles_run_resumes_and_a_taken_stem_is_refused(two_slides_one_stem, tiny_cli, tmp_path, capsys):
    from zeus_qupath.bridge.publish import items_from_outputs

    out = tmp_path / "out"
    first = str(two_slides_one_stem / "a" / "s.tif")
    assert main(["segment", first, *tiny_cli, "--tiles", "--out", str(out)]) == 0
    written = {p.name: _sha(p) for p in out.iterdir() if p.is_file()}
    assert {"s.geojson", "s.scores.npz", "s.overlay.png", "s.tiles.geojson", "run.json"} <= set(written)

    capsys.readouterr()
    assert main(["segment", first, *tiny_cli, "--tiles", "--out", str(out)]) == 0  # the same run again
    record = read_run_record(out)
    assert [r.status for r in record.slides] == ["skipped"]
    assert record.slides[0].outputs["tiles"] == str(out / "s.tiles.geojson")
    (item,) = items_from_outputs([out])
    assert item.tiles_path is not None and Path(item.tiles_path).name == "s.tiles.geojson"  # not "clear the heatmap"

    second = str(two_slides_one_stem / "b" / "s.tif")  # another slide whose outputs would be s.*
    for extra in ([], ["--redo"]):
        capsys.readouterr()
        assert main(["segment", second, *tiny_cli, "--tiles", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds the outputs of another slide" in err[0] and "a/s.tif" in err[0]
        assert {p.name: _sha(p) for p in out.iterdir() if p.is_file() and p.name != "run.json"} == \
            {k: v for k, v in written.items() if k != "run.json"}
    assert read_run_record(out).slides[0].slide == str(Path(first).resolve())

    # the same slide again without --tiles (redone): the tiles of the run before would no longer match
    assert main(["segment", first, *tiny_cli, "--out", str(out), "--redo"]) == 0
    assert not (out / "s.tiles.geojson").exists() and "tiles" not in read_run_record(out).slides[0].outputs
    (item,) = items_from_outputs([out])
    assert item.tiles_path is None


@pytest.mark.slow
def test_a_second_run_into_the_folder_keeps_the_first_runs_slides(two_slides_one_stem, tiny_cli, spindle_prompts,
                                                                   tmp_path):
    """run.json lists every slide the folder holds, each with the run that segmented it; publish finds them all."""
    from zeus_qupath.bridge.publish import items_from_outputs

    out = tmp_path / "out"
    slides = {}
    for name in ("first", "second", "third"):
        slides[name] = tmp_path / f"{name}.tif"
        shutil.copy(two_slides_one_stem / ("a" if name != "second" else "b") / "s.tif", slides[name])
    other = tmp_path / "other_prompts.json"
    shutil.copy(spindle_prompts, other)
    args = [a for a in tiny_cli]
    args[args.index("--prompts") + 1] = str(other)
    assert main(["segment", str(slides["first"]), str(slides["third"]), *tiny_cli, "--out", str(out)]) == 0
    assert main(["segment", str(slides["second"]), *args, "--out", str(out)]) == 0
    record = read_run_record(out)
    assert [r.stem for r in record.slides] == ["second"] and record.summary["slides"] == 1
    assert [[r.stem for r in e.slides] for e in record.earlier] == [["first", "third"]]
    assert record.earlier[0].prompt_file != record.prompt_file
    items = {Path(i.slide_path).name: i for i in items_from_outputs([out])}
    assert set(items) == {"first.tif", "second.tif", "third.tif"}
    assert items["first.tif"].prompts == Path(str(spindle_prompts)).stem
    assert items["second.tif"].prompts == "other_prompts"

    # the third again, with the second run's prompts: it moves to this run; a slide whose polygons are gone is dropped
    (out / "first.geojson").unlink()
    assert main(["segment", str(slides["third"]), *args, "--out", str(out)]) == 0
    record = read_run_record(out)
    assert [r.stem for r in record.slides] == ["third"]
    assert [[r.stem for r in e.slides] for e in record.earlier] == [["second"]]
    assert {Path(i.slide_path).name for i in items_from_outputs([out])} == {"second.tif", "third.tif"}


# ------------------------------------------------------------------------------------------ projects


def _result_folder(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    Image.new("RGB", (64, 48), "white").save(folder / f"{name}.png")
    _scores(f"{name}.png").save(folder / f"{name}.scores.npz")
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [30, 1], [30, 20], [1, 1]]]},
               "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}
    (folder / f"{name}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return folder


def _add(project: str, folder: str) -> None:
    from zeus_qupath.bridge.publish import publish_outputs

    publish_outputs(project, [folder], backend="files")


def test_concurrent_project_writers_all_land(tmp_path):
    folders = [str(_result_folder(tmp_path, f"slide{i}")) for i in range(2)]
    ctx = multiprocessing.get_context("fork")
    for attempt in range(20):
        project = str(tmp_path / f"project{attempt}")
        procs = [ctx.Process(target=_add, args=(project, f)) for f in folders]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0]
        data = json.loads((Path(project) / "project.qpproj").read_text())
        names = sorted(e["imageName"] for e in data["images"])
        ids = sorted(str(e["entryID"]) for e in data["images"])
        assert names == ["slide0.png", "slide1.png"], f"attempt {attempt}: {names}"
        assert len(set(ids)) == 2
        for entry_id in ids:
            assert (Path(project) / "data" / entry_id / "zeus_annotations.geojson").is_file()


def _add_noting(project: str, folder: str, log: str) -> None:
    import sys

    with open(log, "w") as sys.stderr:
        _add(project, folder)


def test_a_waiting_project_writer_says_so_then_lands(tmp_path, monkeypatch):
    """A writer that finds the project locked says why it waits (one line), and lands once the lock is free."""
    import time

    from zeus_qupath.bridge import project as project_module

    monkeypatch.setattr(project_module, "LOCK_NOTICE_S", 0.2)
    folder = str(_result_folder(tmp_path, "slide0"))
    project, log = tmp_path / "project", tmp_path / "waiting.log"
    with project_module.project_lock(project):
        child = multiprocessing.get_context("fork").Process(target=_add_noting, args=(str(project), folder, str(log)))
        child.start()
        for _ in range(600):  # until the child says it waits (it cannot finish while the lock is held)
            if log.exists() and "waiting for it" in log.read_text():
                break
            time.sleep(0.05)
        assert child.is_alive() and not (project / "project.qpproj").exists()
    child.join(60)
    assert child.exitcode == 0
    lines = log.read_text().strip().splitlines()
    assert lines == [f"zeus: another zeus writer is changing the QuPath project {project}; waiting for it"]
    names = [e["imageName"] for e in json.loads((project / "project.qpproj").read_text())["images"]]
    assert names == ["slide0.png"]


def test_duplicate_entry_ids_are_refused_before_anything_changes(tmp_path, capsys):
    folder = _result_folder(tmp_path, "slide0")
    project = tmp_path / "project"
    assert main(["project", "add", str(project), str(folder), "--backend", "files"]) == 0
    qpproj = project / "project.qpproj"
    data = json.loads(qpproj.read_text())
    data["images"].append({**data["images"][0], "imageName": "copy.png"})  # same entryID twice
    qpproj.write_text(json.dumps(data))
    before = _sha(qpproj)
    capsys.readouterr()
    assert main(["project", "add", str(project), str(folder), "--backend", "files"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "two entries have the ID" in err[0]
    assert _sha(qpproj) == before


# ------------------------------------------------------------------------------------------ export


def test_export_never_writes_over_its_originals(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    zeus = _result_folder(runs, "case1")
    exported = tmp_path / "exported"
    exported.mkdir()
    shutil.copy(zeus / "case1.geojson", exported / "case1.png.geojson")
    before = {p.name: _sha(p) for p in zeus.iterdir()}
    for out in (zeus, runs):  # --out is, or contains, --originals
        capsys.readouterr()
        assert main(["export", str(exported), "--originals", str(zeus), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--originals" in err[0]
    assert {p.name: _sha(p) for p in zeus.iterdir()} == before
    assert main(["export", str(exported), "--originals", str(zeus), "--out", str(tmp_path / "x")]) == 0


def test_export_removes_what_a_killed_export_left(tmp_path):
    exported = tmp_path / "exported"
    exported.mkdir()
    shutil.copy(_result_folder(tmp_path, "case1") / "case1.geojson", exported / "case1.geojson")
    out = tmp_path / "out"
    out.mkdir()
    left = out / f"{STAGING_PREFIX}{_dead_pid()}-k"
    left.mkdir()
    (left / "case1.labels.png").write_bytes(b"\x89PNG")
    assert main(["export", str(exported), "--out", str(out)]) == 0
    assert not left.exists() and (out / "corrections.csv").is_file()


# ------------------------------------------------------------------------------------------ the service


def test_service_memory_tier_sees_an_in_place_edit(tmp_path):
    from zeus_qupath.on_demand import OnDemandSegmenter
    from zeus_qupath.params import SegmentParams

    slide = tmp_path / "s.png"
    Image.new("RGB", (64, 48), "white").save(slide)
    segmenter = OnDemandSegmenter(SegmentParams(), cache=None, models=None)  # type: ignore[arg-type]
    first, _ = segmenter.slide_identity(slide)
    st = slide.stat()
    data = bytearray(slide.read_bytes())
    data[-1] ^= 0xFF  # same size; mtime set back below: only the ctime says the file changed
    slide.write_bytes(bytes(data))
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert slide.stat().st_size == st.st_size and slide.stat().st_mtime_ns == st.st_mtime_ns
    second, _ = segmenter.slide_identity(slide)
    assert second != first  # the CLI's check (identity.StatGuard) would hash it again too


# ------------------------------------------------------------------------------------------ evaluate


def _square_geojson(path: Path, x: float, y: float, side: float, collection: bool = False) -> Path:
    ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
    geom = {"type": "Polygon", "coordinates": [ring]}
    if collection:
        geom = {"type": "GeometryCollection", "geometries": [geom, {"type": "LineString", "coordinates": ring[:2]}]}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": geom, "properties": {"objectType": "annotation"}}]}))
    return path


def test_evaluate_geojson_pairs_exactly_on_a_large_slide(tmp_path, capsys):
    # two disjoint 10 px squares on a 100,000 px slide: Dice 0 (a 4,096 px raster made both vanish: Dice 1)
    a = _square_geojson(tmp_path / "a.geojson", 100, 100, 10)
    b = _square_geojson(tmp_path / "b.geojson", 5000, 5000, 10)
    assert main(["evaluate", str(a), str(b), "--size", "100000,100000"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dice"] == 0.0 and result["fp"] == 100 and result["fn"] == 100
    # half-overlapping 10 px squares: intersection 50 px^2, Dice 2*50 / (100 + 100) = 0.5, by hand
    c = _square_geojson(tmp_path / "c.geojson", 105, 100, 10)
    assert main(["evaluate", str(a), str(c), "--size", "100000,100000"]) == 0
    assert json.loads(capsys.readouterr().out)["dice"] == pytest.approx(0.5)
    # a GeometryCollection's polygon counts (as export counts it): the same square, Dice 1
    d = _square_geojson(tmp_path / "d.geojson", 100, 100, 10, collection=True)
    assert main(["evaluate", str(a), str(d), "--size", "100000,100000"]) == 0
    assert json.loads(capsys.readouterr().out)["dice"] == pytest.approx(1.0)


def test_evaluate_refuses_a_mask_of_another_aspect(tmp_path, capsys):
    gt = _square_geojson(tmp_path / "gt.geojson", 0, 0, 500)
    mask = np.zeros((100, 100), np.uint8)  # square mask, 1000 x 500 slide
    mask[:, :50] = 1
    Image.fromarray(mask * 255).save(tmp_path / "pred.png")
    assert main(["evaluate", str(tmp_path / "pred.png"), str(gt), "--size", "1000,500"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aspect" in err[0]
    Image.fromarray(np.repeat(mask, 1, axis=0)[:50] * 255).save(tmp_path / "pred2.png")  # 100 x 50: right aspect
    assert main(["evaluate", str(tmp_path / "pred2.png"), str(gt), "--size", "1000,500"]) == 0
    assert json.loads(capsys.readouterr().out)["dice"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ slides whose header lies


@pytest.mark.parametrize("side", [200_000, 40_000])
def test_a_tiff_declaring_more_than_it_holds_is_refused_when_opened(tmp_path, capsys, side):
    import tifffile

    from zeus_qupath.errors import SlideError
    from zeus_qupath.slide import Slide

    path = tmp_path / "liar.tif"  # a 512 px image in 4 tiles whose header then declares side x side px
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb",
                     compression="zlib")
    with tifffile.TiffFile(path) as tf:
        where = [tf.pages[0].tags[name].valueoffset for name in ("ImageWidth", "ImageLength")]
    with open(path, "r+b") as fh:
        for offset in where:
            fh.seek(offset)
            fh.write(side.to_bytes(4, "little"))
    assert path.stat().st_size < 2000
    with pytest.raises(SlideError, match="crafted"):
        Slide(path)
    gt = _square_geojson(tmp_path / "gt.geojson", 0, 0, 10)
    assert main(["evaluate", str(gt), str(gt), "--slide", str(path)]) == 2  # the slide is opened for its size
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "declares" in err[0] and "crafted" in err[0]


def test_real_and_synthetic_slides_pass_the_header_check(tmp_path):
    from zeus_qupath.samples.synthetic import make_synthetic_slide
    from zeus_qupath.slide import check_tiff_tables

    s = make_synthetic_slide(tmp_path / "syn.tif", 2560, 1792, seed=3)
    for path in [s.path, *Path(__file__).parent.joinpath("data", "wsi").iterdir()]:
        check_tiff_tables(Path(path))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_a_device_or_a_link_loop_is_refused_in_one_line(tmp_path):
    from zeus_qupath.errors import SlideError
    from zeus_qupath.identity import file_fingerprint
    from zeus_qupath.runs.discovery import collect_slides
    from zeus_qupath.slide import Slide

    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.svs"
    loop.symlink_to(loop)
    for path, needle in ((fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                         (loop, "link loop")):
        with pytest.raises(SlideError, match=needle):
            collect_slides([str(path)])
        with pytest.raises(SlideError, match=needle):
            Slide(path)
    with pytest.raises(SlideError, match="not a regular file"):
        file_fingerprint(fifo)  # never read: reading a FIFO blocks


# ------------------------------------------------------------------------------------------ smaller cases


def _one_error(capsys, argv: list[str], needle: str, code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zeus: error:") and needle in err[0], err
    return err[0]


def test_a_prompt_key_given_twice_is_refused(tmp_path):
    from zeus_qupath.errors import PromptError
    from zeus_qupath.prompts import load_prompts

    path = tmp_path / "p.json"  # json keeps the second "templates" silently; the first list would be lost
    path.write_text('{"0": {"classnames": {"Tumor": ["tumor"], "Normal": ["normal"]}, '
                    '"templates": ["a CLASSNAME"], "templates": ["b CLASSNAME"], "positive_class": "Tumor"}}')
    with pytest.raises(PromptError, match="'templates' appears twice"):
        load_prompts(path)


def test_classes_differing_only_in_case_are_refused(tmp_path):
    from zeus_qupath.errors import PromptError
    from zeus_qupath.heatmap import tile_collection
    from zeus_qupath.prompts import load_prompts

    path = tmp_path / "p.json"
    path.write_text(json.dumps({"0": {"classnames": {"tumor": ["tumor"], "Tumor": ["cancer"], "Normal": ["n"]},
                                      "templates": ["a CLASSNAME"], "positive_class": "Tumor"}}))
    with pytest.raises(PromptError, match="differ only in case"):
        load_prompts(path)
    s = _scores("s.png")
    s = PatchScores(coords=s.coords, scores=np.column_stack([s.scores, s.scores[:, :1]]),
                    classes=("Tumor", "Normal", "tumor"), positive_class="Tumor", patch_size=32, stride=16,
                    width=64, height=48, mpp=0.5)
    with pytest.raises(ZeusError, match="share the tile measurement"):  # one score per tile would be lost
        tile_collection(s)


def test_export_with_an_absurd_downsample_is_one_line(tmp_path, capsys):
    exported = tmp_path / "exported"
    exported.mkdir()
    shutil.copy(_result_folder(tmp_path, "case1") / "case1.geojson", exported / "case1.geojson")
    _one_error(capsys, ["export", str(exported), "--out", str(tmp_path / "o"), "--downsample", "1e-300"],
               "choose a larger --downsample")
    assert not (tmp_path / "o").exists()


def test_a_plain_text_scores_file_gets_no_pickle_advice(tmp_path, capsys):
    path = tmp_path / "s.scores.npz"
    path.write_text("coords,scores\n1,2\n")
    line = _one_error(capsys, ["polygons", str(path)], "not a scores file")
    assert "pickle" not in line


def test_debug_keeps_the_exit_status(tmp_path, capsys):
    missing = str(tmp_path / "none.scores.npz")
    assert main(["polygons", missing]) == 2
    capsys.readouterr()
    assert main(["polygons", missing, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("zeus: error: scores file not found")


def test_a_name_too_long_for_the_file_system_is_a_400_not_a_500(tmp_path):
    from zeus_qupath.bridge.sandbox import Roots
    from zeus_qupath.bridge.service_schema import RequestError

    roots = Roots([str(tmp_path)])
    with pytest.raises(RequestError) as info:
        roots.check(str(tmp_path / ("a" * 5000 + ".svs")), "slide")
    assert info.value.status == 400 and "not a usable path" in str(info.value)


# ------------------------------------------------------------------------------------------ the command line


def _subparser(name: str):
    import argparse

    from zeus_qupath.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_segment_and_serve_share_one_definition_of_their_common_options(capsys):
    seg, serve = ({a.dest: a for a in _subparser(n)._actions} for n in ("segment", "serve"))
    for dest in ("patch_size", "stride", "target_mpp", "tissue", "device", "precision", "batch_size"):
        a, b = seg[dest], serve[dest]
        assert (a.type, a.default, a.choices, a.help) == (b.type, b.default, b.choices, b.help), dest
    # the same value is refused by both, in the same words (serve took patch sizes up to 2^31 before)
    for command in (["segment", "s.svs"], ["serve", "--root", "."]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--patch-size", "20000"])
        assert info.value.code == 2 and "[1, 16384]" in capsys.readouterr().err
    help_text = _subparser("segment").format_help()
    for shown in ("default: 448", "default: 112", "default: auto", "default: 64"):
        assert shown in " ".join(help_text.split()), shown


def test_models_lists_the_default_first_and_how_to_get_missing_weights(capsys, monkeypatch):
    from zeus_qupath.models import PRESETS, availability
    from zeus_qupath.params import DEFAULT_MODEL

    monkeypatch.setattr(availability, "_cached", lambda repo, filename: False)  # no weights here
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(f"{DEFAULT_MODEL} (default)")
    assert f"`hf download {PRESETS[DEFAULT_MODEL].hf_repo}`" in "\n".join(lines)


def test_a_full_disk_names_the_output_folder(tmp_path):
    import errno

    from zeus_qupath.console import os_error_line
    from zeus_qupath.output_set import atomic_path

    out = tmp_path / "out"
    with pytest.raises(OSError) as info, OutputSet(out) as staged:
        staged.path("a.txt").write_text("a")
        raise OSError(errno.ENOSPC, "No space left on device")  # as a zip or PNG writer raises it: no file name
    assert os_error_line(info.value) == f"no space left on device ({out})"
    with pytest.raises(OSError) as info, OutputSet(out) as staged, atomic_path(staged.path("b.npz")):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert os_error_line(info.value) == f"no space left on device ({out / 'b.npz'})"
    assert not out.exists()
