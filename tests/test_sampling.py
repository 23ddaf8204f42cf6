"""Adaptive sampling (zeus_qupath/sampling.py): which patches it embeds, and the mask it gives against exact.

The reference mask is ZEUS's rule at full resolution over every grid patch (reconstruct.zeus_mask_fullres);
the adaptive mask is the same rule over the embedded patches only, as the scores file holds them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from zeus_qupath.errors import ZeusError
from zeus_qupath.outputs import PatchScores
from zeus_qupath.reconstruct import zeus_mask_fullres
from zeus_qupath.sampling import (
    SamplingRule,
    adapter_diff_bound,
    class_differences,
    coarse_lattice,
    envelopes,
    sample_patches,
    unsettled_patches,
)

CLASSES = ("tumor", "normal")
P, S = 64, 16  # a small patch and stride keep the full-resolution reference cheap


def lattice(width: int, height: int, origin: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = (height - P - origin[1]) // S + 1, (width - P - origin[0]) // S + 1
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    index = np.stack([r.ravel(), c.ravel()], axis=1).astype(np.int64)
    return index, index[:, ::-1] * S + np.array(origin)


def disc_scores(coords: np.ndarray, centre: tuple[float, float], radius: float, noise: float,
                seed: int = 0) -> np.ndarray:
    """Two-class scores: tumor inside a disc, margin shrinking towards its edge, plus noise."""
    rng = np.random.default_rng(seed)
    d = np.hypot(coords[:, 0] + P / 2 - centre[0], coords[:, 1] + P / 2 - centre[1])
    t = np.clip((radius - d) / (2 * P), -1, 1) * 0.05 + rng.normal(0, noise, len(d))
    return np.stack([0.3 + t / 2, 0.3 - t / 2], axis=1).astype(np.float32)


def run(coords, index, scores, rule, width, height, classes=CLASSES, positive="tumor", keep=None):
    calls = []

    def embed(positions):
        calls.append(positions.copy())
        return [scores[positions]], None if keep is None else keep[positions]

    out = sample_patches(coords, index, patch_size=P, stride=S, width=width, height=height, classes=classes,
                         positive_class=positive, embed=embed, score=lambda f: f[0],
                         embed_dims=[scores.shape[1]], rule=rule)
    return out, calls


def mask_of(coords, scores, width, height, classes=CLASSES, positive="tumor"):
    return zeus_mask_fullres(PatchScores(coords, scores, classes, positive, P, S, width, height, None))


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_score_bound_gives_the_exact_mask():
    """bound="scores" is a proof: whatever the skipped patches hold, the mask is the exact one."""
    w, h = 640, 480
    index, coords = lattice(w, h)
    scores = disc_scores(coords, (300, 250), 150, 0.005)
    out, _ = run(coords, index, scores, SamplingRule("adaptive", bound="scores"), w, h)
    exact = mask_of(coords, scores, w, h)
    np.testing.assert_array_equal(mask_of(coords[out.kept], scores[out.kept], w, h), exact)
    assert out.unsettled == 0


def test_neighbour_rule_embeds_a_fraction_and_keeps_the_mask():
    w, h = 1280, 960
    index, coords = lattice(w, h)
    scores = disc_scores(coords, (600, 450), 300, 0.002)
    out, calls = run(coords, index, scores, SamplingRule("adaptive"), w, h)
    exact = mask_of(coords, scores, w, h)
    adaptive = mask_of(coords[out.kept], scores[out.kept], w, h)
    assert 0.06 < out.embedded.mean() < 0.45  # the coarse sixteenth plus a band around the disc's edge
    np.testing.assert_array_equal(adaptive, exact)
    # the first round is the coarse lattice (every 4th row and column), the second only its half step (every
    # other row and column), later ones any patch; no patch is embedded twice
    np.testing.assert_array_equal(calls[0], np.flatnonzero((index[:, 0] % 4 == 0) & (index[:, 1] % 4 == 0)))
    assert len(calls) >= 3 and np.all(index[calls[1]] % 2 == 0) and np.any(index[calls[2]] % 2 == 1)
    everything = np.concatenate(calls)
    assert len(everything) == len(np.unique(everything)) == out.embedded.sum()


def test_near_tied_scores_fall_back_towards_exact():
    """Random scores with no spatial structure (a random-weight model): nearly every patch is needed."""
    w, h = 640, 480
    index, coords = lattice(w, h)
    rng = np.random.default_rng(1)
    scores = (0.2 + rng.normal(0, 0.01, (len(coords), 2))).astype(np.float32)
    out, _ = run(coords, index, scores, SamplingRule("adaptive"), w, h)
    assert out.embedded.mean() > 0.9
    exact = mask_of(coords, scores, w, h)
    assert dice(mask_of(coords[out.kept], scores[out.kept], w, h), exact) > 0.99


def test_settled_cells_by_hand():
    """Three patches in a row (x = 0, 2, 4; size 4): the middle one is missing.

    Cells [2, 4) and [4, 6) are each covered by one embedded patch (difference +1) and the missing one.
    With the score bound [-2, 2] the missing patch could flip them (1 - 2 < 0): it must be embedded.
    With an envelope [0.5, 1] (its neighbours agree) they are settled positive: nothing to embed.
    """
    coords = np.array([[0, 0], [2, 0], [4, 0]])
    embedded_scores = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    emb = PatchScores(coords[[0, 2]], embedded_scores, CLASSES, "tumor", 4, 2, 8, 4, None)
    take, unsettled = unsettled_patches(emb, coords, np.array([0, 2]), np.array([[-2.0]]), np.array([[2.0]]))
    assert take.tolist() == [False, True, False] and unsettled == 2
    take, unsettled = unsettled_patches(emb, coords, np.array([0, 2]), np.array([[0.5]]), np.array([[1.0]]))
    assert not take.any() and unsettled == 0
    # a negative cell is settled only when some class stays at or above the positive one: -1 + 1 <= 0 (a tie)
    emb_neg = PatchScores(coords[[0, 2]], -embedded_scores + 0.0, CLASSES, "tumor", 4, 2, 8, 4, None)
    take, _ = unsettled_patches(emb_neg, coords, np.array([0, 2]), np.array([[0.0]]), np.array([[1.0]]))
    assert not take.any()
    take, _ = unsettled_patches(emb_neg, coords, np.array([0, 2]), np.array([[0.0]]), np.array([[1.5]]))
    assert take.tolist() == [False, True, False]


def test_three_classes_follow_the_closest_rival():
    """Positive wins only if it beats every other class: the envelope of each difference counts."""
    coords = np.array([[0, 0], [2, 0], [4, 0]])
    classes = ("tumor", "normal", "fat")
    emb = PatchScores(coords[[0, 2]], np.array([[0.5, 0.1, 0.45], [0.5, 0.1, 0.45]], np.float32), classes, "tumor",
                      4, 2, 8, 4, None)
    # tumor - normal = 0.4 (safe), tumor - fat = 0.05: a missing patch at -0.1 against fat could flip the cell
    lo, hi = np.array([[0.3, -0.1]]), np.array([[0.5, 0.1]])
    take, _ = unsettled_patches(emb, coords, np.array([0, 2]), lo, hi)
    assert take.tolist() == [False, True, False]
    take, _ = unsettled_patches(emb, coords, np.array([0, 2]), np.array([[0.3, 0.0]]), hi)
    assert not take.any()


def test_envelopes_from_neighbours_and_dropped_ones():
    coords = np.array([[0, 0], [16, 0], [32, 0], [48, 0], [200, 0]])
    embedded = np.array([True, False, True, False, False])
    diffs = np.array([[0.1], [0.3]])
    rule = SamplingRule("adaptive", reach=20)
    lo, hi = envelopes(coords, 20, embedded, diffs, rule)
    # patch 1 sees both embedded neighbours (16 px away), patch 3 only patch 2, patch 4 none (score bound)
    np.testing.assert_allclose(lo[:, 0], [0.1, 0.3, -2.0])
    np.testing.assert_allclose(hi[:, 0], [0.3, 0.3, 2.0])
    lo, hi = envelopes(coords, 20, embedded, diffs, SamplingRule("adaptive", slack=0.5))
    np.testing.assert_allclose([lo[0, 0], hi[0, 0]], [0.0, 0.4], atol=1e-12)
    # patch 2 was read and dropped as white (difference 0): its skipped neighbours may add nothing too
    lo, hi = envelopes(coords, 20, embedded, np.array([[0.1], [0.0]]), rule)
    np.testing.assert_allclose([lo[:, 0], hi[:, 0]], [[0.0, 0.0, -2.0], [0.1, 0.0, 2.0]])


def test_envelope_uses_the_nearest_surrounding_ring():
    """Missing patch (2, 2) of a 16 px lattice. Ring 1 holds (3, 3) only (one side); ring 2 adds (0, 0) and
    (4, 4), so it is surrounded in x and in y there: the envelope is the range over rings 1-2, without ring
    3's (5, 5). With (3, 3) and (5, 5) alone it is never surrounded: every ring within reach counts."""
    s = 16
    cells = [(2, 2), (3, 3), (0, 0), (4, 4), (5, 5)]
    coords = np.array([[c * s, r * s] for r, c in cells], dtype=np.int64)
    values = np.array([[0.1], [0.4], [0.2], [0.5]])
    embedded = np.array([False, True, True, True, True])
    lo, hi = envelopes(coords, 3 * s, embedded, values, SamplingRule("adaptive"), step=s)
    np.testing.assert_allclose([lo[0, 0], hi[0, 0]], [0.1, 0.4])
    embedded = np.array([False, True, False, False, True])
    lo, hi = envelopes(coords, 3 * s, embedded, values[[0, 3]], SamplingRule("adaptive"), step=s)
    # (2, 2): both; (0, 0): only (3, 3) within reach; (4, 4): surrounded at ring 1 by (3, 3) and (5, 5)
    np.testing.assert_allclose([lo[:, 0], hi[:, 0]], [[0.1, 0.1, 0.1], [0.5, 0.1, 0.5]])


def test_white_patches_found_while_sampling_add_nothing():
    """Patches the reader drops (white/black) are neither scored nor asked for again; the mask is exact's."""
    w, h = 640, 480
    index, coords = lattice(w, h)
    scores = disc_scores(coords, (300, 250), 150, 0.002)
    keep = coords[:, 0] < 500  # the right edge is 'white'
    out, calls = run(coords, index, scores, SamplingRule("adaptive"), w, h, keep=keep)
    assert not (out.kept & ~keep).any()
    everything = np.concatenate(calls)
    assert len(everything) == len(np.unique(everything))
    exact = mask_of(coords[keep], scores[keep], w, h)
    np.testing.assert_array_equal(mask_of(coords[out.kept], scores[out.kept], w, h), exact)


def test_coarse_lattice_follows_each_patch_lattice():
    """Per-contour grids: the coarse test is on each patch's own lattice index, not on its pixel position."""
    index = np.array([[0, 0], [0, 1], [1, 0], [2, 2], [3, 4]])
    assert coarse_lattice(index, 2).tolist() == [True, False, False, True, False]
    assert coarse_lattice(index, 1).all()


def test_a_contour_off_the_coarse_lattice_is_still_covered():
    """A lone row of patches at odd lattice rows: none is in the first round; cells uncovered by embedded
    patches have no settled decision, so their patches are embedded."""
    w, h = 640, 480
    index, coords = lattice(w, h)
    pick = index[:, 0] == 3  # one row, odd
    index, coords = index[pick], coords[pick]
    scores = disc_scores(coords, (300, 80), 100, 0.0)
    out, _ = run(coords, index, scores, SamplingRule("adaptive"), w, h)
    exact = mask_of(coords, scores, w, h)
    np.testing.assert_array_equal(mask_of(coords[out.kept], scores[out.kept], w, h), exact)


def test_ensemble_embeds_the_same_patches_for_every_model():
    """Two 'models' whose mean is the score: the rule sees the mean, and both embed the chosen patches."""
    w, h = 640, 480
    index, coords = lattice(w, h)
    scores = disc_scores(coords, (300, 250), 150, 0.002)
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 0.05, scores.shape).astype(np.float32)
    a, b = scores + noise, scores - noise  # each alone disagrees with the mean
    asked = []

    def embed(positions):
        asked.append(positions)
        return [a[positions], b[positions]], None

    out = sample_patches(coords, index, patch_size=P, stride=S, width=w, height=h, classes=CLASSES,
                         positive_class="tumor", embed=embed, score=lambda f: (f[0] + f[1]) / 2,
                         embed_dims=[2, 2], rule=SamplingRule("adaptive"))
    np.testing.assert_array_equal(out.features[0][out.kept], a[out.kept])
    np.testing.assert_array_equal(out.features[1][out.kept], b[out.kept])
    mean = (a + b) / 2
    np.testing.assert_array_equal(mask_of(coords[out.kept], mean[out.kept], w, h), mask_of(coords, mean, w, h))
    assert out.embedded.mean() < 0.9


def test_adapter_score_bound_holds_and_is_reached():
    """Adapted scores are not cosines: their bound comes from the adapter's weights, checked on unit vectors."""
    rng = np.random.default_rng(4)
    w, b = rng.normal(size=(3, 16)), rng.normal(size=3)
    bound = adapter_diff_bound(w, b, positive=1)
    f = rng.normal(size=(5000, 16))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    s = f @ w.T + b
    assert np.abs(class_differences(s, 1)).max() <= bound + 1e-12
    j = int(np.argmax([np.linalg.norm(w[1] - w[k]) + abs(b[1] - b[k]) for k in (0, 2)]))
    k = (0, 2)[j]
    u = (w[1] - w[k]) / np.linalg.norm(w[1] - w[k]) * np.sign(b[1] - b[k] or 1.0)
    assert abs((u @ w[1] + b[1]) - (u @ w[k] + b[k])) == pytest.approx(bound)


def test_rule_refuses_bad_settings():
    with pytest.raises(ZeusError, match="--sampling"):
        SamplingRule("sometimes")
    with pytest.raises(ZeusError):
        SamplingRule("adaptive", coarse_step=0)
    assert SamplingRule().to_dict() == {"mode": "exact"}
    assert json.dumps(SamplingRule("adaptive").to_dict())


@pytest.mark.slow
def test_segment_adaptive_against_exact(tiny_model, spindle_prompts, tmp_path):
    """zeus segment --sampling adaptive on a synthetic slide with the tiny (trained) model: fewer patches,
    the same mask within Dice 0.99, the scores file holds only embedded rows, run.json records it."""
    from zeus_qupath.cli import main
    from zeus_qupath.reconstruct import zeus_mask
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    slide = make_synthetic_slide(tmp_path / "s.tif", 2560, 1792, seed=40).path
    masks, scores = {}, {}
    for mode in ("exact", "adaptive"):
        out = tmp_path / mode
        rc = main(["segment", str(slide), "--prompts", str(spindle_prompts), "--out", str(out), "--device", "cpu",
                   "--model", f"open_clip:{tiny_model.config_path}", "--pretrained", str(tiny_model.checkpoint_path),
                   "--sampling", mode, "--quiet", "--tiles"])
        assert rc == 0
        scores[mode] = PatchScores.load(out / "s.scores.npz")
        masks[mode] = zeus_mask(scores[mode]).mask
        run_json = json.loads((out / "run.json").read_text())
        assert run_json["sampling"] == mode
        tiles = json.loads((out / "s.tiles.geojson").read_text())["features"]
        assert len(tiles) == len(scores[mode].coords)  # a tile per embedded patch: none for skipped ones
    info = scores["adaptive"].meta["sampling"]
    assert info["grid_patches"] >= len(scores["exact"].coords)  # before the white/black filters
    assert info["scored"] == len(scores["adaptive"].coords) < len(scores["exact"].coords)
    # every adaptive row is an exact row with the same scores (same patch, same model)
    ex = {tuple(c): s for c, s in zip(scores["exact"].coords.tolist(), scores["exact"].scores, strict=True)}
    for c, s in zip(scores["adaptive"].coords.tolist(), scores["adaptive"].scores, strict=True):
        np.testing.assert_allclose(s, ex[tuple(c)], atol=1e-5)
    assert dice(masks["adaptive"], masks["exact"]) > 0.99
    slide_report = json.loads((tmp_path / "adaptive" / "run.json").read_text())["slides"][0]
    assert slide_report["sampling"]["embedded"] == info["embedded"]
    assert "sampling" not in json.loads((tmp_path / "exact" / "run.json").read_text())["slides"][0]
    # with the exact run's (complete) cache entry nothing is embedded or sampled: the exact scores
    out = tmp_path / "cached"
    assert main(["segment", str(slide), "--prompts", str(spindle_prompts), "--out", str(out), "--device", "cpu",
                 "--model", f"open_clip:{tiny_model.config_path}", "--pretrained", str(tiny_model.checkpoint_path),
                 "--sampling", "adaptive", "--quiet", "--cache", str(tmp_path / "exact" / ".cache")]) == 0
    cached = PatchScores.load(out / "s.scores.npz")
    np.testing.assert_array_equal(cached.coords, scores["exact"].coords)
    assert json.loads((out / "run.json").read_text())["slides"][0]["cache"] == "hit"
