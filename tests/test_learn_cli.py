"""zeus learn and --adapter end to end with the tiny open_clip model: cache reuse, records, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio.features
import shapely
from affine import Affine
from PIL import Image
from shapely.geometry import shape

from zeus_qupath.cli import main
from zeus_qupath.outputs import PatchScores
from zeus_qupath.qupath_geojson import QuPathObject, objects_to_feature_collection
from zeus_qupath.samples.synthetic import make_synthetic_slide

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_args(tiny_model, spindle_prompts):
    return ["--model", f"open_clip:{tiny_model.config_path}", "--pretrained", str(tiny_model.checkpoint_path),
            "--prompts", str(spindle_prompts), "--device", "cpu"]


def truth_objects(syn) -> list[QuPathObject]:
    """The slide's true tumor outline as annotator-drawn Tumor annotations (level-0 px)."""
    mask = np.asarray(Image.open(syn.tumor_mask_path)) > 127
    ds = syn.mask_downsample
    polys = [shape(g) for g, v in rasterio.features.shapes(mask.astype(np.uint8), mask=mask,
                                                            transform=Affine.scale(ds)) if v == 1]
    return [QuPathObject(p, class_name="Tumor", color=(200, 0, 0)) for p in polys]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, tiny_args):
    root = tmp_path_factory.mktemp("learn")
    slides = [make_synthetic_slide(root / f"s{i}.tif", 2560, 1792, seed=80 + i, tumor_fraction=0.35) for i in range(2)]
    out, cache = root / "zeus", root / "cache"
    assert main(["segment", *(str(s.path) for s in slides), *tiny_args, "--quiet", "--out", str(out),
                 "--cache", str(cache)]) == 0
    corrected = root / "corrected"
    corrected.mkdir()
    (corrected / "s0.geojson").write_text(json.dumps(objects_to_feature_collection(truth_objects(slides[0]))))
    return root, slides, out, cache, corrected


def test_learn_from_cached_embeddings_and_apply_without_embedding(cohort, tiny_args, capsys):
    root, slides, out, cache, corrected = cohort
    adapter = root / "adapter.npz"
    args = ["learn", str(corrected), "--originals", str(out), "--cache", str(cache), "--force", *tiny_args]
    assert main([*args, "--out", str(adapter)]) == 0
    captured = capsys.readouterr()
    assert "0 embedded now, cache hit" in captured.err  # the embeddings zeus segment cached, not the model
    assert "zero-shot Dice" in captured.out and "s0 (half 1)" in captured.out
    assert main([*args, "--out", str(root / "again.npz")]) == 0  # same inputs, same bytes
    assert adapter.read_bytes() == (root / "again.npz").read_bytes()

    out2 = root / "adapted"
    project = root / "project"
    assert main(["segment", str(slides[1].path), *tiny_args, "--quiet", "--out", str(out2), "--cache", str(cache),
                 "--adapter", str(adapter), "--tiles", "--project", str(project), "--backend", "files"]) == 0
    run = json.loads((out2 / "run.json").read_text())
    entry = json.loads((project / "project.qpproj").read_text())["images"][0]
    assert entry["metadata"]["zeus.adapter"].startswith(run["adapter"]["sha256"][:16])
    assert "learned from 1 slide(s): s0" in entry["metadata"]["zeus.adapter"]
    # the heatmap tiles carry the adapted scores; the overlay says "adapted" (its top-left corner is a white label)
    from zeus_qupath.heatmap import tile_collection

    def measurements(features):
        return [f["properties"]["measurements"] for f in features]

    tiles = measurements(json.loads((out2 / "s1.tiles.geojson").read_text())["features"])
    adapted_tiles = json.loads(json.dumps(tile_collection(PatchScores.load(out2 / "s1.scores.npz"))))["features"]
    zero_shot_tiles = json.loads(json.dumps(tile_collection(PatchScores.load(out / "s1.scores.npz"))))["features"]
    assert tiles == measurements(adapted_tiles) and tiles != measurements(zero_shot_tiles)
    with Image.open(out2 / "s1.overlay.png") as im:
        corner = np.asarray(im.convert("RGB"))[:3, :3]
    with Image.open(out / "s1.overlay.png") as im:
        plain = np.asarray(im.convert("RGB"))[:3, :3]
    assert np.all(corner == 255) and not np.array_equal(corner, plain)
    assert run["adapter"]["slides"] == ["s0"] and run["slides"][0]["cache"] == "hit"  # re-scored, 0 embedded
    scores = PatchScores.load(out2 / "s1.scores.npz")
    zero_shot = PatchScores.load(out / "s1.scores.npz")
    assert scores.meta["adapter"]["sha256"] == run["adapter"]["sha256"]
    assert np.array_equal(scores.coords, zero_shot.coords) and not np.allclose(scores.scores, zero_shot.scores)
    # the adapted scores are the adapter applied to the cached features: recompute them from the cache
    from zeus_qupath.adapter import Adapter

    a = Adapter.load(adapter)
    entries = list(cache.glob("*/*.npz"))
    feats = None
    for entry in entries:
        with np.load(entry) as z:
            if len(z["features"]) == len(scores.coords) and json.loads(str(z["meta"]))["key_parts"]:
                cand = z["features"]
                if np.allclose(cand @ a.weights.T + a.bias, scores.scores, atol=1e-5):
                    feats = cand
    assert feats is not None


def test_mismatched_or_damaged_adapter_is_refused_before_any_work(cohort, tiny_args, capsys, tmp_path):
    root, slides, out, cache, corrected = cohort
    adapter = root / "adapter.npz"
    if not adapter.is_file():
        assert main(["learn", str(corrected), "--originals", str(out), "--cache", str(cache), "--force",
                     *tiny_args, "--out", str(adapter)]) == 0
    capsys.readouterr()
    dest = tmp_path / "o"
    rc = main(["segment", str(slides[1].path), *tiny_args, "--quiet", "--out", str(dest), "--stride", "224",
               "--adapter", str(adapter)])
    err = capsys.readouterr().err
    assert rc == 2 and "learned with another patch geometry" in err and len(err.strip().splitlines()) == 1
    assert not list(dest.glob("*.geojson"))
    broken = tmp_path / "broken.npz"
    broken.write_bytes(adapter.read_bytes()[:-100])
    rc = main(["segment", str(slides[1].path), *tiny_args, "--quiet", "--out", str(dest), "--adapter", str(broken)])
    err = capsys.readouterr().err
    assert rc == 2 and "adapter broken.npz" in err and len(err.strip().splitlines()) == 1
    assert not list(dest.glob("*.geojson"))


def test_learn_refuses_corrections_of_the_wrong_image(cohort, tiny_args, capsys, tmp_path):
    root, slides, out, cache, corrected = cohort
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    far = QuPathObject(shapely.box(5000, 5000, 6000, 6000), class_name="Tumor", color=(200, 0, 0))
    (wrong / "s0.geojson").write_text(json.dumps(objects_to_feature_collection([far])))
    fresh = tmp_path / "fresh-cache"  # nothing cached: the check must come before any embedding
    rc = main(["learn", str(wrong), "--originals", str(out), "--cache", str(fresh), *tiny_args,
               "--out", str(tmp_path / "a.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "wrong slide" in err and not (tmp_path / "a.npz").exists()
    assert "embedded now" not in err and not list(fresh.rglob("*.npz"))


def test_score_features_with_an_adapter(cohort, tiny_args, capsys, tmp_path):
    """zeus score: features computed elsewhere (here: the cache's, as an HDF5 file) scored by the adapter."""
    import h5py

    from zeus_qupath.adapter import Adapter

    root, slides, out, cache, corrected = cohort
    adapter = root / "adapter.npz"
    if not adapter.is_file():
        assert main(["learn", str(corrected), "--originals", str(out), "--cache", str(cache), "--force",
                     *tiny_args, "--out", str(adapter)]) == 0
    zero_shot = PatchScores.load(out / "s1.scores.npz")
    entry = next(e for e in cache.glob("*/*.npz") if len(np.load(e)["features"]) == len(zero_shot.coords))
    feats = np.load(entry)["features"]
    h5 = tmp_path / "s1.h5"
    with h5py.File(h5, "w") as f:
        f["features"] = feats
        f["coords"] = zero_shot.coords  # the cache keeps grid order, as the scores file does
    capsys.readouterr()
    args = ["score", str(h5), *tiny_args, "--adapter", str(adapter), "--width", "2560", "--height", "1792"]
    assert main([*args, "--patch-size", "448", "--stride", "112", "--out", str(tmp_path / "o")]) == 0
    scores = PatchScores.load(tmp_path / "o" / "s1.scores.npz")
    a = Adapter.load(adapter)
    assert scores.meta["adapter"]["sha256"] == a.sha256
    assert np.allclose(scores.scores, a.scores(feats / np.linalg.norm(feats, axis=1, keepdims=True)), atol=1e-5)
    rc = main([*args, "--patch-size", "224", "--stride", "56", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and "learned on 448 px patches" in err and not (tmp_path / "p" / "s1.geojson").exists()



def test_an_adapter_no_better_than_zero_shot_is_not_written(cohort, tiny_args, capsys, tmp_path, monkeypatch):
    root, slides, out, cache, corrected = cohort
    monkeypatch.setattr("zeus_qupath.learn.MIN_GAIN", 1.0)  # no adapter can beat zero-shot's Dice by 1.0
    if not (out / ".cache").exists():
        (out / ".cache").symlink_to(cache)  # as if zeus segment had used its default cache, OUT/.cache
    rc = main(["learn", str(corrected), "--originals", str(out), *tiny_args, "--out", str(tmp_path / "a.npz")])
    captured = capsys.readouterr()
    assert rc == 1 and "not better than zero-shot" in captured.err and not (tmp_path / "a.npz").exists()
    assert "zero-shot Dice" in captured.out  # the table is printed all the same
    assert "(0 embedded now" in captured.err  # --originals' .cache is zeus segment's: found without --cache
