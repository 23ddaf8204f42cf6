"""The two-tier embedding cache: partial slides in memory (LRU), complete slides on disk, one key for both commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zeus_qupath.embedding_cache import EmbeddingCache, SlideEmbeddings
from zeus_qupath.feature_cache import CacheKey
from zeus_qupath.grid import PatchGeometry, PatchGrid
from zeus_qupath.models.pool import ModelPool
from zeus_qupath.models.specs import ModelSpec
from zeus_qupath.on_demand import OnDemandSegmenter, SegmentRequest
from zeus_qupath.params import SegmentParams
from zeus_qupath.runs.run import RunConfig, run_segment
from zeus_qupath.samples import prompt_path
from zeus_qupath.tissue import TissueMask

GEOMETRY = PatchGeometry(448, 112)


def _key(name: str) -> CacheKey:
    return CacheKey.make(name, "model", "fp32", GEOMETRY, None, "coarse")


def _entry(key: CacheKey, n: int, dim: int = 8, origin: bool = False) -> SlideEmbeddings:
    tissue = TissueMask(mask=np.ones((1, 1), dtype=bool), downsample=4096.0)
    index = np.stack([np.zeros(n, np.int64), np.arange(n, dtype=np.int64)], axis=1)
    grid = PatchGrid(GEOMETRY, 112 * (n + 3), 448, 1, n, index,
                     np.tile(np.array([[5, 7]], np.int64), (n, 1)) if origin else None)
    return SlideEmbeddings(key, 112 * (n + 3), 448, None, tissue, grid, dim)


def test_slide_embeddings_store_only_what_is_missing_and_drop_filtered_patches():
    entry = _entry(_key("a"), 10, origin=True)
    assert entry.missing(np.arange(10)).tolist() == list(range(10))
    feats = np.arange(3 * 8, dtype=np.float32).reshape(3, 8)
    entry.store(np.array([7, 2, 5]), feats)
    assert entry.embedded == 3 and not entry.complete
    assert entry.missing(np.arange(10)).tolist() == [0, 1, 3, 4, 6, 8, 9]
    np.testing.assert_array_equal(entry.features(np.array([2, 5, 7])), feats[[1, 2, 0]])
    with pytest.raises(KeyError):
        entry.features(np.array([0]))
    # the rest, with two patches the white/black filters dropped
    rest = np.array([0, 1, 3, 4, 6, 8, 9])
    kept = np.array([True, False, True, True, True, False, True])
    entry.store(rest, np.ones((7, 8), np.float32) * rest[:, None], kept)
    assert entry.complete and entry.embedded == 8
    assert entry.missing(np.arange(10)).size == 0
    assert entry.scored(np.arange(10)).tolist() == [0, 2, 3, 4, 5, 6, 7, 9]
    cached = entry.to_cached()  # what goes to disk: the kept patches, in grid order, origins included
    assert cached.index[:, 1].tolist() == [0, 2, 3, 4, 5, 6, 7, 9]
    assert cached.origin is not None and cached.origin.tolist() == [[5, 7]] * 8
    np.testing.assert_array_equal(cached.features[[1, 6]], feats[[1, 0]])  # grid positions 2 and 7
    assert cached.features[0, 0] == 0 and cached.features[-1, 0] == 9


def test_memory_tier_is_an_lru_bounded_by_entries_and_bytes(tmp_path):
    cache = EmbeddingCache(None, max_entries=2)
    made = []

    def maker(key):
        def create():
            made.append(key.slide)
            return _entry(key, 5)
        return create

    a, b, c = _key("a"), _key("b"), _key("c")

    def get(key):
        return cache.entry(key, 112 * 8, 448, 8, GEOMETRY, None, maker(key))

    ea = get(a)
    assert get(a) is ea and made == ["a"]
    get(b)
    get(a)  # a is now the most recent
    get(c)  # evicts b
    assert sorted(e.key.slide for e in cache.entries()) == ["a", "c"]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.disk_hits, stats.evictions) == (2, 3, 0, 1)
    # the byte budget evicts the least recently used entries, but never the last one
    small = EmbeddingCache(None, max_entries=10, max_bytes=1)
    small.entry(a, 112 * 8, 448, 8, GEOMETRY, None, maker(a))
    small.entry(b, 112 * 8, 448, 8, GEOMETRY, None, maker(b))
    assert [e.key for e in small.entries()] == [b]
    small.record_embedded(5)
    assert small.stats().embedded_patches == 5 and small.stats().entries == 1


def test_complete_entries_go_to_disk_once_and_come_back_complete(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    key = _key("slide")
    entry = cache.entry(key, 112 * 8, 448, 8, GEOMETRY, None, lambda: _entry(key, 5))
    with entry.lock:
        entry.store(np.array([0, 1]), np.ones((2, 8), np.float32))
        assert not cache.persist(entry)  # partial: memory only
        entry.store(np.array([2, 3, 4]), np.full((3, 8), 2, np.float32))
        assert cache.persist(entry) and not cache.persist(entry)  # written once
    fresh = EmbeddingCache(tmp_path / "cache")  # another process, the same folder
    again = fresh.entry(key, 112 * 8, 448, 8, GEOMETRY, None, lambda: pytest.fail("must come from disk"))
    assert again.complete and again.on_disk and fresh.stats().disk_hits == 1
    np.testing.assert_array_equal(again.features(np.arange(5))[:, 0], [1, 1, 2, 2, 2])
    assert fresh.load(key, 112 * 8, 448, 8) is not None  # the command line's view of the same entry
    assert fresh.load(key, 112 * 8, 448, 16) is None  # another model width: not this entry


def test_a_slide_the_service_embedded_is_a_cache_hit_for_zeus_segment(tiny_model, tmp_path):
    """The other direction of the shared cache: the service fills the folder, `zeus segment` only re-scores."""
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    slide = make_synthetic_slide(tmp_path / "s.tif", 1536, 1024, seed=7).path
    params = SegmentParams(tissue="coarse")
    cache_dir = tmp_path / "cache"
    spec = ModelSpec(f"open_clip:{tiny_model.config_path}", str(tiny_model.checkpoint_path))
    segmenter = OnDemandSegmenter(params, EmbeddingCache(cache_dir), ModelPool("cpu"))
    result = segmenter.segment(SegmentRequest(slide, (spec,), prompt_path("spindle_cell")))
    assert result.embedded > 0 and segmenter.cache.entries()[0].on_disk
    report = run_segment(RunConfig(slides=(str(slide),), prompts=str(prompt_path("spindle_cell")),
                                   out_dir=str(tmp_path / "out"), model=spec.spec, pretrained=spec.pretrained,
                                   device="cpu", params=params, progress=False, cache_dir=str(cache_dir)))
    (done,) = report.slides
    assert done.cache == "hit"  # no model ran on the slide
    cli = json.loads((tmp_path / "out" / "s.geojson").read_text())
    assert [f["geometry"] for f in cli["features"]] == [
        f["geometry"] for f in json.loads(json.dumps(result.outline.feature_collection()))["features"]]
