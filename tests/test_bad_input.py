"""Hostile and odd input (issue 10): one line on stderr, exit code 2, nothing new written, never a wrong answer.

Every case of the issue's list has a test here. Each one asserts the exit code, the number of stderr
lines and that no output appeared (or, for what used to give a silently wrong result, the right result).
Cases that only show in a separate process (tracebacks printed while the interpreter shuts down, a full
disk, two runs at once) run ``python -m zeus_qupath`` in a subprocess.
"""

from __future__ import annotations

import base64
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from zeus_qupath.cli import main
from zeus_qupath.outputs import PatchScores

OUTPUT_SUFFIXES = (".geojson", ".npz", ".png", ".csv", ".json")


@pytest.fixture(scope="module")
def tiny_args(tiny_model, spindle_prompts):
    return ["--model", f"open_clip:{tiny_model.config_path}", "--pretrained", str(tiny_model.checkpoint_path),
            "--prompts", str(spindle_prompts), "--device", "cpu", "--quiet"]


def run_cli(*args: str, preexec=None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeus_qupath", *args], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


def err_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def outputs_in(folder: Path) -> list[Path]:
    """Output files (and leftover temporary files) anywhere under ``folder``."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and (p.suffix in OUTPUT_SUFFIXES or ".tmp" in p.name)
                  and "fingerprints" not in p.parts and not p.name.endswith(".lock"))


def one_error(rc: int, err: str, needle: str) -> None:
    lines = err_lines(err)
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("zeus") and "error" in lines[0] and needle in lines[0], err


def cli_one_error(capsys, argv: list[str], needle: str) -> None:
    """Run ``zeus argv`` in this process; it must fail with one stderr line containing ``needle``, exit 2."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    one_error(rc, capsys.readouterr().err, needle)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    return make_synthetic_slide(tmp_path_factory.mktemp("slide") / "syn.tif", 2560, 1792, seed=3).path


def save_scores(path: Path, *, coords=None, scores=None, classes=("normal", "tumor"), width=1000, height=800,
                meta="{}", stride=112, patch=448) -> Path:
    """A scores file written by hand (np.savez), so that it can hold what PatchScores would refuse."""
    coords = np.array([[0, 0], [112, 0], [0, 112]] if coords is None else coords, dtype=np.int64)
    if scores is None:
        scores = np.tile(np.array([[0.1, 0.2]], np.float32), (len(coords), 1))[:, : len(classes)]
    np.savez_compressed(path, coords=coords, scores=np.asarray(scores, np.float32), classes=np.array(classes),
                        positive_class=np.array(classes[-1]), patch_size=np.array(patch), stride=np.array(stride),
                        width=np.array(width), height=np.array(height), mpp=np.array(0.5), meta=np.array(meta))
    return path


# ------------------------------------------------------------------ silent wrong results


def test_open_clip_config_without_weights_is_refused(tmp_path, capsys, tiny_model, spindle_prompts, slide):
    out = tmp_path / "out"
    base = ["--model", f"open_clip:{tiny_model.config_path}", "--prompts", str(spindle_prompts), "--device", "cpu",
            "--quiet", "--out", str(out)]
    cli_one_error(capsys, ["segment", str(slide), *base], "no weights given")
    cli_one_error(capsys, ["segment", str(slide), "--model", "open_clip:ViT-B-32", "--prompts",
                           str(spindle_prompts), "--device", "cpu", "--out", str(out)], "no weights given")
    assert not out.exists()  # refused before anything was written, not even the folder


def test_random_weights_only_on_request_and_seeded(tiny_model):
    from zeus_qupath.errors import ModelError
    from zeus_qupath.identity import weights_sample_hash
    from zeus_qupath.models import load_encoder

    spec = f"open_clip:{tiny_model.config_path}"
    with pytest.raises(ModelError, match="no weights given"):
        load_encoder(spec, None, "cpu")
    a = load_encoder(spec, None, "cpu", random_weights=True)
    b = load_encoder(spec, None, "cpu", random_weights=True)
    trained = load_encoder(spec, str(tiny_model.checkpoint_path), "cpu")
    assert weights_sample_hash(a.model) == weights_sample_hash(b.model)  # seeded: the same every run
    assert weights_sample_hash(a.model) != weights_sample_hash(trained.model)
    with pytest.raises(ModelError, match="not both"):
        load_encoder(spec, str(tiny_model.checkpoint_path), "cpu", random_weights=True)


def uncompressed_slide(path: Path, seed: int = 5) -> Path:
    """An uncompressed tiled TIFF with tissue-like blobs (edits in place keep its size and layout)."""
    rng = np.random.default_rng(seed)
    h, w = 1536, 2048
    img = np.full((h, w, 3), 242, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(6):
        cy, cx, r = rng.integers(200, h - 200), rng.integers(200, w - 200), rng.integers(150, 350)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        img[blob] = rng.integers(60, 200, size=3)
    img = np.clip(img.astype(np.int16) + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression=None, resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")
    return path


@pytest.mark.slow
def test_slide_edited_in_place_is_embedded_again(tmp_path, tiny_args):
    """Same size, same layout, mtime put back: the old fingerprint (size, first and last MiB, tile layout)
    called it unchanged, skipped it and even --redo reused its stale embeddings."""
    slide = uncompressed_slide(tmp_path / "s.tif")
    out = tmp_path / "out"
    assert main(["segment", str(slide), *tiny_args, "--out", str(out)]) == 0
    before = PatchScores.load(out / "s.scores.npz")
    st = slide.stat()
    with tifffile.TiffFile(slide) as tf:
        page = tf.pages[0]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
    middle = len(offsets) // 2 + 3  # a tile in the middle of the slide, not in the first or last MiB
    assert offsets[middle] > (1 << 20) and offsets[middle] + counts[middle] < st.st_size - (1 << 20)
    with open(slide, "r+b") as fh:  # repaint it in place: dark tissue everywhere in that tile
        for i in range(middle - 2, middle + 3):
            fh.seek(offsets[i])
            fh.write(bytes([40, 20, 90]) * (counts[i] // 3))
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))  # even the modification time is put back
    assert slide.stat().st_size == st.st_size and slide.stat().st_mtime_ns == st.st_mtime_ns

    assert main(["segment", str(slide), *tiny_args, "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["slides"][0]["status"] == "done" and run["slides"][0]["cache"] == "miss"
    after = PatchScores.load(out / "s.scores.npz")
    fresh = tmp_path / "fresh"
    assert main(["segment", str(slide), *tiny_args, "--out", str(fresh), "--no-cache"]) == 0
    reference = PatchScores.load(fresh / "s.scores.npz")
    np.testing.assert_array_equal(after.coords, reference.coords)
    np.testing.assert_allclose(after.scores, reference.scores, atol=1e-6)  # what the edited slide gives
    assert after.scores.shape != before.scores.shape or not np.allclose(after.scores, before.scores, atol=1e-6)


def test_fingerprint_reads_every_byte_once_per_change(tmp_path, monkeypatch):
    from zeus_qupath import identity

    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(3 << 20))
    memo = identity.FingerprintMemo(tmp_path / "memo")
    calls = []
    real = identity._sha256_file
    monkeypatch.setattr(identity, "_sha256_file", lambda p: calls.append(p) or real(p))
    first = identity.file_fingerprint(path, memo)
    assert identity.file_fingerprint(path, memo) == first and len(calls) == 1  # unchanged: one stat, no read
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(3 << 19)
        fh.write(b"\xff" * 16)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert identity.file_fingerprint(path, memo) != first and len(calls) == 2


def test_far_away_coordinates_are_refused_not_scored_zero(tmp_path, capsys):
    gt = tmp_path / "gt.geojson"
    square = [[[0, 0], [1000, 0], [1000, 800], [0, 800], [0, 0]]]
    gt.write_text(json.dumps({"type": "Feature", "properties": {"objectType": "annotation"},
                              "geometry": {"type": "Polygon", "coordinates": square}}))
    far = tmp_path / "far.geojson"
    far.write_text(json.dumps({"type": "Feature", "properties": {"objectType": "annotation"}, "geometry": {
        "type": "Polygon", "coordinates": [[[-1e12, -1e12], [1e12, -1e12], [1e12, 1e12], [-1e12, 1e12],
                                            [-1e12, -1e12]]]}}))
    cli_one_error(capsys, ["evaluate", str(far), str(gt), "--size", "1000,800"], "finite pixel position")
    # within range but far beyond the slide: clipped to the raster, so a full cover scores Dice 1
    big = tmp_path / "big.geojson"
    big.write_text(far.read_text().replace("1000000000000.0", "1000000000.0"))
    assert main(["evaluate", str(big), str(gt), "--size", "1000,800"]) == 0
    assert json.loads(capsys.readouterr().out)["dice"] == pytest.approx(1.0)


@pytest.mark.parametrize("argv,needle", [
    (["polygons", "{scores}", "--min-area", "nan"], "--min-area"),
    (["polygons", "{scores}", "--min-area", "-1"], "--min-area"),
    (["polygons", "{scores}", "--min-hole-area", "inf"], "--min-hole-area"),
    (["polygons", "{scores}", "--tolerance", "-5"], "--tolerance"),
    (["polygons", "{scores}", "--threshold", "prob:nan"], "prob:P"),
    (["segment", "{slide}", "--prefetch", "-3"], "--prefetch"),
    (["segment", "{slide}", "--mpp", "nan"], "--mpp"),
    (["segment", "{slide}", "--target-mpp", "inf"], "--target-mpp"),
    (["segment", "{slide}", "--batch-size", "0"], "--batch-size"),
    (["serve", "--port", "99999"], "--port"),
    (["evaluate", "{scores}", "{scores}", "--size", "0,5"], "--size"),
    (["export", "{tmp}", "--out", "{tmp}/x", "--downsample", "nan"], "--downsample"),
])
def test_numbers_are_finite_and_in_range(tmp_path, capsys, slide, tiny_args, argv, needle):
    scores = save_scores(tmp_path / "a.scores.npz")
    argv = [a.format(scores=scores, slide=slide, tmp=tmp_path) for a in argv]
    if argv[0] in ("segment", "serve"):
        argv += [*tiny_args, "--out", str(tmp_path / "out")] if argv[0] == "segment" else \
            [*tiny_args[:4], "--root", str(tmp_path)]
    cli_one_error(capsys, argv, needle)
    assert outputs_in(tmp_path / "out") == [] and not (tmp_path / "a.geojson").exists()


# ------------------------------------------------------------------ GeoJSON, scores and prompt files


BAD_GEOJSON = {
    "nan": '{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", '
           '"coordinates": [[[0, 0], [NaN, 0], [5, 5], [0, 0]]]}}',
    "infinity": '{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", '
                '"coordinates": [[[0, 0], [Infinity, 0], [5, 5], [0, 0]]]}}',
    "deep": "[" * 100_000 + "]" * 100_000,
    "deep-collection": '{"type": "Feature", "properties": {}, "geometry": '
                       + '{"type": "GeometryCollection", "geometries": [' * 40
                       + '{"type": "Point", "coordinates": [1, 1]}' + "]}" * 40 + "}",
    "1e12": '{"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [1e12, 5]}}',
}


@pytest.mark.parametrize("case", sorted(BAD_GEOJSON))
def test_bad_geojson_in_evaluate_export_and_project_add(tmp_path, capsys, case):
    bad = tmp_path / "in" / "slide.geojson"
    bad.parent.mkdir()
    bad.write_text(BAD_GEOJSON[case])
    good = tmp_path / "gt.geojson"
    good.write_text('{"type": "FeatureCollection", "features": []}')
    cli_one_error(capsys, ["evaluate", str(bad), str(good), "--size", "100,100"], "slide.geojson")
    cli_one_error(capsys, ["export", str(bad.parent), "--out", str(tmp_path / "export"), "--backend", "files"],
                  "slide.geojson")
    assert outputs_in(tmp_path / "export") == []
    save_scores(bad.parent / "slide.scores.npz", meta=json.dumps({"slide": "slide.tif"}))
    project = tmp_path / "project"
    cli_one_error(capsys, ["project", "add", str(project), str(bad), "--backend", "files"], "slide.geojson")
    assert not (project / "project.qpproj").exists()


def tissue_png(shape: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full(shape, 255, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("case,kwargs,needle", [
    ("beyond the slide", {"coords": [[0, 0], [5600, 0]]}, "outside"),
    ("one class", {"classes": ("tumor",)}, "classes"),
    ("meta a list", {"meta": "[1, 2]"}, "meta must be a JSON object"),
    ("meta nested", {"meta": "[" * 100_000 + "]" * 100_000}, "nested too deeply"),
    ("tissue not an object", {"meta": json.dumps({"tissue": 5})}, "tissue"),
    ("tissue not a png", {"meta": json.dumps({"tissue": {"downsample": 8, "png": "bm90IGEgcG5n"}})}, "tissue"),
    ("tissue bad downsample", {"meta": json.dumps({"tissue": {"downsample": float("nan"),
                                                              "png": tissue_png((100, 125))}})}, "downsample"),
    ("tissue wrong size", {"meta": json.dumps({"tissue": {"downsample": 8, "png": tissue_png((4000, 4000))}})},
     "tissue"),
    ("too many patches", {"coords": np.zeros((200_000, 2), np.int64)}, "patches"),
])
def test_bad_scores_files_are_refused_on_read(tmp_path, capsys, case, kwargs, needle):
    scores = save_scores(tmp_path / "s.scores.npz", **kwargs)
    cli_one_error(capsys, ["polygons", str(scores)], needle)
    assert not (tmp_path / "s.geojson").exists()


@pytest.mark.parametrize("content,needle", [
    (json.dumps({"0": {"classnames": {"normal": ["skin"], "tumor": ["tumor"]}, "templates": ["CLASSNAME."],
                       "positive_class": ["tumor", "normal"]}}), "positive_class"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"0": ' * 5000 + "{}" + "}" * 5000, "nested too deeply"),
])
def test_bad_prompt_files(tmp_path, capsys, tiny_args, slide, content, needle):
    prompts = tmp_path / "p.json"
    prompts.write_text(content)
    args = [a if a != tiny_args[5] else str(prompts) for a in tiny_args]
    cli_one_error(capsys, ["segment", str(slide), *args, "--out", str(tmp_path / "out")], needle)
    assert outputs_in(tmp_path / "out") == []


@pytest.mark.slow
def test_sparse_h5_is_refused_before_it_is_read(tmp_path, tiny_args):
    """1.6 KB on disk, 16 GB declared: refused from the dataset headers, at the memory of loading the model."""
    h5 = tmp_path / "sparse.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("features", shape=(4_000_000, 1024), dtype="f4", chunks=(1024, 1024))
        f.create_dataset("coords", shape=(4_000_000, 2), dtype="i8", chunks=(65536, 2))
    assert h5.stat().st_size < 4096
    peak = tmp_path / "peak"
    code = ("import sys; from zeus_qupath.cli import main; rc = main(sys.argv[1:]); "
            f"open({str(peak)!r}, 'w').write([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); "
            "sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, "score", str(h5), *tiny_args[:-1], "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=600)
    one_error(res.returncode, res.stderr, "sparse")
    assert int(peak.read_text().split()[1]) < 2_000_000  # kB: far below the 16 GB the file declares
    assert outputs_in(tmp_path / "o") == []


# ------------------------------------------------------------------ failures of the environment


@pytest.mark.slow
def test_truncated_slide_is_one_line_unless_debug(tmp_path, tiny_args):
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    full = make_synthetic_slide(tmp_path / "full.tif", 6144, 4096, seed=4).path
    cut = tmp_path / "cut.tif"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # header and pyramid intact, half the level-0 tiles gone
    out = tmp_path / "out"
    res = run_cli("segment", str(cut), *tiny_args, "--out", str(out))
    one_error(res.returncode, res.stderr, "cut.tif")
    assert outputs_in(out) == [] or [p.name for p in outputs_in(out)] == ["run.json"]
    res = run_cli("segment", str(cut), *tiny_args, "--out", str(out), "--debug")
    assert res.returncode == 2 and "Traceback" in res.stderr  # --debug shows what happened, same exit status
    assert res.stderr.strip().splitlines()[-1].startswith("zeus: error:")


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write into: a read-only tmpfs when run as root (root ignores modes), else mode 555."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)],
                          capture_output=True).returncode != 0:
            pytest.skip("running as root and cannot mount a read-only tmpfs")
        yield d
        subprocess.run(["umount", str(d)], check=False)
    else:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)


def test_unwritable_out_and_cache(tmp_path, capsys, read_only_dir, slide, tiny_args, tiny_model):
    cli_one_error(capsys, ["segment", str(slide), *tiny_args, "--out", str(read_only_dir / "out")], "--out")
    cli_one_error(capsys, ["segment", str(slide), *tiny_args, "--out", str(read_only_dir)], "--out")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cli_one_error(capsys, ["segment", str(slide), *tiny_args, "--out", str(a_file)], "--out")
    out = tmp_path / "out"
    cli_one_error(capsys, ["segment", str(slide), *tiny_args, "--out", str(out), "--cache", str(a_file)], "--cache")
    cli_one_error(capsys, ["segment", str(slide), *tiny_args, "--out", str(out), "--cache", str(read_only_dir)],
                  "--cache")
    h5 = tmp_path / "f.h5"
    with h5py.File(h5, "w") as f:
        f["features"] = np.ones((2, 64), np.float32)
        f["coords"] = np.array([[0, 0], [448, 0]])
    cli_one_error(capsys, ["score", str(h5), *tiny_args[:-1], "--patch-size", "448", "--out", str(read_only_dir)],
                  "--out")
    assert outputs_in(out) == [] and outputs_in(read_only_dir) == []


def test_foreign_folder(tmp_path, capsys, slide, tiny_args):
    if os.geteuid() == 0:
        pytest.skip("root may write into every user's folder")
    foreign = next((p for p in (Path("/root"), Path("/var/lib")) if p.is_dir() and not os.access(p, os.W_OK)), None)
    if foreign is None:
        pytest.skip("no folder of another user here")
    cli_one_error(capsys, ["segment", str(slide), *tiny_args, "--out", str(foreign / "zeus-out")], "--out")


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes beyond the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_full_disk_leaves_nothing_half_written(tmp_path, slide, tiny_args):
    """A write that fails half-way (EFBIG through RLIMIT_FSIZE here; ENOSPC on a tmpfs below)."""
    out = tmp_path / "out"
    res = run_cli("segment", str(slide), *tiny_args, "--out", str(out), "--no-cache",
                  preexec=_file_size_limit(20_000))
    one_error(res.returncode, res.stderr, "File too large")
    assert str(out) in res.stderr  # which output (and folder) the failed write was for
    assert [p for p in outputs_in(out) if p.name != "run.json"] == []


@pytest.mark.slow
def test_no_space_left_on_a_small_tmpfs(tmp_path, slide, tiny_args):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    d = tmp_path / "small"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        res = run_cli("segment", str(slide), *tiny_args, "--out", str(d), "--no-cache")
        one_error(res.returncode, res.stderr, "no space left")
        assert [p for p in outputs_in(d) if p.name != "run.json"] == []
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_failed_score_leaves_no_scores_file(tmp_path, capsys, tiny_args, monkeypatch):
    import errno

    from zeus_qupath import qupath_geojson

    h5 = tmp_path / "f.h5"
    with h5py.File(h5, "w") as f:
        f["features"] = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
        f["coords"] = np.array([[0, 0], [112, 0], [0, 112]])
    out = tmp_path / "out"

    def disk_full(path, collection):  # the GeoJSON, written after the scores, hits a full disk
        Path(path).write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(qupath_geojson, "write_geojson", disk_full)
    cli_one_error(capsys, ["score", str(h5), *tiny_args[:-1], "--patch-size", "448", "--width", "1000",
                           "--height", "1000", "--out", str(out)], f"no space left on device ({out / 'f.geojson'})")
    assert outputs_in(out) == []


# ------------------------------------------------------------------ zeus reads what it writes


def test_slide_without_tissue_reads_back(tmp_path, capsys, tiny_args):
    rng = np.random.default_rng(0)
    Image.fromarray(np.clip(rng.normal(246, 2, (900, 1200, 3)), 0, 255).astype(np.uint8)).save(tmp_path / "blank.png")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "blank.png"), *tiny_args, "--out", str(out)]) == 0
    assert len(PatchScores.load(out / "blank.scores.npz").coords) == 0
    assert main(["polygons", str(out / "blank.scores.npz"), "--out", str(tmp_path / "again.geojson")]) == 0
    assert json.loads((tmp_path / "again.geojson").read_text())["features"] == []
    capsys.readouterr()
    assert main(["project", "add", str(tmp_path / "project"), str(out), "--backend", "files"]) == 0
    project = json.loads((tmp_path / "project" / "project.qpproj").read_text())
    assert [e["imageName"] for e in project["images"]] == ["blank.png"]


# ------------------------------------------------------------------ two runs into one folder


@pytest.mark.slow
def test_two_runs_into_one_out_folder(tmp_path, tiny_args):
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    slides = [make_synthetic_slide(tmp_path / f"s{i}.tif", 2560, 1792, seed=70 + i).path for i in range(2)]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zeus_qupath", "segment", *map(str, slides), *tiny_args, "--out", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [(p.wait(timeout=900), *p.communicate()) for p in (first, second)]
    for rc, _stdout, stderr in results:
        assert rc == 0 and "Traceback" not in stderr and "FileNotFoundError" not in stderr, stderr
    for s in slides:
        scores = PatchScores.load(out / f"{s.stem}.scores.npz")
        assert len(scores.coords) > 0
        assert json.loads((out / f"{s.stem}.geojson").read_text())["type"] == "FeatureCollection"
    summaries = [stdout for _rc, stdout, _stderr in results]
    assert sum(text.count(" done ") for text in summaries) == 2  # each slide segmented once, by one of the runs
    assert [p for p in outputs_in(out) if p.name.startswith(".")] == []  # no temporary file left behind
