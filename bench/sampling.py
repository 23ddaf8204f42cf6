"""Adaptive sampling against exact: patches embedded, mask Dice and pixels changed, polygons, wall time.

    python bench/sampling.py [--quick] [--work-dir DIR]

Slides: synthetic H&E-like slides (samples/synthetic.py) of three sizes and the real test slides
(tests/data/wsi). Models: ``tiny`` (the demo's tiny open_clip model, trained on other synthetic slides:
its classes separate as a trained model's do), ``tiny-b`` (the same recipe trained from another seed),
and ``random`` (the tiny architecture with random weights: class scores nearly tied everywhere, the
worst case; the rule should fall back towards exact there).

Two parts, both in this process on the CPU:

1. Rules (the sweep): every grid patch of a slide is embedded once (the exact run's features); each
   sampling rule is then replayed on those features (``sampling.sample_patches`` with an ``embed`` that
   looks rows up), so rules differ only in which patches they choose. Reported per rule: share of the
   grid embedded, rounds, mask Dice and pixels changed against the exact mask, polygon counts.
2. Runs: ``zeus segment`` (``run_segment``) exact and ``--sampling adaptive`` on each slide with each model,
   median of ``--repeats`` alternating runs: wall time of the run, patches embedded, mask Dice against the
   exact run's scores file.

Prints tables and writes sampling.json to $OUT (if set) and bench/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import machine, table, write_json  # noqa: E402

SYNTHETIC = {"syn-2560": (2560, 1792, 40), "syn-6144": (6144, 4096, 7), "syn-10240": (10240, 8192, 3),
             "syn-20480": (20480, 16384, 5)}
REAL = {"cmu-small": "tests/data/wsi/CMU-1-Small-Region.svs", "os-1-detail": "tests/data/wsi/OS-1-detail.ome.tif"}


def _slides(work: Path, quick: bool, wanted: tuple[str, ...] = ("syn-20480",)) -> dict[str, tuple[Path, str]]:
    """name -> (path, tissue rule): synthetic slides use ZEUS's rule, the small real crops the coarse one."""
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    out: dict[str, tuple[Path, str]] = {}
    for name, (w, h, seed) in SYNTHETIC.items():
        if quick and w > 6144 or w > 10240 and name not in wanted:
            continue
        path = work / f"{name}.tif"
        if not path.exists():
            make_synthetic_slide(path, w, h, seed=seed)
        out[name] = (path, "zeus")
    for name, rel in REAL.items():
        out[name] = (ROOT / rel, "coarse")  # CLAM's area filter finds no tissue region in these small crops
    return out


def _models(work: Path) -> dict[str, tuple[str, str | None, bool]]:
    """name -> (spec, pretrained, random_weights)."""
    from zeus_qupath.samples import prompt_path
    from zeus_qupath.samples.tiny_model import load_or_train_tiny_model

    cache = Path(os.environ.get("ZEUS_TINY_MODEL_CACHE") or work / "tiny-model")
    tiny = load_or_train_tiny_model(cache, prompt_path("spindle_cell"))
    other = load_or_train_tiny_model(cache, prompt_path("spindle_cell"), seed=1)
    spec = f"open_clip:{tiny.config_path}"
    return {"tiny": (spec, str(tiny.checkpoint_path), False),
            "tiny-b": (f"open_clip:{other.config_path}", str(other.checkpoint_path), False),
            "random": (spec, None, True),
            # the trained tiny model's decisions at a real model's cost: averaged with a random-weight ViT-B/16
            # (its score differences are ~10x smaller, so the mask follows the tiny model; ~0.3 s a patch here)
            "heavy": (f"{spec},open_clip:ViT-B-16", f"{tiny.checkpoint_path},", True)}


def rules() -> dict[str, Any]:
    from zeus_qupath.sampling import SamplingRule

    return {
        "default": SamplingRule("adaptive"),  # step 4, halved per round, surrounding neighbours
        "step2": SamplingRule("adaptive", coarse_step=2),  # the rule before (first round: one patch in 4)
        "step8": SamplingRule("adaptive", coarse_step=8),
        "mask-aware": SamplingRule("adaptive", mask_aware=True),
        "reach224": SamplingRule("adaptive", reach=224),
        "slack0.5": SamplingRule("adaptive", slack=0.5),
        "scores-bound": SamplingRule("adaptive", bound="scores"),
    }


def _mask(scores) -> np.ndarray:
    from zeus_qupath.reconstruct import zeus_mask

    return zeus_mask(scores).mask


def _polygons(scores) -> int:
    from zeus_qupath.params import SegmentParams, Threshold
    from zeus_qupath.segment import polygons_from_scores

    return len(polygons_from_scores(scores, Threshold(), SegmentParams()))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def boundary_share(scores) -> float:
    """Share of the patches with a patch of the other decision (positive class or not) one stride away or less.

    Not a proven floor, but the band any rule that keeps the mask must look at closely: the patches whose
    neighbourhood disagrees.
    """
    from scipy.spatial import cKDTree

    from zeus_qupath.sampling import class_differences

    if len(scores.coords) < 2:
        return 0.0
    pos = class_differences(scores.scores, scores.positive_index).min(axis=1) > 0
    pairs = cKDTree(scores.coords.astype(np.float64)).query_pairs(scores.stride, p=np.inf, output_type="ndarray")
    split = pairs[pos[pairs[:, 0]] != pos[pairs[:, 1]]]
    edge = np.zeros(len(pos), dtype=bool)
    edge[split.ravel()] = True
    return float(edge.mean())


def _run(slide: Path, tissue: str, model: tuple[str, str | None, bool], out: Path, sampling: str) -> float:
    from zeus_qupath.params import SegmentParams, Threshold
    from zeus_qupath.runs.run import RunConfig, run_segment
    from zeus_qupath.samples import prompt_path

    spec, pretrained, random_weights = model
    t0 = time.perf_counter()
    run_segment(RunConfig(slides=(str(slide),), prompts=str(prompt_path("spindle_cell")), out_dir=str(out),
                          model=spec, pretrained=pretrained, random_weights=random_weights, device="cpu",
                          progress=False, use_cache=False, resume=False,
                          params=SegmentParams(tissue=tissue, sampling=sampling, threshold=Threshold())))
    return time.perf_counter() - t0


def _embed_seconds(out: Path) -> float | None:
    """The last run's embedding time (run.json; adaptive: every round, reading included)."""
    from zeus_qupath.outputs import read_run_record

    record = read_run_record(out)
    return record.slides[0].seconds.get("embed") if record and record.slides else None


def _stem(slide: Path) -> str:
    from zeus_qupath.outputs import output_stem

    return output_stem(slide)


def sweep(slide: Path, exact_dir: Path, centre: bool = False) -> list[dict[str, Any]]:
    """Replay each rule on the exact run's patches: a patch's scores are a fixed function of its features.

    ``centre``: shift the positive class's scores by the median difference to the best other class, so
    the classes tie at the median patch (the random-weight model made nearly tied everywhere: the worst case).
    """
    from dataclasses import replace

    from zeus_qupath.outputs import PatchScores
    from zeus_qupath.sampling import class_differences, sample_patches

    exact = PatchScores.load(exact_dir / f"{_stem(slide)}.scores.npz")
    if centre and len(exact.coords):
        pos = exact.positive_index
        shifted = exact.scores.copy()
        shifted[:, pos] -= np.float32(np.median(class_differences(exact.scores, pos).min(axis=1)))
        exact = replace(exact, scores=shifted)
    n = len(exact.coords)
    if n == 0:
        return []
    # the exact run's scores are the features of a 'model' whose scores are those scores (score = identity)
    ref = _mask(exact)
    coords = exact.coords
    stride = exact.stride
    origin = coords % stride
    index = ((coords - origin) // stride)[:, ::-1]
    rows = []
    for name, rule in rules().items():
        def embed(positions: np.ndarray) -> tuple[list[np.ndarray], None]:
            return [exact.scores[positions]], None

        result = sample_patches(coords, index, patch_size=exact.patch_size, stride=stride, width=exact.width,
                                height=exact.height, classes=exact.classes, positive_class=exact.positive_class,
                                embed=embed, score=lambda f: f[0], embed_dims=[exact.scores.shape[1]], rule=rule)
        sub = replace(exact, coords=coords[result.kept], scores=exact.scores[result.kept])
        m = _mask(sub)
        rows.append({"rule": name, "patches": n, "fraction_embedded": float(result.embedded.mean()),
                     "rounds": len(result.rounds), "mask_dice": dice(ref, m),
                     "pixels_changed": float((ref != m).mean()), "polygons_exact": _polygons(exact),
                     "polygons": _polygons(sub)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="leave out the largest synthetic slide")
    ap.add_argument("--repeats", type=int, default=1, help="alternating exact/adaptive runs per slide (median)")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--reuse", action="store_true", help="reuse the runs' outputs in --work-dir (the rules only)")
    ap.add_argument("--models", nargs="+", default=["tiny", "tiny-b", "random"],
                    help="tiny, tiny-b, random, heavy (tiny + a random-weight ViT-B/16: the model dominates)")
    ap.add_argument("--slides", nargs="+", default=None, help="only these slides (e.g. syn-6144)")
    ap.add_argument("--json-name", default="sampling.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    start = time.perf_counter()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="zeus-sampling-"))
    work.mkdir(parents=True, exist_ok=True)
    slides = _slides(work, args.quick)
    if args.slides:
        slides = {k: v for k, v in slides.items() if k in args.slides}
    models = {k: v for k, v in _models(work).items() if k in args.models}
    from zeus_qupath.outputs import PatchScores

    runs, sweeps = [], []
    for mname, model in models.items():
        for sname, (slide, tissue) in slides.items():
            times: dict[str, list[float]] = {"exact": [], "adaptive": []}
            done = (work / mname / sname / "adaptive" / f"{_stem(slide)}.scores.npz").exists()
            for _ in range(0 if args.reuse and done else args.repeats):
                for mode in ("exact", "adaptive"):
                    times[mode].append(_run(slide, tissue, model, work / mname / sname / mode, mode))
            ex = PatchScores.load(work / mname / sname / "exact" / f"{_stem(slide)}.scores.npz")
            ad = PatchScores.load(work / mname / sname / "adaptive" / f"{_stem(slide)}.scores.npz")
            a, b = _mask(ex), _mask(ad)
            info = ad.meta.get("sampling") or {}
            row = {"model": mname, "slide": sname, "patches": len(ex.coords), "boundary_share": boundary_share(ex),
                   "embedded": int(info.get("embedded", len(ad.coords))),
                   "fraction_embedded": float(info.get("fraction_embedded", 1.0)),
                   "rounds": len(info.get("rounds", [])), "mask_dice": dice(a, b),
                   "pixels_changed": float((a != b).mean()), "polygons_exact": _polygons(ex),
                   "polygons_adaptive": _polygons(ad), "seconds_exact": statistics.median(times["exact"] or [0.0]),
                   "seconds_adaptive": statistics.median(times["adaptive"] or [0.0]),
                   "embed_seconds_exact": _embed_seconds(work / mname / sname / "exact"),
                   "embed_seconds_adaptive": _embed_seconds(work / mname / sname / "adaptive")}
            runs.append(row)
            print(f"{mname} {sname}: {row['fraction_embedded']:.3f} embedded, Dice {row['mask_dice']:.4f}, "
                  f"{row['seconds_exact']:.1f}s -> {row['seconds_adaptive']:.1f}s", flush=True)
            for r in sweep(slide, work / mname / sname / "exact"):
                sweeps.append({"model": mname, "slide": sname, **r})
            if mname == "random":
                for r in sweep(slide, work / mname / sname / "exact", centre=True):
                    sweeps.append({"model": "random-tied", "slide": sname, **r})
    print("\nRuns (zeus segment, CPU): exact vs --sampling adaptive")
    print(table([[r["model"], r["slide"], r["patches"], r["boundary_share"], r["embedded"], r["fraction_embedded"],
                  r["rounds"],
                  round(r["mask_dice"], 4), r["pixels_changed"], f"{r['polygons_exact']}->{r['polygons_adaptive']}",
                  r["seconds_exact"], r["seconds_adaptive"]] for r in runs],
                ["model", "slide", "patches", "boundary", "embedded", "fraction", "rounds", "Dice", "px changed",
                 "polygons",
                 "s exact", "s adaptive"]))
    print("\nRules replayed on the exact features")
    print(table([[r["model"], r["slide"], r["rule"], r["fraction_embedded"], r["rounds"], round(r["mask_dice"], 4),
                  r["pixels_changed"], f"{r['polygons_exact']}->{r['polygons']}"] for r in sweeps],
                ["model", "slide", "rule", "fraction", "rounds", "Dice", "px changed", "polygons"]))
    result = {"machine": machine(), "seconds": round(time.perf_counter() - start, 1), "runs": runs, "rules": sweeps}
    for folder in filter(None, [os.environ.get("OUT"), str(ROOT / "bench" / "results")]):
        write_json(Path(folder) / args.json_name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
