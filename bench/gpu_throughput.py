"""GPU throughput: the model alone against the full pipeline, for ViT-B/32 @ 224 and ViT-B/16 @ 448 in bf16.

    python bench/gpu_throughput.py [--size 16384] [--batch-sizes 64 256 512] [--workers N] [--budget 420]

Run by ``bench/gpu.sh`` on a CUDA machine. Random open_clip weights (no downloads): the cost of a model
depends on its shape, not its weights. For each model and batch size:

* model only: random preprocessed input already on the device, the image tower under bf16 autocast;
* preprocess + model: random uint8 448 px patches on the device through the model's own
  ``ImagePreprocess`` (resize, normalise) and the tower: the most the pipeline can deliver;
* pipeline: a synthetic JPEG-tiled slide through the real stream (reading threads decode block
  regions into pinned memory, each region is uploaded once, patches are cut on the device with
  ``unfold``, preprocessed and embedded; results come back asynchronously), every tissue patch.

The pipeline's share of "preprocess + model" says how well the device is fed. Prints a table and
writes JSON to $OUT/gpu.json (when $OUT is set) and bench/results/gpu.json.
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
from zeus_qupath.reader import ReadPlan, RegionStream  # noqa: E402
from zeus_qupath.slide import Slide  # noqa: E402
from zeus_qupath.tissue import detect_tissue  # noqa: E402

MODELS = {"ViT-B-32@224": ("ViT-B-32", 224), "ViT-B-16@448": ("ViT-B-16", 448)}


def make_encoder(arch: str, size: int, device: torch.device):
    import open_clip

    from zeus_qupath.models.openclip import OpenClipEncoder

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None, force_image_size=size, device=device)
    return OpenClipEncoder(f"{arch}@{size}", model, open_clip.get_tokenizer(arch), device, "bf16")


def timed(fn, seconds: float, warmup: int = 3) -> tuple[float, int]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def model_only(enc, batch: int, seconds: float) -> float:
    x = torch.randn(batch, 3, enc.preprocess.size, enc.preprocess.size, device=enc.device)
    dtype = torch.bfloat16

    def step() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
            enc.image_features(x)

    dt, n = timed(step, seconds)
    return batch * n / dt


def preprocess_and_model(enc, batch: int, seconds: float) -> float:
    pixels = torch.randint(0, 256, (batch, 448, 448, 3), dtype=torch.uint8, device=enc.device)
    dt, n = timed(lambda: image_features(enc, pixels), seconds)
    return batch * n / dt


def pipeline(enc, path: Path, grid, batch: int, workers: int, prefetch: int, passes: int) -> list[float]:
    rates = []
    for _ in range(passes):
        stream = RegionStream([ReadPlan.for_grid(0, str(path), grid)], workers=workers, prefetch=prefetch,
                              transform=pin_region)
        runner = StreamEncoder([enc], batch_size=batch)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        (result,) = list(runner.run(stream))
        torch.cuda.synchronize()
        rates.append(len(grid) / (time.perf_counter() - t0))
        assert result.features[0].shape[0] == len(grid) and np.isfinite(result.features[0]).all()
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384, help="synthetic slide side (px)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--pipeline-batch-sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--workers", type=int, default=max(2, (os.cpu_count() or 4) - 2))
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0, help="per model-only measurement")
    ap.add_argument("--passes", type=int, default=2, help="pipeline passes over the slide per setting")
    ap.add_argument("--budget", type=float, default=420.0, help="stop starting new measurements after this (s)")
    ap.add_argument("--work-dir", default="/tmp/zeus-gpu-bench")
    args = ap.parse_args()
    start = time.perf_counter()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU")
        return 1
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    info = {**machine(), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "workers": args.workers, "prefetch": args.prefetch}
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

    for label, (arch, size) in MODELS.items():
        enc = make_encoder(arch, size, device)
        for batch in args.batch_sizes:
            if over_budget():
                break
            entry = {"model": label, "batch": batch}
            try:
                entry["model_only_pps"] = model_only(enc, batch, args.seconds)
                entry["preprocess_model_pps"] = preprocess_and_model(enc, batch, args.seconds)
                if batch in args.pipeline_batch_sizes and not over_budget():
                    rates = pipeline(enc, slide, grid, batch, args.workers, args.prefetch, args.passes)
                    entry["pipeline_runs_pps"] = rates
                    entry["pipeline_pps"] = statistics.median(rates)
                    entry["fed"] = entry["pipeline_pps"] / entry["preprocess_model_pps"]
            except torch.cuda.OutOfMemoryError as exc:
                entry["error"] = f"out of memory: {str(exc).splitlines()[0]}"
                torch.cuda.empty_cache()
            entry["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            results.append(entry)
            print(json.dumps(entry), flush=True)
        del enc
        torch.cuda.empty_cache()

    rows = [[r["model"], r["batch"], r.get("model_only_pps", "-"), r.get("preprocess_model_pps", "-"),
             r.get("pipeline_pps", "-"), f"{100 * r['fed']:.0f} %" if "fed" in r else "-", r["peak_gpu_mb"]]
            for r in results]
    print(table(rows, ["model", "batch", "model only p/s", "preprocess+model p/s", "pipeline p/s",
                       "pipeline / (preprocess+model)", "peak GPU MB"]))
    data = {"benchmark": "gpu_throughput", "machine": info, "slide": args.size, "patches": len(grid),
            "results": results, "seconds": time.perf_counter() - start}
    for target in ([Path(os.environ["OUT"]) / "gpu.json"] if os.environ.get("OUT") else []) + \
            [ROOT / "bench" / "results" / "gpu.json"]:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2))
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
