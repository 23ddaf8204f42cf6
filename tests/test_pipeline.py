"""The streaming pipeline: region stream across slides, patch cutting (numpy and torch), encoders, ensembles."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from zeus_qupath.embed import StreamEncoder, cut_patches_torch
from zeus_qupath.errors import SlideError
from zeus_qupath.grid import PatchGeometry, PatchGrid, make_grid
from zeus_qupath.models.specs import parse_model_specs
from zeus_qupath.on_demand import embed_patches
from zeus_qupath.outputs import PatchScores
from zeus_qupath.params import SegmentParams
from zeus_qupath.reader import (
    PlanFailure,
    ReadPlan,
    RegionRead,
    RegionSource,
    RegionStream,
    SlideEnd,
    SlideFailed,
    SlideStart,
    patch_windows,
)
from zeus_qupath.runs.run import RunConfig, run_segment
from zeus_qupath.slide import Slide
from zeus_qupath.tissue import detect_tissue

from conftest import shared_file


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    d = tmp_path_factory.mktemp("pipeline-slides")
    return [make_synthetic_slide(d / f"p{i}.tif", 2560, 1792, seed=40 + i).path for i in range(2)]


def tissue_grid(path, geometry=None):
    with Slide(path) as s:
        return make_grid(*s.dimensions, geometry or PatchGeometry(448, 112), detect_tissue(s))


def test_stream_orders_events_and_bounds_read_ahead(slides, tmp_path):
    grids = [tissue_grid(p) for p in slides]
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00" + b"\x00" * 64)
    lock = threading.Lock()
    decoded = [0]

    def count(region):
        with lock:
            decoded[0] += 1
        return region

    plans = [ReadPlan.for_grid("a", str(slides[0]), grids[0], block_cells=4),
             PlanFailure("bad", SlideError("cannot open broken.tif")),
             ReadPlan.for_grid("b", str(slides[1]), grids[1], block_cells=4)]
    stream = RegionStream(plans, workers=2, prefetch=1, transform=count)
    events, consumed, most_ahead = [], 0, 0
    for ev in stream:
        events.append(ev)
        if isinstance(ev, RegionRead):
            consumed += 1
            with lock:
                most_ahead = max(most_ahead, decoded[0] - consumed)
            windows = patch_windows(ev.pixels, ev.plan.grid.geometry)
            rows, cols = ev.block.local_cells(ev.plan.grid)
            with Slide(ev.plan.path) as s:  # spot check: the cut patch is the patch read on its own
                x, y = ev.plan.grid.coords[ev.block.indices[0]]
                assert np.array_equal(windows[rows[0], cols[0]], s.read_region(int(x), int(y), 448, 448))
    kinds = [(type(e).__name__, getattr(getattr(e, "plan", None), "key", getattr(e, "key", None))) for e in events]
    assert kinds[0] == ("SlideStart", "a") and kinds[-1] == ("SlideEnd", "b")
    assert ("SlideFailed", "bad") in kinds and ("SlideEnd", "a") in kinds
    assert kinds.index(("SlideEnd", "a")) < kinds.index(("SlideStart", "b"))
    per_slide = {k: sum(1 for e in events if isinstance(e, RegionRead) and e.plan.key == k) for k in "ab"}
    assert per_slide == {"a": len(plans[0].blocks), "b": len(plans[2].blocks)} and per_slide["a"] > 4
    # regions decoded but not yet consumed never exceed the queue (workers + prefetch) plus the one in hand
    assert most_ahead <= stream.max_regions
    covered = np.zeros(len(grids[0]), bool)
    for e in events:
        if isinstance(e, RegionRead) and e.plan.key == "a":
            covered[e.block.indices] = True
    assert covered.all()


def test_read_failure_mid_slide_fails_that_slide_only(slides, tmp_path):
    grid = tissue_grid(slides[0])
    cut = tmp_path / "cut.tif"
    data = slides[0].read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.7)])  # header and low levels intact, level-0 tiles missing
    plans = [ReadPlan.for_grid("cut", str(cut), grid), ReadPlan.for_grid("ok", str(slides[0]), grid)]
    events = list(RegionStream(plans, workers=2))
    failed = [e for e in events if isinstance(e, SlideFailed)]
    assert [f.key for f in failed] == ["cut"] and isinstance(failed[0].error, SlideError)
    assert not any(isinstance(e, SlideEnd) and e.plan.key == "cut" for e in events)
    assert any(isinstance(e, SlideEnd) and e.plan.key == "ok" for e in events)
    assert sum(isinstance(e, SlideStart) for e in events) == 2


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "OS-1-detail.ome.tif", "synthetic"])
def test_direct_tile_reads_equal_tiffslide(name, slides):
    """Regions decoded tile by tile in the reading thread are tiffslide's pixels, at every level and edge."""
    path = slides[0] if name == "synthetic" else shared_file("wsi", name)
    rng = np.random.default_rng(1)
    src = RegionSource(path)
    try:
        with Slide(path) as s:
            w, h = s.dimensions
            for level in range(s.level_count):
                for _ in range(12):
                    x, y = int(rng.integers(-300, w + 50)), int(rng.integers(-300, h + 50))
                    rw, rh = (int(v) for v in rng.integers(1, 600, 2))
                    assert np.array_equal(src.read_region(x, y, rw, rh, level), s.read_region(x, y, rw, rh, level))
        assert all(v is not None for v in src._levels.values())  # every level was read directly
    finally:
        src.close()
    plain = RegionSource(path, direct=False)
    assert plain.read_region(0, 0, 10, 10).shape == (10, 10, 3) and not plain._levels
    plain.close()


def test_torch_cut_equals_numpy_cut():
    rng = np.random.default_rng(0)
    region = rng.integers(0, 255, (3 * 112 + 448, 4 * 112 + 448, 3), dtype=np.uint8)
    geo = PatchGeometry(448, 112)
    rows, cols = np.array([0, 1, 3, 2]), np.array([4, 0, 2, 2])
    cut = cut_patches_torch(torch.from_numpy(region), geo, torch.from_numpy(rows), torch.from_numpy(cols))
    assert cut.shape == (4, 448, 448, 3) and cut.is_contiguous()
    windows = patch_windows(region, geo)
    for k in range(4):
        assert np.array_equal(cut[k].numpy(), windows[rows[k], cols[k]])
        assert np.array_equal(windows[rows[k], cols[k]],
                              region[rows[k] * 112: rows[k] * 112 + 448, cols[k] * 112: cols[k] * 112 + 448])


@pytest.mark.slow
def test_device_cut_path_gives_the_same_features(slides, tiny_encoder):
    """The GPU path (upload region, cut with unfold, preprocess on the device) run on the CPU."""
    grid = tissue_grid(slides[1])
    out = {}
    for on_device in (False, True):
        stream = RegionStream([ReadPlan.for_grid(0, str(slides[1]), grid, block_cells=5)], workers=2)
        seen: list[int] = []
        runner = StreamEncoder([tiny_encoder], batch_size=48, cut_on_device=on_device,
                               progress=lambda plan, seen=seen: seen.append)
        (result,) = list(runner.run(stream))
        assert sum(seen) == len(grid)
        out[on_device] = result.features[0]
    assert out[True].shape == (len(grid), tiny_encoder.embed_dim)
    np.testing.assert_allclose(out[True], out[False], atol=1e-5)
    # and both equal patches read one by one and embedded by the encoder's own entry point
    with Slide(slides[1]) as s:
        pick = np.linspace(0, len(grid) - 1, 12).astype(int)
        ref = tiny_encoder.encode_images(np.stack([s.read_region(int(x), int(y), 448, 448)
                                                   for x, y in grid.coords[pick]]))
    np.testing.assert_allclose(out[False][pick], ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out[False], axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_target_mpp_scores_are_those_of_the_pyramid_level_pixels(slides, tiny_model, tiny_encoder, spindle_prompts,
                                                                  tmp_path):
    """``--target-mpp`` end to end: each patch's scores are those of the slide's own pyramid level, read by tiffslide.

    The synthetic slide's level 1 is downsampled 4x, so at 4x the slide's pixel size a 112-px patch is
    448 level-0 px read from level 1, with no resampling: the reference reads that patch with tiffslide
    and embeds it with the encoder's own entry point. (A one-level-pixel shift changes the scores by
    ~7e-3, far above the tolerance.)
    """
    import tiffslide

    from zeus_qupath.prompts import class_prototypes, load_prompts

    params = SegmentParams(patch_size=112, stride=56, target_mpp=2.0, detect_tissue=False, batch_size=16)
    report = run_segment(RunConfig(slides=(str(slides[0]),), prompts=str(spindle_prompts), out_dir=str(tmp_path),
                                   model=f"open_clip:{tiny_model.config_path}", device="cpu",
                                   pretrained=str(tiny_model.checkpoint_path), progress=False, params=params))
    assert report.done and not report.failures
    scores = PatchScores.load(tmp_path / "p0.scores.npz")
    assert (scores.patch_size, scores.stride, scores.width, scores.height) == (448, 224, 2560, 1792)
    inside = (scores.coords[:, 0] + 448 <= 2560) & (scores.coords[:, 1] + 448 <= 1792)
    pick = np.flatnonzero(inside)[:: max(1, int(inside.sum()) // 12)]
    assert len(pick) >= 6
    ts = tiffslide.TiffSlide(str(slides[0]))
    try:
        assert ts.level_downsamples[1] == pytest.approx(4.0)
        patches = np.stack([np.asarray(ts.read_region((int(x), int(y)), 1, (112, 112)).convert("RGB"))
                            for x, y in scores.coords[pick]])
    finally:
        ts.close()
    features = tiny_encoder.encode_images(patches)
    prompts = load_prompts(spindle_prompts)
    np.testing.assert_allclose(scores.scores[pick], features @ class_prototypes(tiny_encoder, prompts).T, atol=1e-4)
    # the on-demand path (zeus serve) embeds a grid through embed_patches: the same pixels, the same features
    assert not (scores.coords[pick] % 224).any()  # one lattice from (0, 0) without tissue detection
    index = scores.coords[pick][:, ::-1] // 224
    grid = PatchGrid(PatchGeometry(112, 56, 4.0), 2560, 1792, int(index[:, 0].max()) + 1,
                     int(index[:, 1].max()) + 1, index)
    on_demand, kept = embed_patches(slides[0], grid, tiny_encoder, SegmentParams(batch_size=16, workers=1))
    assert kept is None or kept.all()
    np.testing.assert_allclose(on_demand, features, atol=1e-5)


def test_model_list_parsing():
    specs = parse_model_specs("a, b", "x.pt,")
    assert [(m.spec, m.pretrained) for m in specs] == [("a", "x.pt"), ("b", None)]
    assert parse_model_specs("open_clip:m.json", "w,1.pt")[0].pretrained == "w,1.pt"  # one model: taken whole
    with pytest.raises(Exception, match="one entry per model"):
        parse_model_specs("a,b", "x.pt")


@pytest.mark.slow
def test_ensemble_averages_the_models_scores(slides, tiny_model, spindle_prompts, tmp_path):
    """Two different models (the tiny one and a perturbed copy): scores are the mean of each alone."""
    state = torch.load(tiny_model.checkpoint_path, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    other = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() and v.ndim >= 2 else v
             for k, v in state.items()}
    other_path = tmp_path / "other.pt"
    torch.save(other, other_path)
    spec = f"open_clip:{tiny_model.config_path}"
    common = dict(slides=(str(slides[0]),), prompts=str(spindle_prompts), device="cpu", progress=False,
                  params=SegmentParams(batch_size=32))
    runs = {}
    for name, model, pre in [("a", spec, str(tiny_model.checkpoint_path)), ("b", spec, str(other_path)),
                             ("ab", f"{spec},{spec}", f"{tiny_model.checkpoint_path},{other_path}")]:
        run_segment(RunConfig(out_dir=str(tmp_path / name), model=model, pretrained=pre, **common))
        runs[name] = PatchScores.load(tmp_path / name / "p0.scores.npz")
    assert not np.allclose(runs["a"].scores, runs["b"].scores, atol=1e-3)
    np.testing.assert_allclose(runs["ab"].scores, (runs["a"].scores + runs["b"].scores) / 2, atol=1e-6)
    assert runs["ab"].meta["models"] == ["zeus-tiny", "zeus-tiny"] and len(runs["ab"].meta["per_model"]) == 2
    run = json.loads((tmp_path / "ab" / "run.json").read_text())
    assert [m["pretrained"] for m in run["models"]] == [str(tiny_model.checkpoint_path), str(other_path)]
    assert run["models"][0]["weights_sample_sha256"] != run["models"][1]["weights_sample_sha256"]
    # each model of the ensemble has its own cache entry
    assert len(list((tmp_path / "ab" / ".cache").glob("*/*.npz"))) == 2


@pytest.mark.slow
def test_prompt_screening_reuses_the_embeddings(slides, tiny_model, spindle_prompts, tmp_path):
    common = dict(slides=(str(slides[1]),), prompts=str(spindle_prompts), out_dir=str(tmp_path),
                  model=f"open_clip:{tiny_model.config_path}", pretrained=str(tiny_model.checkpoint_path),
                  device="cpu", progress=False)
    plain = run_segment(RunConfig(**common))
    screened = run_segment(RunConfig(screening_k=3, **common))
    assert plain.slides[0].cache == "miss" and screened.slides[0].status == "done"
    assert screened.slides[0].cache == "hit"  # other scoring, same embeddings
    meta = PatchScores.load(tmp_path / "p1.scores.npz").meta
    assert meta["prompt_screening"]["k"] == 3 and "screening" in meta["per_model"][0]
    assert json.loads((tmp_path / "run.json").read_text())["parameters"]["prompt_screening"] == 3
