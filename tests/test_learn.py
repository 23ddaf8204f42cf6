"""zeus learn without a model: the patch-label rule on hand-computed cases, the adapter file, cross-validation."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, box

from zeus_qupath.adapter import Adapter, fit, fit_stats, identity
from zeus_qupath.errors import ZeusError
from zeus_qupath.learn import (
    CorrectedImage,
    Unit,
    _check_image_fits,
    check_corrections,
    cross_validate,
    label_slide,
    learn,
    unit_dice,
    units_of,
)
from zeus_qupath.params import Threshold
from zeus_qupath.patch_labels import LEFT_OUT, NEGATIVE, Correction, LabelRule, central_cells, patch_labels
from zeus_qupath.tissue import TissueMask

# patches of 40 px at stride 10: the central cell of the patch at (x, y) is [x + 15, x + 25) x [y + 15, y + 25)
P, S = 40, 10
RULE = LabelRule(("normal", "tumor"), "tumor")


def labels_at(xs, anns, rule=RULE, y=0):
    coords = np.array([[x, y] for x in xs])
    return list(patch_labels(coords, P, S, anns, rule).labels)


def test_central_cell_is_the_stride_square_at_the_patch_centre():
    cell = central_cells(np.array([[100, 200]]), P, S, inset=0)[0]
    assert cell.bounds == (115.0, 215.0, 125.0, 225.0)


def test_covered_uncovered_and_mixed_cells():
    tumor = Correction("Tumor", box(15, 0, 35, 40))  # covers the cells of x = 0 and x = 10 in full
    # x=0: [15,25) tumor; x=10: [25,35) tumor; x=5: [20,30) tumor; x=15: [30,40) half tumor, half uncovered;
    # x=30: [45,55) no annotation -> negative (tissue nobody annotated)
    assert labels_at([0, 10, 5, 15, 30], [tumor]) == [1, 1, 1, LEFT_OUT, NEGATIVE]


def test_outline_along_a_cell_edge_within_half_a_pixel_is_not_mixed():
    tumor = Correction("Tumor", box(15, 0, 25.3, 40))  # float32 noise: 0.3 px into the next cell
    assert labels_at([0, 10], [tumor]) == [1, NEGATIVE]


def test_holes_are_uncovered_tissue():
    ring = Polygon([(0, 0), (100, 0), (100, 100), (0, 100)], [[(30, 30), (70, 30), (70, 70), (30, 70)]])
    ann = [Correction("Tumor", ring)]
    # y = 30: x = 20 -> cell [35,45)x[45,55) inside the hole: negative; x = 0 -> [15,25): tumor ring;
    # x = 10 -> [25,35): half ring, half hole: mixed
    assert labels_at([20, 0, 10], ann, y=30) == [NEGATIVE, 1, LEFT_OUT]


def test_overlaps():
    a = Correction("Tumor", box(0, 0, 22, 40))
    b = Correction("Tumor", box(18, 0, 60, 40))  # overlapping tumor outlines are one area
    stroma = Correction("Stroma", box(20, 0, 60, 40))  # a class the prompts lack, over the tumor
    assert labels_at([0, 10], [a, b]) == [1, 1]
    # x=0: [15,25) tumor and stroma meet it -> mixed; x=20: [35,45) tumor and stroma both cover it -> mixed
    assert labels_at([0, 20], [a, b, stroma]) == [LEFT_OUT, LEFT_OUT]


def test_classes_missing_from_the_prompts_are_negative_unless_mapped():
    nec = Correction("Necrosis", box(0, 0, 30, 40))  # covers [15,25) fully, [25,35) half
    assert labels_at([0, 10], [nec]) == [NEGATIVE, NEGATIVE]  # necrosis + uncovered tissue: both negative, not mixed
    mapped = LabelRule(("normal", "tumor"), "tumor", {"necrosis": "tumor"})
    assert labels_at([0, 10], [nec], mapped) == [1, LEFT_OUT]
    assert labels_at([0], [Correction("TUMOR", box(0, 0, 40, 40))]) == [1]  # names compared ignoring case
    with pytest.raises(ZeusError, match="not a prompt class"):
        LabelRule(("normal", "tumor"), "tumor", {"Stroma": "fibrosis"})


def test_three_prompt_classes_keep_named_negative_classes():
    rule = LabelRule(("normal", "stroma", "tumor"), "tumor")
    anns = [Correction("Stroma", box(0, 0, 26, 40)), Correction("Tumor", box(60, 0, 100, 40))]
    # x=0: stroma only -> class 1; x=5: [20,30) stroma + uncovered -> generic negative; x=50: [65,75) tumor -> 2
    assert labels_at([0, 5, 50], anns, rule) == [1, NEGATIVE, 2]


def test_ignore_region_and_unclassified():
    tumor = Correction("Tumor", box(0, 0, 100, 40))
    ignore = Correction("Ignore*", box(24, 0, 26, 40))  # touches the cells of x = 0 and x = 10
    region = Correction("Region*", box(0, 0, 200, 40))  # transparent
    assert labels_at([0, 10, 30], [tumor, ignore, region]) == [LEFT_OUT, LEFT_OUT, 1]
    assert labels_at([100], [tumor, region]) == [NEGATIVE]  # a Region* labels nothing
    assert labels_at([0, 100], [tumor, Correction(None, box(110, 0, 130, 40))]) == [1, LEFT_OUT]


# -- the adapter file ---------------------------------------------------------------------------------------

IDENT = identity({"spec": "m"}, "digest-1", "fp32", patch_size=448, stride=112, target_mpp=None, tissue="zeus",
                 prompts_sha256="p" * 64, classes=("normal", "tumor"), positive_class="tumor")


def make_adapter(seed=0, dim=8):
    rng = np.random.default_rng(seed)
    header = {"identity": IDENT, "method": {"kind": "ridge", "strength": 0.01}, "slides": [{"name": "a"}],
              "cv": {"zero_shot_mean": 0.5, "adapted_mean": 0.7}, "versions": {"zeus-qupath": "x"}}
    return Adapter(rng.normal(size=(2, dim)).astype(np.float32), rng.normal(size=2).astype(np.float32), header)


def test_adapter_file_round_trip_is_deterministic(tmp_path):
    a = make_adapter()
    a.save(tmp_path / "a.npz")
    make_adapter().save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    back = Adapter.load(tmp_path / "a.npz")
    assert np.array_equal(back.weights, a.weights) and np.array_equal(back.bias, a.bias)
    assert back.header["identity"] == IDENT and back.sha256 == a.sha256
    feats = np.eye(8, dtype=np.float32)[:3]
    assert np.allclose(back.scores(feats), feats @ a.weights.T + a.bias)


def _one_line(exc):
    return "\n" not in str(exc.value)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "nan", "header"])
def test_damaged_adapters_are_refused_in_one_line(tmp_path, damage):
    path = tmp_path / "a.npz"
    a = make_adapter()
    if damage == "nan":
        w = a.weights.copy()
        w[0, 0] = np.nan
        Adapter(w, a.bias, a.header).save(path)
    elif damage == "header":
        Adapter(a.weights, a.bias, {**a.header, "identity": {"classes": ["a"]}}).save(path)
    else:
        a.save(path)
        data = bytearray(path.read_bytes())
        if damage == "flip":
            at = bytes(data).index(a.weights.tobytes()[:8]) + 3
            data[at] ^= 0x40
        elif damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data = bytearray(b"not an adapter at all" * 10)
        path.write_bytes(bytes(data))
    with pytest.raises(ZeusError, match="adapter a.npz") as exc:
        Adapter.load(path)
    assert _one_line(exc)


def test_mismatched_adapter_is_refused(tmp_path):
    a = make_adapter()
    a.check(dict(IDENT))
    for key, value in (("model_digest", "other"), ("precision", "bf16"), ("tissue", "coarse"),
                       ("geometry", {"patch_size": 224, "stride": 56, "target_mpp": None}),
                       ("prompts_sha256", "q" * 64)):
        with pytest.raises(ZeusError, match="was learned with another") as exc:
            a.check({**IDENT, key: value})
        assert _one_line(exc)


# -- cross-validation on a synthetic embedding cohort -------------------------------------------------------

TEXT_DIM = 16


def world(seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(TEXT_DIM, 6)))
    cent = q[:, :3].T  # textures: normal, tumor, a confounder
    normal, tumor = cent[0] + 0.5 * q[:, 3], 0.55 * cent[1] + 0.65 * cent[2] + 0.5 * q[:, 4]
    return cent, np.stack([normal / np.linalg.norm(normal), tumor / np.linalg.norm(tumor)])


def synthetic_slide(name, seed, cent, confounder=True, size=2400):
    """Tumor and confounder bands on tissue; patch embeddings mix the textures they cover (448 / 112 px)."""
    rng = np.random.default_rng(seed)
    p, s = 448, 112
    t0 = rng.uniform(0.15, 0.4) * size
    tumor = box(t0, 0, t0 + 0.25 * size, size)
    conf = box(t0 + 0.35 * size, 0, t0 + 0.55 * size, size) if confounder else Polygon()
    n = (size - p) // s + 1
    gx, gy = np.meshgrid(np.arange(n) * s, np.arange(n) * s)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + p, coords[:, 1] + p)
    fb = shapely.area(shapely.intersection(boxes, tumor)) / p**2
    fc = shapely.area(shapely.intersection(boxes, conf)) / p**2 if not conf.is_empty else 0 * fb
    mix = np.stack([1 - fb - fc, fb, fc], axis=1) @ cent + 0.3 * rng.normal(size=(len(coords), TEXT_DIM)) / 4
    feats = (mix / np.linalg.norm(mix, axis=1, keepdims=True)).astype(np.float32)
    tissue = TissueMask(np.ones((size // 64 + 1, size // 64 + 1), bool), 64.0)
    return label_slide(name, name, coords, feats, p, s, size, size, None, tissue, [Correction("Tumor", tumor)],
                       RULE)


def test_cross_validation_never_fits_on_the_held_out_slide():
    cent, text = world()
    slides = [synthetic_slide(f"s{i}", i, cent) for i in range(3)]
    units, kind = units_of(slides)
    assert kind == "slides"
    seen = []

    def recording_fit(stats, *args):
        seen.append(stats.names)
        return fit(stats, *args)

    cv, stats = cross_validate(units, text, ("normal", "tumor"), "tumor", Threshold(), 100.0,
                               cands=[("prototype", 0.5), ("ridge", 0.01)], fit_fn=recording_fit)
    assert [f.held_out for f in cv.folds] == ["s0", "s1", "s2"]
    for fold in cv.folds:
        assert fold.trained_on == {"s0", "s1", "s2"} - {fold.held_out}
    # outer folds: 3 x 2 candidates (shifts move the bias); nested selection: fits on one slide, never all three
    assert sum(len(names) == 2 for names in seen) >= 3 * 2 and all(len(names) in (1, 2) for names in seen)
    # each held-out Dice is that of an adapter fitted from the other slides' patches alone, recomputed here
    from zeus_qupath.learn import train_labels

    for i, unit in enumerate(units):
        others = [s for j, s in enumerate(slides) if j != i]
        feats = np.concatenate([s.features[s.labels != LEFT_OUT] for s in others])
        labs = np.concatenate([train_labels(s.features[s.labels != LEFT_OUT], s.labels[s.labels != LEFT_OUT], text, 1)
                               for s in others])
        w, b = fit(fit_stats(feats, labs, text), text, "ridge", 0.01)
        d = unit_dice(unit, unit.slide.features @ w.T + b, ("normal", "tumor"), "tumor", Threshold(), 100.0)
        assert d == pytest.approx(cv.per_candidate[("ridge", 0.01, 0.0)][i], abs=1e-9)


def test_nested_selection_never_looks_at_the_held_out_slide():
    """Each held-out slide's reported Dice uses a candidate chosen on the other slides alone: scrambling one
    slide's labels cannot change the choice made for it."""
    cent, text = world()
    slides = [synthetic_slide(f"s{i}", i, cent) for i in range(4)]
    cands = [("prototype", 0.25), ("prototype", 1.0), ("ridge", 0.1), ("ridge", 0.001)]

    def nested(sl):
        units, _ = units_of(sl)
        cv, _ = cross_validate(units, text, ("normal", "tumor"), "tumor", Threshold(), 100.0, cands=cands)
        return cv

    from dataclasses import replace

    rng = np.random.default_rng(5)
    bad = [replace(slides[0], labels=rng.permutation(slides[0].labels)), *slides[1:]]  # slide 0's labels scrambled
    cv = nested(bad)
    assert len(cv.nested) == len(cv.nested_choice) == 4 and cv.adapted == cv.nested
    # the choices differ from the one made on all four (so this checks the nesting, not a shared choice) ...
    assert any(choice != cv.best for choice in cv.nested_choice)
    for i, choice in enumerate(cv.nested_choice):
        # ... and each is what plain cross-validation over the other three slides alone selects
        assert choice == nested([s for j, s in enumerate(bad) if j != i]).best
        if choice in cv.per_candidate:  # the same fit as the outer fold's: the same Dice
            assert cv.nested[i] == pytest.approx(cv.per_candidate[choice][i], abs=1e-9)
    assert nested(slides).nested_choice[0] == cv.nested_choice[0]  # slide 0's own labels never chose for it


def test_one_slide_is_cross_validated_on_its_halves():
    cent, text = world()
    units, kind = units_of([synthetic_slide("only", 1, cent)])
    assert kind == "halves" and len(units) == 2
    assert not np.any(units[0].patches & units[1].patches) and np.all(units[0].patches | units[1].patches)
    # an adapter for one half never learns from a patch that holds pixels of the other half (448 px patches at a
    # 112 px stride overlap the cut for ~3 strides on each side)
    s = units[0].slide
    for unit, other in ((units[0], units[1]), (units[1], units[0])):
        ox0, oy0, ox1, oy1 = other.window
        x, y = s.coords[unit.trainable, 0], s.coords[unit.trainable, 1]
        overlaps = (x < ox1) & (x + s.patch_size > ox0) & (y < oy1) & (y + s.patch_size > oy0)
        assert not overlaps.any()
        assert unit.trainable.sum() < unit.patches.sum()  # the band at the cut is left out of training


def test_learning_fixes_the_confounder_on_held_out_slides():
    cent, text = world()
    train = [synthetic_slide(f"t{i}", i, cent) for i in range(2)]
    test = [synthetic_slide(f"h{i}", 10 + i, cent) for i in range(2)]
    cv, adapter = learn(train, text, ("normal", "tumor"), "tumor", Threshold(), 100.0, IDENT)
    assert cv.better and adapter.header["cv"]["slides"][0]["slide"] == "t0"

    def mean_dice(w, b):
        return np.mean([unit_dice(Unit(s.name, s, np.ones(len(s.coords), bool), (0, 0, s.width, s.height)),
                                  s.features @ w.T + b, ("normal", "tumor"), "tumor", Threshold(), 100.0)
                        for s in test])

    zero_shot = mean_dice(text.astype(np.float32), np.zeros(2, np.float32))
    assert mean_dice(adapter.weights, adapter.bias) >= zero_shot + 0.1


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_bad_corrections_are_refused_in_one_line():
    good = (Correction("Tumor", box(0, 0, 10, 10)),)
    with pytest.raises(ZeusError, match="no corrected images"):
        check_corrections([])
    with pytest.raises(ZeusError, match="empty"):
        check_corrections([CorrectedImage("a", "a.tif", ())])
    nan = Polygon([(0, 0), (float("nan"), 0), (5, 5)])
    with pytest.raises(ZeusError, match="NaN"):
        check_corrections([CorrectedImage("a", "a.tif", (Correction("Tumor", nan),))])
    with pytest.raises(ZeusError, match="wrong slide"):
        _check_image_fits(CorrectedImage("a", "a.tif", good, size=(500, 400)), 1000, 800)
    with pytest.raises(ZeusError, match="outside"):
        _check_image_fits(CorrectedImage("a", "a.tif", (Correction("Tumor", box(0, 0, 5000, 10)),)), 1000, 800)
