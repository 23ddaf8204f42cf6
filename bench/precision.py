"""TF32, bf16 and fp16 against fp32 on the demo slide: how far the scores move, and whether the mask moves.

    python bench/precision.py [--models tiny keep vit-b16-448 vit-b32-224] [--size 6144 4096]

CUDA only (on a CPU, ``auto`` precision is fp32 and there is nothing to compare). For each model the demo
slide's tissue patches go through the real stream (regions read once, patches cut on the device,
the model's own preprocessing) once per precision; text prototypes are encoded in the same precision,
as a run does. Reported against fp32: the largest and mean absolute change of a cosine score, the share
of patches whose winning class changes, and the Dice and pixel disagreement of ZEUS's mask.

Models: ``tiny`` is the demo's tiny open_clip model fitted on synthetic tiles (a trained model, so its
scores separate classes as a real model's do); ``vit-b16-448`` (CONCH's shape) and ``vit-b32-224``
(QuiltNet/PLIP's shape) have random weights: their class scores are nearly tied, which makes them the
worst case for argmax flips. ``keep`` is KEEP's network (ViT-L/16 @ 224, timm, fused attention; built by
zeus_qupath.models.keep_model) with random weights and no tokenizer (nothing is downloaded): its class
prototypes are fixed random unit vectors, so its rows measure the image tower's drift only.
``tf32`` is fp32 weights with ``allow_tf32`` on for matmul and cuDNN (off for every other row).
Prints a table and writes precision.json to $OUT (if set) and bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import machine, table  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def _samples():
    try:
        from zeus_qupath.samples import prompt_path
        from zeus_qupath.samples.synthetic import make_synthetic_slide
        from zeus_qupath.samples.tiny_model import load_or_train_tiny_model
    except ImportError:  # a source tree that is not installed
        from samples import prompt_path
        from samples.synthetic import make_synthetic_slide
        from samples.tiny_model import load_or_train_tiny_model
    return prompt_path, make_synthetic_slide, load_or_train_tiny_model


def make_model(name: str, work: Path, prompts: Path, device: torch.device, keep_depth: int | None = None):
    """(module, tokenizer, display name) for one benchmark model."""
    import open_clip

    from zeus_qupath.models.openclip import load_open_clip

    if name == "keep":
        from gpu_throughput import make_keep

        return make_keep(device, "fp32", depth=keep_depth).model, None
    if name == "tiny":
        _, _, load_or_train_tiny_model = _samples()
        tiny = load_or_train_tiny_model(work / "tiny-model", prompts)
        enc = load_open_clip(str(tiny.config_path), str(tiny.checkpoint_path), device, "fp32", display_name="tiny")
        return enc.model, enc.tokenizer
    arch, size = {"vit-b16-448": ("ViT-B-16", 448), "vit-b32-224": ("ViT-B-32", 224)}[name]
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None, force_image_size=size, device=device)
    return model, open_clip.get_tokenizer(arch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_precision(model, tokenizer, name: str, precision: str, slide: Path, grid, prompts, device):
    from zeus_qupath.embed import StreamEncoder, pin_region
    from zeus_qupath.models.keep import KeepEncoder
    from zeus_qupath.models.openclip import OpenClipEncoder
    from zeus_qupath.prompts import class_prototypes
    from zeus_qupath.reader import ReadPlan, RegionStream
    from zeus_qupath.scoring import cosine_scores

    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    weights = "fp32" if precision == "tf32" else precision
    if name == "keep":
        enc = KeepEncoder(name, model, None, device, weights)
    else:
        enc = OpenClipEncoder(name, model, tokenizer, device, weights)
    stream = RegionStream([ReadPlan.for_grid(0, str(slide), grid)], workers=max(2, (os.cpu_count() or 4) - 2),
                          prefetch=4, transform=pin_region if device.type == "cuda" else None)
    _sync(device)
    t0 = time.perf_counter()
    (result,) = list(StreamEncoder([enc], batch_size=256).run(stream))
    _sync(device)
    seconds = time.perf_counter() - t0
    if name == "keep":  # no tokenizer without downloads: fixed random prototypes (the image tower's drift only)
        gen = np.random.default_rng(0)
        protos = gen.normal(size=(len(prompts.class_names), enc.embed_dim)).astype(np.float32)
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    else:
        protos = class_prototypes(enc, prompts)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return cosine_scores(result.features[0], protos), seconds


def compare(name: str, ref: np.ndarray, other: np.ndarray, grid, prompts, width: int, height: int) -> dict:
    from zeus_qupath.outputs import PatchScores
    from zeus_qupath.reconstruct import zeus_mask

    def mask(scores: np.ndarray) -> np.ndarray:
        ps = PatchScores(grid.coords, scores.astype(np.float32), tuple(prompts.class_names),
                         prompts.positive_class, grid.geometry.patch_size_l0, grid.geometry.stride_l0,
                         width, height, None, {})
        return zeus_mask(ps).mask

    a, b = mask(ref), mask(other)
    inter, total = np.logical_and(a, b).sum(), a.sum() + b.sum()
    diff = np.abs(other.astype(np.float64) - ref.astype(np.float64))
    return {
        "max_abs_score_change": float(diff.max()),
        "mean_abs_score_change": float(diff.mean()),
        "score_spread_fp32": float(np.median(ref.max(axis=1) - ref.min(axis=1))),
        "argmax_flips": float((ref.argmax(axis=1) != other.argmax(axis=1)).mean()),
        "mask_dice": float(2 * inter / total) if total else 1.0,
        "mask_pixels_changed": float((a != b).mean()),
        "tumor_fraction_fp32": float(a.mean()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "keep", "vit-b16-448", "vit-b32-224"])
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS[1:]), choices=PRECISIONS[1:],
                    help="compared with fp32")
    ap.add_argument("--size", type=int, nargs=2, default=[6144, 4096], metavar=("W", "H"))
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--keep-depth", type=int, default=None, help="fewer KEEP blocks (a CPU check of this script)")
    ap.add_argument("--device", default="cuda", help="cpu only checks this script (every precision is fp32 there)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: bf16/fp16 are only used on CUDA, there is nothing to compare on this machine")
        return 1
    from zeus_qupath.grid import PatchGeometry, make_grid
    from zeus_qupath.prompts import load_prompts
    from zeus_qupath.slide import Slide
    from zeus_qupath.tissue import detect_tissue

    prompt_path, make_synthetic_slide, _ = _samples()
    start = time.perf_counter()
    device = torch.device(args.device)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="zeus-precision-"))
    prompts_file = prompt_path("spindle_cell")
    prompts = load_prompts(prompts_file)
    demo = make_synthetic_slide(work / "demo_slide.tif", args.size[0], args.size[1], seed=7)
    with Slide(demo.path) as s:
        width, height = s.dimensions
        grid = make_grid(width, height, PatchGeometry(448, 112), detect_tissue(s))
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    info = {**machine(), "gpu": gpu, "torch": torch.__version__,
            "slide": f"{width} x {height}", "patches": len(grid)}
    print(json.dumps(info), flush=True)
    results = []
    for name in args.models:
        model, tokenizer = make_model(name, work, prompts_file, device, args.keep_depth)
        scores, seconds = {}, {}
        for precision in ["fp32", *args.precisions]:
            scores[precision], seconds[precision] = run_precision(
                model, tokenizer, name, precision, demo.path, grid, prompts, device)
        for precision in args.precisions:
            entry = {"model": name, "precision": precision, "seconds": seconds[precision],
                     "seconds_fp32": seconds["fp32"],
                     **compare(name, scores["fp32"], scores[precision], grid, prompts, width, height)}
            results.append(entry)
            print(json.dumps(entry), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = [[r["model"], r["precision"], f"{r['max_abs_score_change']:.2e}", f"{r['mean_abs_score_change']:.2e}",
             f"{r['score_spread_fp32']:.2e}", f"{100 * r['argmax_flips']:.2f} %", f"{r['mask_dice']:.5f}",
             f"{100 * r['mask_pixels_changed']:.3f} %", f"{r['seconds_fp32'] / r['seconds']:.2f}x"]
            for r in results]
    print(table(rows, ["model", "vs fp32", "max |d score|", "mean |d score|", "median class spread",
                       "argmax flips", "mask Dice", "mask px changed", "speed vs fp32"]))
    data = {"benchmark": "precision", "machine": info, "results": results, "seconds": time.perf_counter() - start}
    for target in ([Path(os.environ["OUT"]) / "precision.json"] if os.environ.get("OUT") else []) + \
            [ROOT / "bench" / "results" / "precision.json"]:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2))
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
