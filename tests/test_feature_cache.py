"""The embedding cache on disk, slide and model fingerprints, and re-scoring from the cache."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from zeus_qupath.feature_cache import CachedEmbeddings, CacheKey, FeatureCache
from zeus_qupath.grid import PatchGeometry
from zeus_qupath.identity import file_fingerprint, model_identity
from zeus_qupath.outputs import PatchScores
from zeus_qupath.params import SegmentParams
from zeus_qupath.runs.run import RunConfig, run_segment
from zeus_qupath.tissue import TissueMask

GEO = PatchGeometry(448, 112)


def entry(n=50, d=16, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    mask = rng.random((37, 53)) > 0.5
    return CachedEmbeddings(feats, np.stack([np.arange(n) // 10, np.arange(n) % 10], axis=1), 20, 30, 3000, 2000,
                            TissueMask(mask, 57.3))


def key(**kw):
    base = dict(slide="f" * 64, model="m" * 64, precision="fp32", geometry=GEO, target_mpp=None, tissue=True)
    base.update(kw)
    return CacheKey.make(**base)


def test_roundtrip_and_key_parts(tmp_path):
    cache = FeatureCache(tmp_path)
    e = entry()
    path = cache.store(key(), e)
    assert path.is_file() and path.parent.parent == tmp_path
    back = cache.load(key())
    assert back is not None and cache.hits == 1
    assert np.array_equal(back.features, e.features) and np.array_equal(back.index, e.index)
    assert np.array_equal(back.tissue.mask, e.tissue.mask) and back.tissue.downsample == 57.3
    assert (back.rows, back.cols, back.width, back.height) == (20, 30, 3000, 2000)
    grid = back.grid(GEO)
    assert len(grid) == 50 and grid.geometry == GEO
    # every part of the key matters
    others = [key(slide="g" * 64), key(model="n" * 64), key(precision="bf16"), key(geometry=PatchGeometry(448, 224)),
              key(geometry=PatchGeometry(448, 112, 2.0), target_mpp=1.0), key(tissue=False)]
    assert len({k.digest for k in others} | {key().digest}) == len(others) + 1
    for k in others:
        assert cache.load(k) is None
    assert not list(tmp_path.rglob(".*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "other_key"])
def test_corrupt_entry_is_detected_removed_and_never_used(tmp_path, damage):
    cache = FeatureCache(tmp_path)
    path = cache.store(key(), entry(n=400, d=64))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":  # a byte inside the features array, not in the zip directory
        i = data.index(b"features.npy") + 2000
        data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "garbage":
        path.write_bytes(b"not a zip at all")
    else:  # a valid entry copied under another key's name
        other = cache.store(key(slide="0" * 64), entry(seed=1))
        shutil.copy(other, path)
    assert cache.load(key()) is None
    assert cache.corrupt == 1 and not path.exists()
    cache.store(key(), entry(n=400, d=64))  # recomputed and stored again
    assert cache.load(key()) is not None


def test_stale_temporary_files_are_cleaned(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.store(key(), entry())
    host = socket.gethostname().replace(".", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = cache.entry_path(key()).parent
    stale = folder / f".x.npz.{host}.{int(dead.stdout)}.abcd1234.tmp"
    live = folder / f".y.npz.{host}.{os.getpid()}.abcd1234.tmp"
    foreign = folder / ".z.npz.otherhost.1.abcd1234.tmp"
    for p in (stale, live, foreign):
        p.write_bytes(b"partial")
    assert cache.clean_stale() == 1
    assert not stale.exists() and live.exists() and foreign.exists()  # another host's file: only when a day old


def test_slide_fingerprint_follows_content_not_path(tmp_path):
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    a = make_synthetic_slide(tmp_path / "a.tif", 1024, 768, seed=1).path
    b = make_synthetic_slide(tmp_path / "b.tif", 1024, 768, seed=2).path
    copy = tmp_path / "sub" / "renamed.tif"
    copy.parent.mkdir()
    shutil.copy(a, copy)
    assert file_fingerprint(a) == file_fingerprint(copy)
    assert file_fingerprint(a) != file_fingerprint(b)
    grown = tmp_path / "grown.tif"
    grown.write_bytes(a.read_bytes() + b"\0")
    assert file_fingerprint(grown) != file_fingerprint(a)


def test_model_identity_follows_weights(tiny_model, tiny_encoder, tmp_path):
    spec = f"open_clip:{tiny_model.config_path}"
    ident = model_identity(spec, str(tiny_model.checkpoint_path), tiny_encoder)
    copy = tmp_path / "copy.pt"
    shutil.copy(tiny_model.checkpoint_path, copy)
    assert model_identity(spec, str(copy), tiny_encoder).digest == ident.digest  # same file content, other path
    state = torch.load(tiny_model.checkpoint_path, map_location="cpu", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 100)
    state[name] = state[name] + 1e-3
    changed = tmp_path / "changed.pt"
    torch.save(state, changed)
    from zeus_qupath.models import load_encoder

    other = load_encoder(spec, str(changed), "cpu")
    ident2 = model_identity(spec, str(changed), other)
    assert ident2.weights != ident.weights and ident2.digest != ident.digest
    assert json.loads(json.dumps(ident.to_dict()))["embed_dim"] == tiny_encoder.embed_dim


@pytest.mark.slow
def test_new_prompts_or_threshold_only_rescore(tmp_path, tiny_model, spindle_prompts):
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    slide = make_synthetic_slide(tmp_path / "c.tif", 2560, 1792, seed=21).path
    few = json.loads(spindle_prompts.read_text())
    few["0"]["templates"] = few["0"]["templates"][:2]
    other_prompts = tmp_path / "few.json"
    other_prompts.write_text(json.dumps(few))
    base = dict(slides=(str(slide),), out_dir=str(tmp_path / "out"), model=f"open_clip:{tiny_model.config_path}",
                pretrained=str(tiny_model.checkpoint_path), device="cpu", progress=False)
    first = run_segment(RunConfig(prompts=str(spindle_prompts), **base))
    assert first.slides[0].cache == "miss" and first.slides[0].patches > 0
    first_scores = PatchScores.load(tmp_path / "out" / "c.scores.npz").scores
    again = run_segment(RunConfig(prompts=str(other_prompts), **base))
    assert again.slides[0].status == "done" and again.slides[0].cache == "hit"
    assert again.slides[0].seconds["embed"] == 0.0
    cached = PatchScores.load(tmp_path / "out" / "c.scores.npz")
    fresh = run_segment(RunConfig(prompts=str(other_prompts), **{**base, "out_dir": str(tmp_path / "fresh")},
                                  use_cache=False))
    assert fresh.slides[0].cache == "off" and not (tmp_path / "fresh" / ".cache").exists()
    np.testing.assert_array_equal(cached.scores, PatchScores.load(tmp_path / "fresh" / "c.scores.npz").scores)
    assert cached.meta["prompts_sha256"] != first.config["prompts"]["sha256"]
    thr = run_segment(RunConfig(prompts=str(other_prompts), params=SegmentParams(threshold=_argmax()), **base))
    assert thr.slides[0].cache == "hit"
    assert json.loads((tmp_path / "out" / "run.json").read_text())["parameters"]["threshold"] == "argmax"
    # a corrupt entry is detected, recomputed and replaced, never used
    (entry_path,) = (tmp_path / "out" / ".cache").glob("*/*.npz")
    entry_path.write_bytes(entry_path.read_bytes()[:1000])
    redo = run_segment(RunConfig(prompts=str(spindle_prompts), **base))
    assert redo.slides[0].cache == "miss"
    np.testing.assert_array_equal(PatchScores.load(tmp_path / "out" / "c.scores.npz").scores, first_scores)
    with np.load(entry_path) as z:  # the entry was written again, whole
        assert z["features"].shape == (redo.slides[0].patches, 64) and json.loads(str(z["meta"]))["checksum"]


def _argmax():
    from zeus_qupath.params import Threshold

    return Threshold("argmax")
