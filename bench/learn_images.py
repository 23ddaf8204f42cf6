"""The learning benchmark on images: a tiny open_clip model that knows three textures, a prompt file naming two.

The model: ``samples/tiny_model.py``'s three-texture variant (``confounder_class="necrosis"``), trained on
a synthetic slide of normal stroma, tumor and a necrosis-like confounder (``bench/prompts/necrosis_train.json``,
three classes), so its image tower separates all three. The run's prompt file
(``bench/prompts/two_classes.json``) names two classes, normal and tumor, and its tumor class lists 7 tumor
names and the 5 necrosis names (a prompt set that lumps tumor necrosis with tumor): its tumor text prototype
lies between the tumor and the necrosis images, and the words score the confounder as tumor (checked on pure
patches: every necrosis patch goes to tumor; with the tumor names alone, it went to normal, and there was
nothing to fix).

The cohorts: 8 synthetic slides each (``samples/synthetic.py``, 4096 x 3072 px at 0.5 um/px); the
*confounded* cohort has the necrosis-like texture over ~35 % of the non-tumor tissue, the *clean* one has
none. The pipeline is the real one: ``zeus segment`` of every slide into an embedding cache (zero-shot
outlines), the known tumor mask of a slide written as QuPath GeoJSON (class Tumor; on every other corrected
slide the confounder also drawn as class Necrosis, a class the prompts lack, hence negative), read by
``zeus_qupath.bridge.corrections.read_corrections`` and learned by ``zeus learn`` (in-process, ``--force`` so
that the adapter exists even when cross-validation does not recommend it: "applied" below is what a user
gets, the adapter only when ``zeus learn`` would have written it), then ``zeus segment --adapter`` of the
held-out slides (cache hits: nothing embedded). Dice of each output GeoJSON against the slide's true tumor
mask inside its true tissue mask (``zeus_qupath.evaluate``), mean over the held-out slides.

A third cohort re-runs the clean slides with ``bench/prompts/two_classes_tumor_only.json`` (the tumor names
alone): a prompt set that is right for a cohort without necrosis.

Seeds: seed s shuffles the 8 slides; the first 4 are the corrected pool (k = 1, 2, 4 use its first k), the
other 4 are held out. Medians over seeds.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
TRAIN_PROMPTS = HERE / "prompts" / "necrosis_train.json"
RUN_PROMPTS = HERE / "prompts" / "two_classes.json"
RIGHT_PROMPTS = HERE / "prompts" / "two_classes_tumor_only.json"  # the same without the necrosis names
SIZE = (4096, 3072)
SLIDES, POOL = 8, 4
CONFOUNDER_FRACTION = 0.35


def _mask_polygons(mask_path: Path, downsample: float) -> list[Any]:
    import rasterio.features
    from affine import Affine
    from PIL import Image
    from shapely.geometry import shape

    mask = np.asarray(Image.open(mask_path)) > 127
    return [shape(g) for g, v in rasterio.features.shapes(mask.astype(np.uint8), mask=mask,
                                                           transform=Affine.scale(downsample)) if v == 1]


def _write_correction(slide: Any, out: Path, with_confounder: bool) -> None:
    from zeus_qupath.qupath_geojson import QuPathObject, objects_to_feature_collection

    objs = [QuPathObject(p, class_name="Tumor", color=(200, 0, 0))
            for p in _mask_polygons(slide.tumor_mask_path, slide.mask_downsample)]
    if with_confounder and slide.confounder_mask_path is not None:
        objs += [QuPathObject(p, class_name="Necrosis", color=(120, 120, 0))
                 for p in _mask_polygons(slide.confounder_mask_path, slide.mask_downsample)]
    out.write_text(json.dumps(objects_to_feature_collection(objs)))


def _dice(out_dir: Path, slide: Any) -> float:
    from zeus_qupath.evaluate import evaluate

    s = evaluate(out_dir / f"{slide.path.stem}.geojson", slide.tumor_mask_path, tissue=slide.tissue_mask_path,
                 size=(slide.width, slide.height))
    return float(s.dice)


def _zeus(argv: list[str]) -> None:
    from zeus_qupath.cli import main as zeus

    rc = zeus(argv)
    if rc != 0:
        raise RuntimeError(f"zeus {argv[0]} exited {rc}")


def run(work: Path, seeds: int = 3, log: Any = print) -> dict[str, Any]:
    from zeus_qupath.adapter import Adapter
    from zeus_qupath.samples.synthetic import make_synthetic_slide
    from zeus_qupath.samples.tiny_model import load_or_train_tiny_model

    t0 = time.perf_counter()
    tiny = load_or_train_tiny_model(Path(os.environ.get("ZEUS_TINY_MODEL_CACHE", work / "tiny")), TRAIN_PROMPTS,
                                    confounder_class="necrosis")
    result: dict[str, Any] = {"model_s": round(time.perf_counter() - t0, 1), "size": list(SIZE), "slides": SLIDES,
                              "pool": POOL, "cohorts": {}}
    weights = ["--model", f"open_clip:{tiny.config_path}", "--pretrained", str(tiny.checkpoint_path), "--device", "cpu"]
    for cohort, frac, base, prompts in (("confounded", CONFOUNDER_FRACTION, 200, RUN_PROMPTS),
                                        ("clean", 0.0, 300, RUN_PROMPTS),
                                        ("clean, tumor-only prompts", 0.0, 300, RIGHT_PROMPTS)):
        model = [*weights, "--prompts", str(prompts)]
        cdir = work / cohort.replace(",", "").replace(" ", "-")
        (cdir / "corrected").mkdir(parents=True, exist_ok=True)
        cache = cdir / "cache"
        slides = [make_synthetic_slide(cdir / f"slide{i}.tif", *SIZE, seed=base + i, confounder_fraction=frac)
                  for i in range(SLIDES)]
        t = time.perf_counter()
        _zeus(["segment", *(str(s.path) for s in slides), *model, "--quiet", "--out", str(cdir / "zs"),
               "--cache", str(cache)])
        first_all = time.perf_counter() - t
        zs = {s.path.stem: _dice(cdir / "zs", s) for s in slides}
        for i, s in enumerate(slides):
            _write_correction(s, cdir / "corrected" / f"{s.path.stem}.geojson", with_confounder=i % 2 == 1)
        rows = []
        for seed in range(seeds):
            order = np.random.default_rng(seed).permutation(SLIDES)
            pool, test = [slides[i] for i in order[:POOL]], [slides[i] for i in order[POOL:]]
            row: dict[str, Any] = {"seed": seed, "corrected": [s.path.stem for s in pool],
                                   "held_out": [s.path.stem for s in test],
                                   "zero_shot": float(np.mean([zs[s.path.stem] for s in test]))}
            for k in (1, 2, 4):
                adapter_path = cdir / f"adapter-s{seed}-k{k}.npz"
                argv = ["learn", str(cdir / "corrected"), "--images", *(s.path.stem for s in pool[:k]),
                        *(a for s in pool[:k] for a in ("--slide", f"{s.path.stem}={s.path}")),
                        "--cache", str(cache), "--force", "--out", str(adapter_path), *model]
                t = time.perf_counter()
                _zeus(argv)
                learn_s = time.perf_counter() - t
                header = Adapter.load(adapter_path).header
                out = cdir / f"adapted-s{seed}-k{k}"
                t = time.perf_counter()
                _zeus(["segment", *(str(s.path) for s in test), *model, "--quiet", "--out", str(out),
                       "--cache", str(cache), "--adapter", str(adapter_path)])
                rescore_s = time.perf_counter() - t
                run_json = json.loads((out / "run.json").read_text())
                adapted = float(np.mean([_dice(out, s) for s in test]))
                better = bool(header["cv"]["better"])
                row[f"k{k}"] = {
                    "adapted": adapted, "applied": adapted if better else row["zero_shot"], "written": better,
                    "method": f"{header['method']['kind']}:{header['method']['strength']:g}:"
                              f"{header['method']['shift']:g}",
                    "cv_zero_shot": header["cv"]["zero_shot_mean"], "cv_adapted": header["cv"]["adapted_mean"],
                    "cv_folds": header["cv"]["folds"], "learn_cli_s": round(learn_s, 2),
                    "rescore_cli_s": round(rescore_s, 2),
                    "rescore_caches": sorted({sl.get("cache") for sl in run_json["slides"]}),
                }
            rows.append(row)
            log(f"  {cohort} seed {seed}: zero-shot {row['zero_shot']:.3f}; " + "; ".join(
                f"k={k} {row[f'k{k}']['adapted']:.3f} ({'written' if row[f'k{k}']['written'] else 'not written'})"
                for k in (1, 2, 4)))
        result["cohorts"][cohort] = {"first_run_all_s": round(first_all, 1), "zero_shot_per_slide": zs,
                                     "rows": rows}
    result["timing"] = _one_slide_timing(work, [*weights, "--prompts", str(RUN_PROMPTS)], log)
    return result


def _one_slide_timing(work: Path, model: list[str], log: Any) -> dict[str, Any]:
    """One fresh slide: zeus segment's first run (embeds) vs zeus segment --adapter on it (cache hit)."""
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    tdir = work / "timing"
    tdir.mkdir(exist_ok=True)
    s = make_synthetic_slide(tdir / "fresh.tif", *SIZE, seed=999, confounder_fraction=CONFOUNDER_FRACTION)
    adapter = sorted((work / "confounded").glob("adapter-s0-k4.npz"))[0]
    t = time.perf_counter()
    _zeus(["segment", str(s.path), *model, "--quiet", "--out", str(tdir / "zs"), "--cache", str(tdir / "cache")])
    first = time.perf_counter() - t
    t = time.perf_counter()
    _zeus(["segment", str(s.path), *model, "--quiet", "--out", str(tdir / "ad"), "--cache", str(tdir / "cache"),
           "--adapter", str(adapter)])
    again = time.perf_counter() - t
    run_json = json.loads((tdir / "ad" / "run.json").read_text())
    sl = run_json["slides"][0]
    return {"patches": sl.get("patches"), "first_run_s": round(first, 2), "adapted_rerun_s": round(again, 2),
            "rerun_cache": sl.get("cache"), "zero_shot_dice": _dice(tdir / "zs", s),
            "adapted_dice": _dice(tdir / "ad", s)}


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Median over seeds per cohort and k: zero-shot, adapted, applied, change, written count."""
    out = []
    for cohort, c in result["cohorts"].items():
        rows = c["rows"]
        for k in (1, 2, 4):
            zs = statistics.median(r["zero_shot"] for r in rows)
            changes = [r[f"k{k}"]["applied"] - r["zero_shot"] for r in rows]
            out.append({"cohort": cohort, "k": k, "zero_shot": zs,
                        "adapted": statistics.median(r[f"k{k}"]["adapted"] for r in rows),
                        "applied": statistics.median(r[f"k{k}"]["applied"] for r in rows),
                        "change": statistics.median(changes), "changes": changes,
                        "written": sum(r[f"k{k}"]["written"] for r in rows), "seeds": len(rows)})
    return out
