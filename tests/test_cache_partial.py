"""Partial embedding-cache entries: what ``--sampling adaptive`` embedded is kept, and a later run embeds only the rest.

The disk format is checked against hand-built grids and states and against a complete entry written by the
code that predates partial entries (tests/fixtures/cache/complete_entry_v2.npz); the end-to-end tests count
the patches that really go through the model (a hook on :func:`zeus_qupath.embed.image_features`) and compare
the scores file with a cold exact run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from zeus_qupath.embedding_cache import EmbeddingCache
from zeus_qupath.feature_cache import DROPPED, KEPT, MISSING, CachedEmbeddings, CacheKey, FeatureCache
from zeus_qupath.grid import PatchGeometry, PatchGrid
from zeus_qupath.outputs import PatchScores
from zeus_qupath.tissue import TissueMask

GEO = PatchGeometry(448, 112)
FIXTURE = Path(__file__).parent / "fixtures" / "cache" / "complete_entry_v2.npz"


def key(slide: str = "f" * 64, tissue: bool | str = "zeus") -> CacheKey:
    return CacheKey.make(slide, "m" * 64, "fp32", GEO, None, tissue)


def grid(n: int = 12, pixel_filter: bool = True) -> PatchGrid:
    index = np.stack([np.arange(n) // 4, np.arange(n) % 4], axis=1).astype(np.int64)
    origin = np.tile(np.array([[7, 3]], np.int64), (n, 1))
    return PatchGrid(GEO, 1000, 800, 3, 4, index, origin, pixel_filter=pixel_filter)


TISSUE = TissueMask(np.eye(6, 8, dtype=bool), 128.0)
#                   0  1  2  3  4  5  6  7  8  9 10 11
STATE = np.array([KEPT, MISSING, DROPPED, KEPT, MISSING, MISSING, KEPT, KEPT, DROPPED, MISSING, KEPT, MISSING],
                 dtype=np.int8)


def feats(k: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(k, d)).astype(np.float32)


def test_partial_entry_roundtrip_keeps_grid_states_and_pending_filters(tmp_path):
    cache = FeatureCache(tmp_path)
    f = feats(5)
    entry = CachedEmbeddings.from_state(grid(), TISSUE, STATE, f)
    assert not entry.complete
    path = cache.store(key(), entry)
    assert path.name.endswith(".partial.npz") and not cache.entry_path(key()).exists()
    assert cache.load(key()) is None  # who asks for complete entries (zeus learn) does not get it
    back = cache.load(key(), partial=True)
    assert back is not None and not back.complete and back.pixel_filter
    np.testing.assert_array_equal(back.state, STATE)
    np.testing.assert_array_equal(back.features, f)
    g = back.grid(GEO)
    assert len(g) == 12 and g.pixel_filter and g.origin.tolist() == [[7, 3]] * 12
    # slots: the row of each kept patch in grid order, -1 missing, -2 dropped (by hand)
    assert back.slots().tolist() == [0, -1, -2, 1, -1, -1, 2, 3, -2, -1, 4, -1]
    np.testing.assert_array_equal(back.tissue.mask, TISSUE.mask)
    # a complete entry replaces the partial one; a partial one never replaces a complete one
    done = CachedEmbeddings.from_state(grid(), TISSUE, np.where(STATE == MISSING, KEPT, STATE), feats(10))
    assert done.complete and len(done.index) == 10 and not done.grid(GEO).pixel_filter  # dropped ones left out
    cache.store(key(), done)
    assert cache.entry_path(key()).exists() and not cache.partial_path(key()).exists()
    assert cache.store(key(), entry) == cache.entry_path(key()) and not cache.partial_path(key()).exists()
    assert cache.load(key(), partial=True).complete


def test_a_complete_entry_is_written_in_the_format_that_predates_partial_entries(tmp_path):
    """from_state with nothing missing gives today's complete form: the same arrays, no state, same checksum."""
    f = feats(10)
    done = CachedEmbeddings.from_state(grid(), TISSUE, np.where(STATE == MISSING, KEPT, STATE), f)
    kept = np.flatnonzero(STATE != DROPPED)
    plain = CachedEmbeddings(f, grid().index[kept], 3, 4, 1000, 800, TISSUE, grid().origin[kept])
    path = FeatureCache(tmp_path).store(key(), done)
    other = FeatureCache(tmp_path / "b").store(key(), plain)
    with np.load(path) as a, np.load(other) as b:
        assert sorted(a.files) == sorted(b.files) and "state" not in a.files
        assert json.loads(str(a["meta"]))["checksum"] == json.loads(str(b["meta"]))["checksum"]
        assert "partial" not in json.loads(str(a["meta"]))


def test_an_entry_written_before_partial_entries_still_loads(tmp_path):
    """A complete entry written by the code before partial entries existed (same cache version) loads unchanged."""
    k = CacheKey.make("a" * 64, "b" * 64, "fp32", GEO, None, False)
    cache = FeatureCache(tmp_path)
    cache.entry_path(k).parent.mkdir(parents=True)
    shutil.copy(FIXTURE, cache.entry_path(k))
    for partial in (False, True):
        back = cache.load(k, partial=partial)
        assert back is not None and back.complete and cache.corrupt == 0
    rng = np.random.default_rng(18)  # how the fixture's features were made
    want = rng.normal(size=(12, 8)).astype(np.float32)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_array_equal(back.features, want)
    assert back.index[:, 0].tolist() == [0] * 4 + [1] * 4 + [2] * 4 and back.origin.tolist() == [[3, 5]] * 12
    assert (back.rows, back.cols, back.width, back.height) == (3, 4, 900, 700)
    assert back.slots().tolist() == list(range(12)) and not back.grid(GEO).pixel_filter
    assert back.tissue.mask.sum() == 5 * 8 and back.tissue.downsample == 64.0


@pytest.mark.parametrize("damage", ["truncate", "flip", "state", "no_state", "complete_name"])
def test_a_damaged_partial_entry_is_a_miss_and_is_removed(tmp_path, damage):
    cache = FeatureCache(tmp_path)
    path = cache.store(key(), CachedEmbeddings.from_state(grid(400, True), TISSUE, _states(400), feats(200, 64)))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":  # a byte inside the features array
        i = data.index(b"features.npy") + 2000
        data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage in ("state", "no_state"):  # one patch's state changed, or the state array gone
        with np.load(path) as z:
            arrays = {name: z[name] for name in z.files}
        if damage == "state":
            arrays["state"][np.flatnonzero(arrays["state"] == MISSING)[0]] = DROPPED
        else:
            del arrays["state"]
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
    else:  # a partial entry under the complete entry's name
        path.rename(cache.entry_path(key()))
        path = cache.entry_path(key())
    assert cache.load(key(), partial=True) is None
    assert cache.corrupt == 1 and cache.misses == 1 and not path.exists()


def _states(n: int) -> np.ndarray:
    state = np.full(n, MISSING, np.int8)
    state[: n // 2] = KEPT
    state[n // 2: n // 2 + 10] = DROPPED
    return state


def test_the_service_reads_a_partial_entry_and_embeds_only_the_rest(tmp_path):
    """EmbeddingCache.entry (what zeus serve uses) loads a partial disk entry as a partial memory entry."""
    cache = FeatureCache(tmp_path)
    f = feats(5, 8)
    cache.store(key(), CachedEmbeddings.from_state(grid(), TISSUE, STATE, f))
    tiers = EmbeddingCache(tmp_path)
    entry = tiers.entry(key(), 1000, 800, 8, GEO, None, lambda: pytest.fail("the disk tier has it"))
    assert tiers.stats().disk_hits == 1 and not entry.complete and not entry.on_disk
    assert entry.grid.pixel_filter  # the white/black filters still run on the patches read later
    assert entry.missing(np.arange(12)).tolist() == [1, 4, 5, 9, 11]
    assert entry.scored(np.arange(12)).tolist() == [0, 3, 6, 7, 10]
    np.testing.assert_array_equal(entry.features(np.array([10, 0])), f[[4, 0]])
    assert tiers.load(key(), 1000, 800, 8) is None  # a partial entry is not a complete one
    with entry.lock:
        rest = np.array([1, 4, 5, 9, 11])
        entry.store(rest, np.full((5, 8), 2.0, np.float32), np.array([True, True, False, True, True]))
        assert entry.complete and tiers.persist(entry)
    done = cache.load(key())
    assert done is not None and done.complete and not cache.partial_path(key()).exists()
    assert done.index.tolist() == grid().index[[0, 1, 3, 4, 6, 7, 9, 10, 11]].tolist()  # 2, 5, 8 dropped
    np.testing.assert_array_equal(done.features[:, 0], [f[0, 0], 2, f[1, 0], 2, f[2, 0], f[3, 0], 2, f[4, 0], 2])


# ---------------------------------------------------------------------------------------- zeus segment


class _Counter:
    """Counts the patches that go through a model (every embedding path calls embed.image_features)."""

    def __init__(self, monkeypatch) -> None:
        import zeus_qupath.embed as embed

        self.patches = 0
        real = embed.image_features

        def counting(encoder, pixels):
            self.patches += int(pixels.shape[0])
            return real(encoder, pixels)

        monkeypatch.setattr(embed, "image_features", counting)

    def take(self) -> int:
        n, self.patches = self.patches, 0
        return n


@pytest.mark.slow
def test_adaptive_then_exact_embeds_only_what_is_missing(tiny_model, spindle_prompts, tmp_path, monkeypatch):
    """An adaptive run leaves a partial entry; another adaptive run embeds nothing; an exact run embeds exactly
    the grid patches the adaptive runs did not read and gives a cold exact run's scores; then the entry is complete."""
    from zeus_qupath.cli import main
    from zeus_qupath.reconstruct import zeus_mask
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    slide = make_synthetic_slide(tmp_path / "s.tif", 2560, 1792, seed=40).path
    cache = tmp_path / "cache"
    counter = _Counter(monkeypatch)

    def segment(name: str, *extra: str) -> tuple[dict, PatchScores]:
        out = tmp_path / name
        assert main(["segment", str(slide), "--prompts", str(spindle_prompts), "--out", str(out), "--device", "cpu",
                     "--model", f"open_clip:{tiny_model.config_path}", "--pretrained",
                     str(tiny_model.checkpoint_path), "--quiet", *extra]) == 0
        return json.loads((out / "run.json").read_text())["slides"][0], PatchScores.load(out / "s.scores.npz")

    first, adaptive = segment("adaptive", "--sampling", "adaptive", "--cache", str(cache))
    info = first["sampling"]
    assert first["cache"] == "miss" and info["from_cache"] == 0
    # the patches read that the white/black filters let through went through the model
    assert counter.take() == info["scored"] and info["skipped"] > 0
    (partial,) = cache.glob("*/*.partial.npz")
    assert not [p for p in cache.glob("*/*.npz") if not p.name.endswith(".partial.npz")]

    again, adaptive2 = segment("adaptive2", "--sampling", "adaptive", "--cache", str(cache))
    assert counter.take() == 0 and again["cache"] == "hit"
    assert again["sampling"]["from_cache"] == again["sampling"]["embedded"] == info["embedded"]
    assert again["cache_reused"] == info["scored"]
    np.testing.assert_array_equal(adaptive2.coords, adaptive.coords)
    np.testing.assert_array_equal(adaptive2.scores, adaptive.scores)

    exact, warm = segment("exact", "--cache", str(cache))
    embedded_now = counter.take()
    assert exact["cache"] == "partial" and exact["cache_reused"] == info["scored"]
    # exactly the grid patches the adaptive run did not read, less those the white/black filters drop now
    cold_report, cold = segment("cold", "--no-cache")
    assert counter.take() == cold_report["patches"] == exact["patches"]
    dropped_total = info["grid_patches"] - cold_report["patches"]
    dropped_before = info["embedded"] - info["scored"]
    assert embedded_now == info["grid_patches"] - info["embedded"] - (dropped_total - dropped_before)
    # its rate is that of the patches it read, not of every scored patch (most came from the cache)
    read_now = info["grid_patches"] - info["embedded"]
    assert exact["patches_per_s"] * exact["seconds"]["embed"] == pytest.approx(read_now, rel=0.05, abs=1)
    np.testing.assert_array_equal(warm.coords, cold.coords)
    np.testing.assert_allclose(warm.scores, cold.scores, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(zeus_mask(warm).mask, zeus_mask(cold).mask)
    assert not partial.exists()
    (complete,) = cache.glob("*/*.npz")
    with np.load(complete) as z:
        assert "state" not in z.files and z["features"].shape[0] == cold_report["patches"]

    last, _ = segment("last", "--cache", str(cache))
    assert counter.take() == 0 and last["cache"] == "hit" and last["cache_reused"] == last["patches"]


@pytest.mark.slow
def test_the_service_reuses_what_an_adaptive_run_embedded(tiny_model, spindle_prompts, tmp_path, monkeypatch):
    """zeus serve's engine reads the partial entry of a zeus segment --sampling adaptive run: it embeds only the
    patches the run did not read, writes the complete entry, and a later exact zeus segment embeds nothing."""
    from zeus_qupath.cli import main
    from zeus_qupath.models.pool import ModelPool
    from zeus_qupath.models.specs import ModelSpec
    from zeus_qupath.on_demand import OnDemandSegmenter, SegmentRequest
    from zeus_qupath.params import SegmentParams
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    slide = make_synthetic_slide(tmp_path / "s.tif", 2048, 1536, seed=7).path
    cache = tmp_path / "cache"
    spec = ModelSpec(f"open_clip:{tiny_model.config_path}", str(tiny_model.checkpoint_path))
    args = ["--prompts", str(spindle_prompts), "--device", "cpu", "--model", spec.spec, "--pretrained",
            spec.pretrained, "--quiet", "--cache", str(cache)]
    counter = _Counter(monkeypatch)
    assert main(["segment", str(slide), "--out", str(tmp_path / "a"), "--sampling", "adaptive", *args]) == 0
    info = json.loads((tmp_path / "a" / "run.json").read_text())["slides"][0]["sampling"]
    assert counter.take() == info["scored"] and info["skipped"] > 0

    segmenter = OnDemandSegmenter(SegmentParams(), EmbeddingCache(cache), ModelPool("cpu"))
    result = segmenter.segment(SegmentRequest(slide, (spec,), spindle_prompts))
    assert segmenter.cache.stats().disk_hits == 1
    assert result.embedded == info["grid_patches"] - info["embedded"]  # read now: what the run skipped
    assert counter.take() == result.patches - info["scored"]  # through the model: those the filters kept
    assert segmenter.cache.entries()[0].on_disk
    assert [p.name.endswith(".partial.npz") for p in cache.glob("*/*.npz")] == [False]

    assert main(["segment", str(slide), "--out", str(tmp_path / "b"), *args]) == 0
    report = json.loads((tmp_path / "b" / "run.json").read_text())["slides"][0]
    assert counter.take() == 0 and report["cache"] == "hit" and report["patches"] == result.patches
