"""Slides as Ray tasks on a local Ray instance: the same outputs and resume state as the local executor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from shapely import unary_union
from shapely.geometry import shape

from zeus_qupath.outputs import PatchScores
from zeus_qupath.params import SegmentParams
from zeus_qupath.runs.run import RunConfig, run_segment

pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'zeus-qupath[ray]')")


def geometries(path):
    return [shape(f["geometry"]) for f in json.loads(path.read_text())["features"]]


@pytest.mark.slow
def test_ray_cohort_matches_local_and_shares_state(tmp_path, tiny_model, spindle_prompts):
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    slides = [str(make_synthetic_slide(tmp_path / "slides" / f"r{i}.tif", 2048, 1536, seed=80 + i).path)
              for i in range(3)]
    common = dict(slides=tuple(slides), prompts=str(spindle_prompts), model=f"open_clip:{tiny_model.config_path}",
                  pretrained=str(tiny_model.checkpoint_path), device="cpu", progress=False,
                  params=SegmentParams(batch_size=32, workers=1))
    ray_run = run_segment(RunConfig(out_dir=str(tmp_path / "ray"), executor="ray", **common))
    local_run = run_segment(RunConfig(out_dir=str(tmp_path / "local"), **common))
    assert [r.status for r in ray_run.slides] == ["done"] * 3 and not ray_run.failures
    assert json.loads((tmp_path / "ray" / "run.json").read_text())["executor"] == "ray"
    for stem in ("r0", "r1", "r2"):
        a = PatchScores.load(tmp_path / "ray" / f"{stem}.scores.npz")
        b = PatchScores.load(tmp_path / "local" / f"{stem}.scores.npz")
        assert np.array_equal(a.coords, b.coords) and a.meta == b.meta
        # equal up to float rounding (a Ray worker runs torch on one thread: other summation order)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        ga = unary_union(geometries(tmp_path / "ray" / f"{stem}.geojson"))
        gb = unary_union(geometries(tmp_path / "local" / f"{stem}.geojson"))
        assert ga.symmetric_difference(gb).area <= 1e-3 * max(gb.area, 1.0)
        sa = json.loads((tmp_path / "ray" / ".state" / f"{stem}.json").read_text())
        sb = json.loads((tmp_path / "local" / ".state" / f"{stem}.json").read_text())
        assert sa["state_hash"] == sb["state_hash"] and sa["fingerprint"] == sb["fingerprint"]
    assert [r.patches for r in ray_run.slides] == [r.patches for r in local_run.slides]
    # the Ray run's state is the local executor's: a local rerun skips every slide, and vice versa
    again = run_segment(RunConfig(out_dir=str(tmp_path / "ray"), **common))
    assert [r.status for r in again.slides] == ["skipped"] * 3
    again = run_segment(RunConfig(out_dir=str(tmp_path / "local"), executor="ray", **common))
    assert [r.status for r in again.slides] == ["skipped"] * 3
