"""GPU throughput: the model alone against the full pipeline, for KEEP's shape (ViT-L/16 @ 224 with its BERT
text tower) in fp32, TF32 and bf16, and ViT-B/32 @ 224 and ViT-B/16 @ 448 (CONCH's shape) in bf16.

    python bench/gpu_throughput.py [--size 16384] [--models keep vit-b32 vit-b16] [--precisions fp32 tf32 bf16]
                                   [--batch-sizes 64 256 512] [--workers N] [--budget 420] [--dry-run]

Run by ``bench/gpu.sh`` on a CUDA machine. Random weights (no downloads): the cost of a model depends on
its shape, not its weights. KEEP is built by ``zeus_qupath.models.keep_model`` (timm ViT-L/16 and a
transformers BERT, both towers loaded once, as a run loads them); its attention runs through timm's
``fused_attn`` (``scaled_dot_product_attention``) unless TIMM_FUSED_ATTN=0, recorded per model.
Precisions: ``fp32`` (TF32 off for matmul and cuDNN), ``tf32`` (fp32 weights, ``allow_tf32`` on for matmul
and cuDNN), ``bf16`` (autocast, as ``--precision bf16``/``auto`` on CUDA). For each model, precision and
batch size:

* model only: random preprocessed input already on the device, the image tower under bf16 autocast;
* preprocess + model: random uint8 448 px patches on the device through the model's own
  ``ImagePreprocess`` (resize, normalise) and the tower: the most the pipeline can deliver;
* pipeline: a synthetic JPEG-tiled slide through the real stream (reading threads decode block
  regions into pinned memory, each region is uploaded once, patches are cut on the device with
  ``unfold``, preprocessed and embedded; results come back asynchronously), every tissue patch.

The pipeline's share of "preprocess + model" says how well the device is fed. Prints a table and
writes JSON to $OUT/gpu.json (when $OUT is set) and bench/results/gpu.json. ``--dry-run`` runs every code
path on the CPU with a small slide, a 2-block KEEP and tiny timings (a check of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import machine, table  # noqa: E402

from zeus_qupath.embed import StreamEncoder, image_features, pin_region  # noqa: E402
from zeus_qupath.grid import PatchGeometry, make_grid  # noqa: E402
from zeus_qupath.models.base import autocast_dtype  # noqa: E402
from zeus_qupath.reader import ReadPlan, RegionStream  # noqa: E402
from zeus_qupath.slide import Slide  # noqa: E402
from zeus_qupath.tissue import detect_tissue  # noqa: E402

MODELS = {"keep": ("KEEP ViT-L-16@224+BERT", None, 224), "vit-b32": ("ViT-B-32@224", "ViT-B-32", 224),
          "vit-b16": ("ViT-B-16@448", "ViT-B-16", 448)}
PRECISIONS = ("fp32", "tf32", "bf16")
KEEP_CONFIG = {  # KEEP's published config.json, the parts its network depends on (keep_model.parse_keep_config)
    "model_type": "keep", "projection_dim": 768,
    "vision_config": {"model_type": "vit", "img_size": 224, "patch_size": 16, "init_values": 1e-5,
                      "num_classes": 0},
    "text_config": {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512},
}


def set_precision(name: str) -> str:
    """Switch TF32 for this precision; returns the encoder's ``precision`` (fp32 weights for fp32 and tf32)."""
    tf32 = name == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return "bf16" if name == "bf16" else "fp32"


def make_keep(device: torch.device, precision: str, depth: int | None = None):
    from zeus_qupath.models.keep import KeepEncoder
    from zeus_qupath.models.keep_model import KeepModel, parse_keep_config

    raw = json.loads(json.dumps(KEEP_CONFIG))
    if depth is not None:  # --dry-run: the same code, fewer blocks
        raw["vision_config"]["num_layers"] = depth
        raw["text_config"]["num_hidden_layers"] = depth
    torch.manual_seed(0)
    model = KeepModel(parse_keep_config(raw)).eval().to(device)  # both towers, built and moved once
    return KeepEncoder("KEEP", model, None, device, precision)


def make_encoder(key: str, device: torch.device, precision: str, dry_run: bool = False):
    label, arch, size = MODELS[key]
    if arch is None:
        return make_keep(device, precision, depth=2 if dry_run else None)
    import open_clip

    from zeus_qupath.models.openclip import OpenClipEncoder

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None, force_image_size=size, device=device)
    return OpenClipEncoder(label, model, open_clip.get_tokenizer(arch), device, precision)


def fused_attention(enc) -> str:
    """How the image tower's attention runs: timm blocks report ``fused_attn`` (scaled_dot_product_attention)."""
    flags = [bool(m.fused_attn) for m in enc.model.modules() if hasattr(m, "fused_attn")]
    if flags:
        return f"sdpa {sum(flags)}/{len(flags)} blocks"
    return "torch MultiheadAttention"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, seconds: float, device: torch.device, warmup: int = 3) -> tuple[float, int]:
    for _ in range(warmup):
        fn()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n == 0:
        fn()
        n += 1
    _sync(device)
    return time.perf_counter() - t0, n


def model_only(enc, batch: int, seconds: float) -> float:
    x = torch.randn(batch, 3, enc.preprocess.size, enc.preprocess.size, device=enc.device)
    dtype = autocast_dtype(enc.device, enc.precision)

    def step() -> None:
        with torch.inference_mode(), torch.autocast(enc.device.type, dtype=dtype, enabled=dtype is not None):
            enc.image_features(x)

    dt, n = timed(step, seconds, enc.device)
    return batch * n / dt


def preprocess_and_model(enc, batch: int, seconds: float) -> float:
    pixels = torch.randint(0, 256, (batch, 448, 448, 3), dtype=torch.uint8, device=enc.device)
    dt, n = timed(lambda: image_features(enc, pixels), seconds, enc.device)
    return batch * n / dt


def pipeline(enc, path: Path, grid, batch: int, workers: int, prefetch: int, passes: int) -> list[float]:
    rates = []
    for _ in range(passes):
        stream = RegionStream([ReadPlan.for_grid(0, str(path), grid)], workers=workers, prefetch=prefetch,
                              transform=pin_region if enc.device.type == "cuda" else None)
        runner = StreamEncoder([enc], batch_size=batch)
        _sync(enc.device)
        t0 = time.perf_counter()
        (result,) = list(runner.run(stream))
        _sync(enc.device)
        rates.append(len(grid) / (time.perf_counter() - t0))
        assert result.features[0].shape[0] == len(grid) and np.isfinite(result.features[0]).all()
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384, help="synthetic slide side (px)")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                    help="for KEEP's shape; the open_clip shapes run in bf16 only (as measured before)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--pipeline-batch-sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--workers", type=int, default=max(2, (os.cpu_count() or 4) - 2))
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0, help="per model-only measurement")
    ap.add_argument("--passes", type=int, default=2, help="pipeline passes over the slide per setting")
    ap.add_argument("--budget", type=float, default=420.0, help="stop starting new measurements after this (s)")
    ap.add_argument("--work-dir", default="/tmp/zeus-gpu-bench")
    ap.add_argument("--dry-run", action="store_true", help="CPU check of every code path (no measurement)")
    args = ap.parse_args()
    start = time.perf_counter()
    if args.dry_run:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        args.size, args.batch_sizes, args.pipeline_batch_sizes = 1536, [4], [4]
        args.seconds, args.passes = 0.0, 1
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (--dry-run checks it on the CPU)")
        return 1
    else:
        device = torch.device("cuda")
    info = {**machine(), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "torch": torch.__version__, "workers": args.workers, "prefetch": args.prefetch, "dry_run": args.dry_run}
    print(json.dumps(info), flush=True)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"gpu_{args.size}.tif"
    if not slide.exists():
        try:
            from zeus_qupath.samples.synthetic import make_synthetic_slide
        except ImportError:  # running from a source tree without installing
            from samples.synthetic import make_synthetic_slide
        t0 = time.perf_counter()
        make_synthetic_slide(slide, args.size, args.size, seed=5)
        print(f"wrote {slide} in {time.perf_counter() - t0:.0f} s", flush=True)
    with Slide(slide) as s:
        grid = make_grid(*s.dimensions, PatchGeometry(448, 112), detect_tissue(s))
    print(f"slide {args.size} x {args.size}: {len(grid)} tissue patches (448 px, stride 112)", flush=True)

    results = []

    def over_budget() -> bool:
        return time.perf_counter() - start > args.budget

    for key in args.models:
        for prec in (args.precisions if key == "keep" else ["bf16"]):
            if over_budget():
                break
            t_load = time.perf_counter()
            enc = make_encoder(key, device, set_precision(prec), args.dry_run)
            _sync(device)
            load_s = time.perf_counter() - t_load
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for batch in args.batch_sizes:
                if over_budget():
                    break
                entry = {"model": MODELS[key][0], "precision": prec, "batch": batch, "attention": fused_attention(enc),
                         "build_s": round(load_s, 2)}
                try:
                    entry["model_only_pps"] = model_only(enc, batch, args.seconds)
                    entry["preprocess_model_pps"] = preprocess_and_model(enc, batch, args.seconds)
                    if batch in args.pipeline_batch_sizes and not over_budget():
                        rates = pipeline(enc, slide, grid, batch, args.workers, args.prefetch, args.passes)
                        entry["pipeline_runs_pps"] = rates
                        entry["pipeline_pps"] = statistics.median(rates)
                        entry["fed"] = entry["pipeline_pps"] / entry["preprocess_model_pps"]
                        entry["fed_of_model_only"] = entry["pipeline_pps"] / entry["model_only_pps"]
                except torch.cuda.OutOfMemoryError as exc:
                    entry["error"] = f"out of memory: {str(exc).splitlines()[0]}"
                    torch.cuda.empty_cache()
                if device.type == "cuda":
                    entry["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
                    torch.cuda.reset_peak_memory_stats()
                results.append(entry)
                print(json.dumps(entry), flush=True)
            del enc
            if device.type == "cuda":
                torch.cuda.empty_cache()
    set_precision("fp32")

    rows = [[r["model"], r["precision"], r["batch"], r.get("model_only_pps", "-"), r.get("preprocess_model_pps", "-"),
             r.get("pipeline_pps", "-"), f"{100 * r['fed']:.0f} %" if "fed" in r else "-",
             f"{100 * r['fed_of_model_only']:.0f} %" if "fed_of_model_only" in r else "-",
             r.get("peak_gpu_mb", "-"), r["attention"]]
            for r in results]
    print(table(rows, ["model", "precision", "batch", "model only p/s", "preprocess+model p/s", "pipeline p/s",
                       "fed (of preprocess+model)", "fed (of model only)", "peak GPU MB", "attention"]))
    data = {"benchmark": "gpu_throughput", "machine": info, "slide": args.size, "patches": len(grid),
            "results": results, "seconds": time.perf_counter() - start}
    name = "gpu-dry-run.json" if args.dry_run else "gpu.json"
    for target in ([Path(os.environ["OUT"]) / name] if os.environ.get("OUT") else []) + \
            [ROOT / "bench" / "results" / name]:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2))
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
