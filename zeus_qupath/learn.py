"""``zeus learn``: an adapter from the annotators' corrections, chosen by leave-one-slide-out cross-validation.

The stage, for corrected slides (each a slide file and its corrected annotations, :class:`CorrectedImage`):

1. the model is loaded and every slide's patch embeddings come from the embedding cache ``zeus segment``
   filled (same key: slide content, model, precision, patch geometry, tissue rule); a slide the cache
   lacks is embedded once and stored there (:func:`slide_embeddings`);
2. every patch is labelled by the rule of :mod:`zeus_qupath.patch_labels`; the generic negative side goes
   to the negative prompt class the patch scores highest zero-shot (with two classes: the negative one);
3. cross-validation (:func:`cross_validate`): with two or more slides each slide is held out in turn and
   scored by adapters fitted on the other slides only; with one slide its two halves (split across the
   longer side of its patches) stand in for slides. Each candidate of :func:`zeus_qupath.adapter.candidates`
   is scored by the Dice, against the correction, of the mask the engine draws (``zeus_mask``, the run's
   threshold rule) from the held-out patches' adapted scores, inside tissue (Ignore* areas left out);
4. the candidate of best mean held-out Dice is fitted on every slide and written, only when the
   *nested* cross-validation finds the whole procedure better than zero-shot (or with ``force``): each
   held-out unit is scored with the candidate that an inner cross-validation over the other units alone
   chose (leave-one-out among them; with a single other unit, that unit's own fit), so the reported and
   judged Dice never selected a candidate on the unit it scores (picking the best of eleven on the same
   held-out Dice it reports would flatter it).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from . import __version__
from .adapter import SHIFTS, Adapter, FitStats, applied_identity, candidates, fit, fit_stats, shift_bias
from .errors import ZeusError
from .outputs import PatchScores
from .params import DEFAULT_MODEL, Threshold
from .patch_labels import LEFT_OUT, NEGATIVE, Correction, LabelRule, label_counts, patch_labels
from .reconstruct import sample_centres, sample_step, zeus_mask
from .tissue import TissueMask

EVAL_PIXELS = 250_000  # mask samples per slide for the cross-validation Dice
MIN_GAIN = 0.01  # the adapter must beat zero-shot's mean held-out Dice by more than this
MAX_LOSS = 0.01  # ... and lose no more than this on any held-out slide (or half)
RULE_TEXT = ("central stride cell; mixed cells (the positive class with anything else), Ignore* and unclassified "
             "areas left out; uncovered tissue and classes the prompts lack are negative")


@dataclass(frozen=True)
class CorrectedImage:
    """One corrected slide: its name, slide file and corrected annotations (level-0 px)."""

    name: str
    slide: str
    annotations: tuple[Correction, ...]
    size: tuple[int, int] | None = None  # the image size the annotations were made on, when known


@dataclass
class LabelledSlide:
    """A slide's patches (coords, unit features), their labels and what the Dice is measured against."""

    name: str
    fingerprint: str
    coords: np.ndarray
    features: np.ndarray
    labels: np.ndarray  # prompt class index, NEGATIVE or LEFT_OUT (patch_labels)
    patch_size: int
    stride: int
    width: int
    height: int
    mpp: float | None
    tissue: TissueMask
    positive: BaseGeometry
    excluded: BaseGeometry
    embedded: int = 0  # patches embedded for learning (0: all from the cache)


@dataclass
class Unit:
    """What one cross-validation fold holds out: a slide, or half of the only one (``window``, level-0 px)."""

    name: str
    slide: LabelledSlide
    patches: np.ndarray  # bool (N,): the slide's patches in this unit
    window: tuple[float, float, float, float]
    #: bool (N,): the patches an adapter may learn from when this unit is NOT held out; None = ``patches``. A
    #: half's patches whose box reaches across the cut share pixels with the other half, so they are left out.
    trainable: np.ndarray | None = None
    _truth: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def truth(self) -> tuple[np.ndarray, np.ndarray]:
        """(truth, valid) on the mask sample grid: the corrected positive area, and tissue in the window minus
        Ignore* areas."""
        if self._truth is None:
            s = self.slide
            step = sample_step(s.width, s.height, EVAL_PIXELS)
            xs, ys = sample_centres(s.width, step), sample_centres(s.height, step)
            gx, gy = np.meshgrid(xs.astype(np.float64) + 0.5, ys.astype(np.float64) + 0.5)
            ds = s.tissue.downsample
            th, tw = s.tissue.mask.shape
            tissue = s.tissue.mask[np.minimum((gy / ds).astype(np.int64), th - 1),
                                   np.minimum((gx / ds).astype(np.int64), tw - 1)]
            x0, y0, x1, y1 = self.window
            valid = tissue & (gx >= x0) & (gx < x1) & (gy >= y0) & (gy < y1)
            if not s.excluded.is_empty:
                valid &= ~shapely.contains_xy(s.excluded, gx, gy)
            truth = shapely.contains_xy(s.positive, gx, gy) if not s.positive.is_empty else np.zeros_like(valid)
            self._truth = (truth, valid)
        return self._truth


def dice(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> float:
    """Dice of ``pred`` against ``truth`` over ``valid`` samples; 1 when both are empty there."""
    p, t = pred & valid, truth & valid
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def unit_dice(unit: Unit, scores: np.ndarray, classes: Sequence[str], positive_class: str, threshold: Threshold,
              logit_scale: float) -> float:
    """Dice of the mask the engine draws from ``scores`` (the unit's patches, (n, C)) against the correction."""
    s = unit.slide
    ps = PatchScores(coords=s.coords[unit.patches], scores=np.asarray(scores, np.float32), classes=tuple(classes),
                     positive_class=positive_class, patch_size=s.patch_size, stride=s.stride, width=s.width,
                     height=s.height, mpp=s.mpp)
    pred = zeus_mask(ps, logit_scale=logit_scale, threshold=threshold, max_pixels=EVAL_PIXELS).mask
    truth, valid = unit.truth()
    return dice(pred, truth, valid)


def units_of(slides: Sequence[LabelledSlide]) -> tuple[list[Unit], str]:
    """The held-out units: one per slide, or the two halves of a single slide; and what they are."""
    if len(slides) >= 2:
        return [Unit(s.name, s, np.ones(len(s.coords), bool), (0.0, 0.0, float(s.width), float(s.height)))
                for s in slides], "slides"
    s = slides[0]
    centre = s.coords + s.patch_size / 2
    axis = 0 if len(centre) == 0 or np.ptp(centre[:, 0]) >= np.ptp(centre[:, 1]) else 1
    cut = float(np.median(centre[:, axis])) if len(centre) else 0.0
    first = centre[:, axis] < cut
    start = s.coords[:, axis] if len(s.coords) else np.zeros(0)
    clear = (start + s.patch_size <= cut) | (start >= cut)  # no pixel on both sides of the cut
    w, h = float(s.width), float(s.height)
    boxes = [(0.0, 0.0, cut, h), (cut, 0.0, w, h)] if axis == 0 else [(0.0, 0.0, w, cut), (0.0, cut, w, h)]
    return [Unit(f"{s.name} (half 1)", s, first, boxes[0], first & clear),
            Unit(f"{s.name} (half 2)", s, ~first, boxes[1], ~first & clear)], "halves"


def train_labels(features: np.ndarray, labels: np.ndarray, text: np.ndarray, positive: int) -> np.ndarray:
    """Class indices for training: the generic negative side goes to the negative class scored highest zero-shot."""
    out = labels.copy()
    neg = out == NEGATIVE
    if neg.any():
        zs = features[neg] @ text.T
        zs[:, positive] = -np.inf
        out[neg] = np.argmax(zs, axis=1)
    return out


@dataclass(frozen=True)
class Fold:
    held_out: str
    trained_on: frozenset[str]


@dataclass
class CrossValidation:
    """Per-unit Dice of zero-shot and of every candidate, the choice, and the folds (what each fit saw)."""

    folds_of: str  # "slides" or "halves"
    units: list[str]
    labelled: list[int]
    zero_shot: list[float]
    per_candidate: dict[tuple[str, float, float], list[float]]  # (kind, strength, shift) -> Dice per unit
    folds: list[Fold]
    nested: list[float] = field(default_factory=list)  # per unit: Dice with the candidate chosen without it
    nested_choice: list[tuple[str, float, float]] = field(default_factory=list)  # ... and that candidate

    @property
    def adapted(self) -> list[float]:
        """Per unit, the Dice judged and reported: nested (the choice never saw the unit) when computed."""
        return self.nested or self.per_candidate[self.best]

    @property
    def adapted_mean(self) -> float:
        return float(np.mean(self.adapted))

    @property
    def zero_shot_mean(self) -> float:
        return float(np.mean(self.zero_shot))

    def mean(self, cand: tuple[str, float, float]) -> float:
        return float(np.mean(self.per_candidate[cand]))

    @property
    def best(self) -> tuple[str, float, float]:
        return max(self.per_candidate, key=lambda c: (self.mean(c), -list(self.per_candidate).index(c)))

    @property
    def better(self) -> bool:
        """Written only when better in mean by MIN_GAIN (nested Dice, :attr:`adapted`: the procedure's honest
        gain) and when the selected kind, fitted without each held-out unit, is worse on none by more than
        MAX_LOSS (what the written adapter does to a slide it did not learn from)."""
        selected = self.per_candidate[self.best]
        return self.adapted_mean > self.zero_shot_mean + MIN_GAIN and \
            all(a >= z - MAX_LOSS for a, z in zip(selected, self.zero_shot, strict=True))

    def table(self) -> dict[str, Any]:
        best = self.best
        return {
            "folds": self.folds_of,
            "selected": {"kind": best[0], "strength": best[1], "shift": best[2]},
            "zero_shot_mean": round(self.zero_shot_mean, 4),
            "adapted_mean": round(self.adapted_mean, 4),  # nested: each unit's candidate chosen without it
            "selected_mean": round(self.mean(best), 4),  # the selected candidate's plain CV (chosen on these units)
            "better": self.better,
            "slides": [{"slide": u, "labelled_patches": n, "zero_shot_dice": round(z, 4),
                        "adapted_dice": round(a, 4), "selected_dice": round(sel, 4),
                        **({"chosen_without_it": {"kind": c[0], "strength": c[1], "shift": c[2]}} if c else {})}
                       for u, n, z, a, sel, c in zip(self.units, self.labelled, self.zero_shot, self.adapted,
                                                     self.per_candidate[best],
                                                     self.nested_choice or [None] * len(self.units), strict=True)],
            "candidates": [{"kind": k, "strength": s, "shift": h, "mean_dice": round(self.mean((k, s, h)), 4)}
                           for k, s, h in self.per_candidate],
        }


def cross_validate(units: Sequence[Unit], text: np.ndarray, classes: Sequence[str], positive_class: str,
                   threshold: Threshold, logit_scale: float, folds_of: str = "slides",
                   cands: Sequence[tuple[str, float]] | None = None,
                   fit_fn: Callable[..., tuple[np.ndarray, np.ndarray]] = fit,
                   ) -> tuple[CrossValidation, list[FitStats]]:
    """Leave-one-unit-out Dice of zero-shot and of each candidate; returns it and each unit's statistics."""
    pos = list(classes).index(positive_class)
    text = np.asarray(text, np.float32)
    stats, zero_shot, labelled = [], [], []
    for u in units:
        s = u.slide
        train = (u.patches if u.trainable is None else u.trainable) & (s.labels != LEFT_OUT)
        y = train_labels(s.features[train], s.labels[train], text, pos)
        stats.append(fit_stats(s.features[train], y, text, u.name))
        labelled.append(int(np.sum(u.patches & (s.labels != LEFT_OUT))))
        zero_shot.append(unit_dice(u, s.features[u.patches] @ text.T, classes, positive_class, threshold,
                                   logit_scale))
    n, everyone = len(units), frozenset(range(len(units)))
    feats = [u.slide.features if u.patches.all() else u.slide.features[u.patches] for u in units]
    sums: dict[frozenset[int], FitStats] = {}
    fits: dict[tuple[frozenset[int], str, float], tuple[np.ndarray, np.ndarray]] = {}  # a shift only moves the bias

    def train_on(ids: frozenset[int]) -> FitStats:
        if ids not in sums:
            order = sorted(ids)
            sums[ids] = sum((stats[j] for j in order[1:]), stats[order[0]])
        return sums[ids]

    def dice_on(i: int, ids: frozenset[int], cand: tuple[str, float, float]) -> float:
        """Unit ``i``'s Dice with candidate ``cand`` fitted on units ``ids``."""
        key = (ids, cand[0], cand[1])
        if key not in fits:
            fits[key] = fit_fn(train_on(ids), text, cand[0], cand[1])
        w, b = fits[key]
        b = shift_bias(b, train_on(ids), cand[2], pos)
        return unit_dice(units[i], feats[i] @ w.T + b, classes, positive_class, threshold, logit_scale)

    base = list(cands or candidates())

    def select(mean_dice: Callable[[tuple[str, float, float]], float]) -> tuple[str, float, float]:
        """The best (kind, strength) with no shift, then the best of it with each shift (ties: the first)."""
        first = {(k, st, 0.0): mean_dice((k, st, 0.0)) for k, st in base}
        k, st, _ = max(first, key=lambda c: (first[c], -list(first).index(c)))
        tried = {(k, st, 0.0): first[(k, st, 0.0)], **{(k, st, h): mean_dice((k, st, h)) for h in SHIFTS}}
        return max(tried, key=lambda c: (tried[c], -list(tried).index(c)))

    per_candidate: dict[tuple[str, float, float], list[float]] = {}

    def outer(cand: tuple[str, float, float]) -> float:  # leave-one-unit-out over every unit
        per_candidate[cand] = [dice_on(i, everyone - {i}, cand) for i in range(n)]
        return float(np.mean(per_candidate[cand]))

    select(outer)
    folds = [Fold(u.name, train_on(everyone - {i}).names) for i, u in enumerate(units)]
    cv = CrossValidation(folds_of, [u.name for u in units], labelled, zero_shot, per_candidate, folds)
    for i in range(n):  # nested: unit i's candidate chosen by leave-one-out over the other units alone
        others = everyone - {i}

        def inner(cand: tuple[str, float, float], others: frozenset[int] = others) -> float:
            if len(others) == 1:  # one other unit: judged on its own fit (the held-out unit never enters)
                (j,) = others
                return dice_on(j, others, cand)
            return float(np.mean([dice_on(j, others - {j}, cand) for j in sorted(others)]))

        choice = select(inner)
        cv.nested_choice.append(choice)
        cv.nested.append(dice_on(i, others, choice))
    return cv, stats


def format_table(cv: CrossValidation) -> str:
    """The per-slide table ``zeus learn`` prints."""
    t = cv.table()
    name_w = max([len("held out")] + [len(r["slide"]) for r in t["slides"]])
    lines = [f"{'held out'.ljust(name_w)}  labelled  zero-shot Dice  adapted Dice  change  selected kind"]
    for r in t["slides"]:
        lines.append(f"{r['slide'].ljust(name_w)}  {r['labelled_patches']:8d}  {r['zero_shot_dice']:14.3f}  "
                     f"{r['adapted_dice']:12.3f}  {r['adapted_dice'] - r['zero_shot_dice']:+6.3f}  "
                     f"{r['selected_dice']:13.3f}")
    lines.append(f"{'mean'.ljust(name_w)}  {'':8}  {t['zero_shot_mean']:14.3f}  {t['adapted_mean']:12.3f}  "
                 f"{t['adapted_mean'] - t['zero_shot_mean']:+6.3f}  {t['selected_mean']:13.3f}")
    sel = t["selected"]
    unit = "slide" if cv.folds_of == "slides" else "half"
    lines.append(f"adapted: an adapter fitted without the row's {unit}, of the kind chosen without it (nested "
                 f"leave-one-{unit}-out); selected kind: {sel['kind']} (strength {sel['strength']:g}, shift "
                 f"{sel['shift']:g}), chosen on every row, fitted without the row's {unit}; it is written when the "
                 f"adapted mean gains > {MIN_GAIN:g} and no row of the selected kind loses > {MAX_LOSS:g}")
    return "\n".join(lines)


def label_slide(name: str, fingerprint: str, coords: np.ndarray, features: np.ndarray, patch_size: int, stride: int,
                width: int, height: int, mpp: float | None, tissue: TissueMask, annotations: Sequence[Correction],
                rule: LabelRule, embedded: int = 0) -> LabelledSlide:
    """A slide's patches labelled by the rule of :mod:`zeus_qupath.patch_labels`."""
    lab = patch_labels(coords, patch_size, stride, annotations, rule)
    return LabelledSlide(name, fingerprint, np.asarray(coords, np.int64), np.asarray(features, np.float32),
                         lab.labels, patch_size, stride, width, height, mpp, tissue, lab.positive, lab.excluded,
                         embedded)


@dataclass
class LearnResult:
    cv: CrossValidation
    adapter: Adapter  # fitted on every slide with the selected candidate
    written: bool
    seconds: dict[str, float]


def learn(slides: Sequence[LabelledSlide], text: np.ndarray, classes: Sequence[str], positive_class: str,
          threshold: Threshold, logit_scale: float, ident: Mapping[str, Any],
          class_map: Mapping[str, str] | None = None) -> tuple[CrossValidation, Adapter]:
    """Cross-validate the candidates on ``slides`` and fit the selected one on all of them."""
    if not slides:
        raise ZeusError("no corrected slides to learn from")
    pos = list(classes).index(positive_class)
    for s in slides:
        if not np.any(s.labels != LEFT_OUT):
            raise ZeusError(f"{s.name}: no patch could be labelled (every cell is mixed or left out)")
    if not any(np.any(s.labels == pos) for s in slides):
        raise ZeusError(f"no patch of the corrected slides is labelled {positive_class}: nothing to learn the "
                        "positive class from (do the corrections use that class?)")
    units, folds_of = units_of(slides)
    cv, stats = cross_validate(units, text, classes, positive_class, threshold, logit_scale, folds_of)
    total = stats[0]
    for st in stats[1:]:
        total = total + st
    if folds_of == "halves":  # the halves' statistics leave out the patches across the cut: the adapter uses all
        s = slides[0]
        keep = s.labels != LEFT_OUT
        text32 = np.asarray(text, np.float32)
        total = fit_stats(s.features[keep], train_labels(s.features[keep], s.labels[keep], text32, pos), text32,
                          s.name)
    kind, strength, shift = cv.best
    w, b = fit(total, text, kind, strength, shift, pos)
    header = {
        "identity": dict(ident),
        "method": {"kind": kind, "strength": strength, "shift": shift, "label_rule": RULE_TEXT,
                   "class_map": dict(sorted((class_map or {}).items())), "threshold": str(threshold)},
        "slides": [{"name": s.name, "fingerprint": s.fingerprint,
                    "labelled_patches": int(np.sum(s.labels != LEFT_OUT)),
                    "positive_patches": int(np.sum(s.labels == pos))} for s in slides],
        "cv": cv.table(),
        "versions": {"zeus-qupath": __version__, "numpy": np.__version__},
    }
    return cv, Adapter(w, b, header)


# -- the stage, with a model and the embedding cache ---------------------------------------------------------


@dataclass(frozen=True)
class LearnConfig:
    out: str
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    random_weights: bool = False
    prompts: str = ""
    positive_class: str | None = None
    device: str = "auto"
    precision: str = "auto"
    params: Any = None  # SegmentParams
    cache_dir: str | None = None
    class_map: Mapping[str, str] | None = None
    force: bool = False


def check_corrections(images: Sequence[CorrectedImage]) -> None:
    """Refuse (one line) corrections that cannot be learned from: none, empty, non-finite or invalid outlines."""
    if not images:
        raise ZeusError("no corrected images to learn from")
    names = [im.name for im in images]
    if len(set(names)) != len(names):
        raise ZeusError(f"image {next(n for n in names if names.count(n) > 1)!r} is given twice")
    for im in images:
        if not im.annotations:
            raise ZeusError(f"{im.name}: the corrections are empty (no annotation at all); leave the image out")
        for ann in im.annotations:
            coords = shapely.get_coordinates(ann.geometry)
            if ann.geometry.is_empty or not np.all(np.isfinite(coords)):
                raise ZeusError(f"{im.name}: an annotation ({ann.class_name or 'unclassified'}) has an empty outline "
                                "or NaN/infinite coordinates")


def _check_image_fits(im: CorrectedImage, width: int, height: int) -> None:
    if im.size is not None and tuple(im.size) != (width, height):
        raise ZeusError(f"{im.name}: the corrections were made on a {im.size[0]} x {im.size[1]} px image but "
                        f"{Path(im.slide).name} is {width} x {height} px: the wrong slide?")
    bounds = shapely.total_bounds([a.geometry for a in im.annotations])
    if bounds[0] < -1 or bounds[1] < -1 or bounds[2] > width + 1 or bounds[3] > height + 1:
        raise ZeusError(f"{im.name}: annotations reach ({bounds[2]:.0f}, {bounds[3]:.0f}), outside "
                        f"{Path(im.slide).name} ({width} x {height} px): the wrong slide?")


def slide_embeddings(path: str, models: Any, params: Any, cache: Any, memo: Any = None) -> dict[str, Any]:
    """A slide's grid, tissue and features from the cache ``zeus segment`` fills; embedded once when absent."""
    from .embedding_cache import slide_key
    from .feature_cache import CachedEmbeddings
    from .identity import effective_precision, file_fingerprint
    from .on_demand import embed_patches
    from .segment import patch_geometry, prepare_slide
    from .slide import Slide

    encoder, ident = models.encoders[0], models.identities[0]
    fingerprint = file_fingerprint(path, memo)
    with Slide(path, mpp=params.mpp) as slide:
        info = slide.info
        geometry = patch_geometry(params, info.mpp)
        key = slide_key(fingerprint, ident.digest, effective_precision(encoder), params, info.mpp)
        cached = cache.load(key, info.width, info.height, encoder.embed_dim) if cache is not None else None
        embedded = 0
        if cached is not None:
            grid, tissue, features = cached.grid(geometry), cached.tissue, cached.features
        else:
            prepared = prepare_slide(slide, params)
    if cached is None:
        grid, tissue = prepared.grid, prepared.tissue
        if len(grid):
            features, kept = embed_patches(Path(path), grid, encoder, params)
            if kept is not None:
                grid, features = grid.filtered(kept), features[kept]
            else:
                grid = grid.filtered(None)
        else:
            features = np.zeros((0, encoder.embed_dim), np.float32)
        embedded = len(prepared.grid)
        if cache is not None:
            cache.store(key, CachedEmbeddings(features, grid.index, grid.rows, grid.cols, grid.width, grid.height,
                                              tissue, grid.origin))
    return {"fingerprint": fingerprint, "info": info, "coords": grid.coords, "features": features, "tissue": tissue,
            "patch_size": geometry.patch_size_l0, "stride": geometry.stride_l0, "embedded": embedded}


def learn_from_corrections(images: Sequence[CorrectedImage], config: LearnConfig,
                           log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> LearnResult:
    """The whole stage: check, load the model, embeddings (cache first), labels, cross-validation, adapter."""
    from .embedding_cache import EmbeddingCache
    from .identity import FingerprintMemo, effective_precision
    from .models.ensemble import load_run_models
    from .models.specs import parse_model_specs
    from .output_set import writable_dir

    t0 = time.perf_counter()
    check_corrections(images)
    for im in images:
        if not Path(im.slide).is_file():
            raise ZeusError(f"{im.name}: slide not found: {im.slide}")
    from .slide import Slide

    for im in images:  # the wrong slide is found before the model loads or anything is embedded
        with Slide(im.slide, mpp=config.params.mpp) as slide:
            _check_image_fits(im, slide.info.width, slide.info.height)
    specs = parse_model_specs(config.model, config.pretrained, config.random_weights)
    if len(specs) != 1:
        raise ZeusError("an adapter is learned for one model: give one --model, not an ensemble")
    out_parent = Path(config.out).resolve().parent
    writable_dir(str(out_parent), "--out")
    cache = None
    if config.cache_dir is not None:
        writable_dir(config.cache_dir, "--cache")
        cache = EmbeddingCache(Path(config.cache_dir), max_entries=0)
    models = load_run_models(specs, config.prompts, config.positive_class, config.device, config.precision)
    prompts = models.prompts
    rule = LabelRule(tuple(prompts.class_names), prompts.positive_class, config.class_map)
    params = config.params
    encoder = models.encoders[0]
    ident = applied_identity(models.identities[0], effective_precision(encoder), params, prompts)
    memo = FingerprintMemo(Path(config.cache_dir) / "fingerprints") if config.cache_dir else None
    seconds = {"model": time.perf_counter() - t0}
    t1 = time.perf_counter()
    slides = []
    for im in sorted(images, key=lambda i: i.name):
        emb = slide_embeddings(im.slide, models, params, cache, memo)
        info = emb["info"]
        _check_image_fits(im, info.width, info.height)
        slides.append(label_slide(im.name, emb["fingerprint"], emb["coords"], emb["features"], emb["patch_size"],
                                  emb["stride"], info.width, info.height, info.mpp, emb["tissue"], im.annotations,
                                  rule, emb["embedded"]))
        counts = ", ".join(f"{k} {v}" for k, v in
                           label_counts(slides[-1].labels, prompts.class_names, skip_empty=True).items())
        log(f"{im.name}: {len(emb['coords'])} patches ({emb['embedded']} embedded now, "
            f"{'cache hit' if not emb['embedded'] else 'not cached before'}); labels: {counts}")
    seconds["embeddings"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    cv, adapter = learn(slides, models.prototypes[0], prompts.class_names, prompts.positive_class,
                        params.threshold, float(encoder.logit_scale), ident, config.class_map)
    seconds["learn"] = time.perf_counter() - t2
    written = cv.better or config.force
    if written:
        adapter.save(config.out)
    return LearnResult(cv, adapter, written, {k: round(v, 3) for k, v in seconds.items()})

