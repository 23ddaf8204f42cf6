"""Learning from corrections (``zeus learn``): held-out Dice of zero-shot vs adapted, and what learning costs.

By default, the cohort on images (``bench/learn_images.py``: a tiny open_clip model trained on three textures,
a prompt file naming two, synthetic slides through ``zeus segment`` / ``zeus learn`` / ``zeus segment
--adapter``), then the cost of learning from 100k simulated patches. ``--simulated`` adds the older cohort
simulated at the embedding level (below).

A synthetic cohort at the embedding level: each slide is a patch grid (448 px patches, stride 112) over
tissue made of discs of three textures, normal (A), tumor (B) and a confounder (C). A patch's embedding
is the area-weighted mix of its textures' centroids plus noise, normalised (the image tower "knows" all
three). The prompt set names two classes: its "normal" text prototype lies near A, its "tumor" prototype
between B and C, so zero-shot calls C tumor (a prompt set that forgot, say, inflammation). The annotators'
correction is the tumor (B) outline. A clean cohort has no C.

For k = 1, 2, 4 corrected slides, an adapter is learned by ``zeus_qupath.learn.learn`` (labels by the
patch-label rule, leave-one-slide-out selection) and scored, with the engine's ZEUS mask rule, on 6
held-out slides against their true tumor outline (Dice inside tissue). Repeated over 3 cohort seeds;
medians reported. Then the time to learn from 100k patches (4 slides of 25k patches, 768-d like KEEP) and
the time to re-score one cached slide (apply the adapter + mask) against scoring it zero-shot.

    python bench/learn.py [--seeds 3] [--simulated] [--tiny] [--out bench/results/learn.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import shapely

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

from zeus_qupath.adapter import identity  # noqa: E402
from zeus_qupath.learn import Unit, label_slide, learn, unit_dice  # noqa: E402
from zeus_qupath.params import Threshold  # noqa: E402
from zeus_qupath.patch_labels import Correction, LabelRule  # noqa: E402
from zeus_qupath.tissue import TissueMask  # noqa: E402

PATCH, STRIDE = 448, 112
CLASSES = ("normal", "tumor")
LOGIT_SCALE = 100.0


def world(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Texture centroids (3, D) for A, B, C and text prototypes (2, D): tumor's text sits between B and C."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, 8)))
    cent = q[:, :3].T
    normal = cent[0] + 0.6 * q[:, 3]
    tumor = 0.55 * cent[1] + 0.65 * cent[2] + 0.6 * q[:, 4]  # the words cannot tell B from C
    text = np.stack([normal / np.linalg.norm(normal), tumor / np.linalg.norm(tumor)])
    return cent, text


def make_slide(seed: int, cent: np.ndarray, size: int, confounder: bool, noise: float = 0.35) -> dict:
    """Discs of B (tumor) and C (confounder) on a tissue rectangle of A; patch embeddings by area mix."""
    rng = np.random.default_rng(seed)
    w = h = size
    tissue_box = shapely.box(0.05 * w, 0.05 * h, 0.95 * w, 0.95 * h)

    def discs(n: int) -> shapely.Geometry:
        out = []
        for _ in range(n):
            r = rng.uniform(0.06, 0.14) * size
            x, y = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
            out.append(shapely.Point(x, y).buffer(r, quad_segs=16))
        return shapely.union_all(out).intersection(tissue_box)

    tumor = discs(3)
    conf = discs(3).difference(tumor) if confounder else shapely.Polygon()
    cols = (w - PATCH) // STRIDE + 1
    rows = (h - PATCH) // STRIDE + 1
    gx, gy = np.meshgrid(np.arange(cols) * STRIDE, np.arange(rows) * STRIDE)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + PATCH, coords[:, 1] + PATCH)
    area = PATCH * PATCH
    f_tissue = shapely.area(shapely.intersection(boxes, tissue_box)) / area
    keep = f_tissue > 0.25
    coords, boxes, f_tissue = coords[keep], boxes[keep], f_tissue[keep]
    f_b = shapely.area(shapely.intersection(boxes, tumor)) / area
    f_c = shapely.area(shapely.intersection(boxes, conf)) / area if not conf.is_empty else np.zeros(len(boxes))
    f_a = np.clip(f_tissue - f_b - f_c, 0, None)
    mix = np.stack([f_a, f_b, f_c], axis=1) @ cent
    feats = mix / np.maximum(f_tissue, 1e-6)[:, None] + noise * rng.normal(size=mix.shape) / np.sqrt(cent.shape[1])
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
    ds = 64.0
    mh, mw = int(np.ceil(h / ds)), int(np.ceil(w / ds))
    cy, cx = np.meshgrid((np.arange(mh) + 0.5) * ds, (np.arange(mw) + 0.5) * ds, indexing="ij")
    tissue = TissueMask(shapely.contains_xy(tissue_box, cx, cy), ds)
    return {"coords": coords, "features": feats, "tumor": tumor, "conf": conf, "tissue": tissue, "w": w, "h": h}


def labelled(name: str, s: dict, rule: LabelRule, with_conf_class: bool):
    anns = [Correction("Tumor", g) for g in getattr(s["tumor"], "geoms", [s["tumor"]]) if not g.is_empty]
    if with_conf_class and not s["conf"].is_empty:  # an annotator class the prompts lack: negative
        anns += [Correction("Inflammation", g) for g in getattr(s["conf"], "geoms", [s["conf"]])]
    return label_slide(name, name, s["coords"], s["features"], PATCH, STRIDE, s["w"], s["h"], None, s["tissue"],
                       anns, rule)


def held_out_dice(slides, w: np.ndarray, b: np.ndarray) -> float:
    out = []
    for s in slides:
        u = Unit(s.name, s, np.ones(len(s.coords), bool), (0, 0, s.width, s.height))
        out.append(unit_dice(u, s.features @ w.T + b, CLASSES, "tumor", Threshold(), LOGIT_SCALE))
    return float(np.mean(out))


def cohort_run(seed: int, confounder: bool, ks=(1, 2, 4), size: int = 4096, dim: int = 64) -> dict:
    cent, text = world(dim, seed)
    rule = LabelRule(CLASSES, "tumor")
    train = [labelled(f"train{i}", make_slide(seed * 100 + i, cent, size, confounder), rule, i % 2 == 1)
             for i in range(max(ks))]
    test = [labelled(f"test{i}", make_slide(seed * 100 + 50 + i, cent, size, confounder), rule, False)
            for i in range(6)]
    ident = identity({}, "bench", "fp32", patch_size=PATCH, stride=STRIDE, target_mpp=None, tissue="zeus",
                     prompts_sha256="bench", classes=CLASSES, positive_class="tumor")
    zs = held_out_dice(test, text.astype(np.float32), np.zeros(2, np.float32))
    row = {"seed": seed, "zero_shot": zs}
    for k in ks:
        cv, adapter = learn(train[:k], text, CLASSES, "tumor", Threshold(), LOGIT_SCALE, ident)
        used = held_out_dice(test, adapter.weights, adapter.bias) if cv.better else zs
        row[f"k{k}"] = {"adapted": held_out_dice(test, adapter.weights, adapter.bias), "applied": used,
                        "written": cv.better, "method": f"{cv.best[0]}:{cv.best[1]:g}:{cv.best[2]:g}",
                        "cv_zero_shot": cv.zero_shot_mean, "cv_adapted": cv.mean(cv.best)}
    return row


def timing(dim: int = 768, slides: int = 4, size: int = 19_400) -> dict:
    cent, text = world(dim, 7)
    rule = LabelRule(CLASSES, "tumor")
    data = [labelled(f"s{i}", make_slide(700 + i, cent, size, True), rule, False) for i in range(slides)]
    n = sum(len(s.coords) for s in data)
    ident = identity({}, "bench", "fp32", patch_size=PATCH, stride=STRIDE, target_mpp=None, tissue="zeus",
                     prompts_sha256="bench", classes=CLASSES, positive_class="tumor")
    runs, cpu = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        cv, adapter = learn(data, text, CLASSES, "tumor", Threshold(), LOGIT_SCALE, ident)
        runs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # CPU time of this process (all its threads): robust to other load
    one = data[0]
    u = Unit(one.name, one, np.ones(len(one.coords), bool), (0, 0, one.width, one.height))
    zs_t, ad_t = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        unit_dice(u, one.features @ text.T.astype(np.float32), CLASSES, "tumor", Threshold(), LOGIT_SCALE)
        zs_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        unit_dice(u, adapter.scores(one.features), CLASSES, "tumor", Threshold(), LOGIT_SCALE)
        ad_t.append(time.perf_counter() - t0)
    return {"patches": n, "dim": dim, "slides": slides, "learn_s": statistics.median(runs),
            "learn_cpu_s": statistics.median(cpu), "load_avg": os.getloadavg()[0],
            "rescore_adapted_s": statistics.median(ad_t), "score_zero_shot_s": statistics.median(zs_t)}


def tiny_model_loop(work: Path) -> dict:
    """With the tiny open_clip model (samples/tiny_model.py): ``zeus segment`` of a 6144 x 4096 synthetic slide
    (first run: embeds), ``zeus learn`` from its true tumor outline (cache hit), and the re-segmentation of the
    cached slide with ``--adapter`` (0 patches embedded). Wall times of the CLI calls, in this process."""
    import json
    import os

    import rasterio.features
    from affine import Affine
    from PIL import Image
    from shapely.geometry import shape

    from zeus_qupath.cli import main as zeus
    from zeus_qupath.qupath_geojson import QuPathObject, objects_to_feature_collection
    from zeus_qupath.samples import prompt_path
    from zeus_qupath.samples.synthetic import make_synthetic_slide
    from zeus_qupath.samples.tiny_model import load_or_train_tiny_model

    tiny = load_or_train_tiny_model(Path(os.environ.get("ZEUS_TINY_MODEL_CACHE", work / "tiny")),
                                    prompt_path("spindle_cell"))
    model = ["--model", f"open_clip:{tiny.config_path}", "--pretrained", str(tiny.checkpoint_path),
             "--prompts", str(prompt_path("spindle_cell")), "--device", "cpu"]
    syn = make_synthetic_slide(work / "slide.tif", 6144, 4096, seed=5)
    out, cache = work / "zs", work / "cache"
    t0 = time.perf_counter()
    assert zeus(["segment", str(syn.path), *model, "--quiet", "--out", str(out), "--cache", str(cache)]) == 0
    first = time.perf_counter() - t0
    mask = np.asarray(Image.open(syn.tumor_mask_path)) > 127
    polys = [shape(g) for g, v in rasterio.features.shapes(mask.astype(np.uint8), mask=mask,
                                                            transform=Affine.scale(syn.mask_downsample)) if v == 1]
    corrected = work / "corrected"
    corrected.mkdir(exist_ok=True)
    objs = [QuPathObject(p, class_name="Tumor", color=(200, 0, 0)) for p in polys]
    (corrected / "slide.geojson").write_text(json.dumps(objects_to_feature_collection(objs)))
    t0 = time.perf_counter()
    assert zeus(["learn", str(corrected), "--originals", str(out), "--cache", str(cache), "--force",
                 "--out", str(work / "a.npz"), *model]) == 0
    learn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert zeus(["segment", str(syn.path), *model, "--quiet", "--out", str(work / "adapted"), "--cache", str(cache),
                 "--adapter", str(work / "a.npz")]) == 0
    again = time.perf_counter() - t0
    run = json.loads((work / "adapted" / "run.json").read_text())
    return {"patches": run["slides"][0]["patches"], "first_run_s": first, "learn_cli_s": learn_s,
            "adapted_rerun_s": again, "rerun_cache": run["slides"][0]["cache"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "learn.json"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--only-timing", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="also time the CLI loop with the tiny open_clip model")
    ap.add_argument("--simulated", action="store_true", help="also the cohort simulated at the embedding level")
    ap.add_argument("--no-images", action="store_true", help="skip the cohort on images (tiny model)")
    args = ap.parse_args(argv)
    result: dict = {"machine": machine(), "threads": os.environ.get("OMP_NUM_THREADS"), "cohorts": {}}
    if args.only_timing:
        args.seeds = 0
    if args.seeds and not args.no_images:
        import tempfile

        import learn_images

        with tempfile.TemporaryDirectory(prefix="zeus-bench-learn-images-") as tmp:
            images = learn_images.run(Path(tmp), args.seeds)
        images["summary"] = learn_images.summary(images)
        result["images"] = images
        print(f"{'images cohort':26} {'k':>2} {'zero-shot':>9} {'adapted':>8} {'applied':>8} {'change':>7}  written"
              "  (median of seeds; change = applied - zero-shot)")
        for r in images["summary"]:
            print(f"{r['cohort']:26} {r['k']:2d} {r['zero_shot']:9.3f} {r['adapted']:8.3f} {r['applied']:8.3f} "
                  f"{r['change']:+7.3f}  {r['written']}/{r['seeds']}")
        t = images["timing"]
        print(f"one fresh slide ({t['patches']} patches): zeus segment first run {t['first_run_s']:.1f} s; "
              f"zeus segment --adapter on it {t['adapted_rerun_s']:.1f} s (cache {t['rerun_cache']})")
    if not args.simulated:
        args.seeds = 0
    if args.seeds:
        print(f"{'simulated':12} {'k':>2} {'zero-shot':>9} {'adapted':>8} {'change':>7}  written  method "
              "(median of seeds)")
    for name, conf in (("confounded", True), ("clean", False)) if args.seeds else ():
        rows = [cohort_run(seed + 1, conf) for seed in range(args.seeds)]
        result["cohorts"][name] = rows
        zs = statistics.median(r["zero_shot"] for r in rows)
        for k in (1, 2, 4):
            ad = statistics.median(r[f"k{k}"]["applied"] for r in rows)
            written = sum(r[f"k{k}"]["written"] for r in rows)
            methods = ",".join(r[f"k{k}"]["method"] for r in rows)
            print(f"{name:12} {k:2d} {zs:9.3f} {ad:8.3f} {ad - zs:+7.3f}  {written}/{len(rows)}      {methods}")
    if not args.no_timing:
        t = timing()
        result["timing"] = t
        print(f"learn from {t['patches']:,} patches ({t['slides']} slides, {t['dim']}-d, CV included): "
              f"{t['learn_s']:.2f} s wall, {t['learn_cpu_s']:.2f} s CPU (load average {t['load_avg']:.1f}); "
              "re-score one cached slide with the adapter (scores + mask): "
              f"{t['rescore_adapted_s']:.2f} s vs zero-shot {t['score_zero_shot_s']:.2f} s")
    if args.tiny:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="zeus-bench-learn-") as tmp:
            t = tiny_model_loop(Path(tmp))
        result["tiny_model_loop"] = t
        print(f"tiny model, {t['patches']} patches: zeus segment first run {t['first_run_s']:.1f} s; zeus learn "
              f"(CLI, cached) {t['learn_cli_s']:.1f} s; zeus segment --adapter on the cached slide "
              f"{t['adapted_rerun_s']:.1f} s (cache {t['rerun_cache']}: 0 patches embedded)")
    write_json(args.out, result)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
