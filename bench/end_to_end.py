"""End to end: ``zeus segment`` on a 100k x 80k px synthetic slide with the tiny model on the CPU.

    python bench/end_to_end.py [--width 100000 --height 80000] [--repeats 2] [--model open_clip:ViT-B-32]

The slide (made once with ``make_synthetic_slide``: mostly background, tissue islands) is segmented
by the real command in a fresh process, twice per repeat, into a fresh output folder:

* first run: nothing cached (tissue, grid, every tissue patch through the model, polygons, outputs);
* cache-hit run: other prompts (a prompt file with fewer templates) in the same output folder, so
  the slide's embeddings come from the cache and it is only re-scored.

Reported per run: wall time of the whole command (interpreter start included), patches, patches/s
(patches per second of the embedding stage, and per second of the whole first run), and the peak
RSS of the process (VmHWM). Medians over the repeats; the cache-hit run's time as a share of the first
run's, per repeat. Writes bench/results/end_to_end.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_json  # noqa: E402

WRAPPER = r"""
import json, sys, time
t0 = time.perf_counter()
from zeus_qupath.cli import main
rc = main(sys.argv[2:])
seconds = time.perf_counter() - t0
with open("/proc/self/status") as fh:
    hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
with open(sys.argv[1], "w") as fh:
    json.dump({"rc": rc, "seconds_in_process": seconds, "peak_rss_mb": hwm / 1024}, fh)
sys.exit(rc)
"""


def zeus_segment(args: list[str], stats: Path) -> dict:
    """Run ``zeus segment ARGS`` in a fresh interpreter; wall time, exit code and peak RSS."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", WRAPPER, str(stats), "segment", *args], capture_output=True,
                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"zeus segment failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    out = json.loads(stats.read_text())
    out["wall_s"] = wall
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=100_000)
    ap.add_argument("--height", type=int, default=80_000)
    ap.add_argument("--tissue-fraction", type=float, default=0.08)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--slides-dir", default="bench/results/slides")
    ap.add_argument("--work-dir", default="bench/results/end_to_end")
    ap.add_argument("--tiny-cache", default=None, help="where the tiny model is kept (default: WORK_DIR/tiny-model)")
    ap.add_argument("--model", default=None,
                    help="another model spec instead of the tiny model (e.g. open_clip:ViT-B-32: random weights)")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--json", default="bench/results/end_to_end.json")
    args = ap.parse_args()

    from zeus_qupath.samples import prompt_path
    from zeus_qupath.samples.synthetic import make_synthetic_slide
    from zeus_qupath.samples.tiny_model import load_or_train_tiny_model

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    slides = Path(args.slides_dir)
    slides.mkdir(parents=True, exist_ok=True)
    slide = slides / f"e2e_{args.width}x{args.height}.tif"
    if not slide.exists():
        t0 = time.perf_counter()
        make_synthetic_slide(slide, args.width, args.height, seed=11, tissue_fraction=args.tissue_fraction)
        print(f"wrote {slide} ({slide.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s", flush=True)
    prompts = prompt_path("spindle_cell")
    if args.model:
        model_args = ["--model", args.model,
                      *(["--pretrained", args.pretrained] if args.pretrained else ["--random-weights"])]
    else:
        tiny = load_or_train_tiny_model(Path(args.tiny_cache) if args.tiny_cache else work / "tiny-model", prompts)
        model_args = ["--model", f"open_clip:{tiny.config_path}", "--pretrained", str(tiny.checkpoint_path)]
    other = json.loads(Path(prompts).read_text())
    other["0"]["templates"] = other["0"]["templates"][:4]
    other_prompts = work / "other_prompts.json"
    other_prompts.write_text(json.dumps(other))
    model = [*model_args, "--device", "cpu", "--quiet", "--workers", str(args.workers), "--batch-size",
             str(args.batch_size)]

    runs = []
    for r in range(args.repeats):
        out = work / f"run{r}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        first = zeus_segment([str(slide), *model, "--prompts", str(prompts), "--out", str(out)], work / "stats.json")
        report = json.loads((out / "run.json").read_text())["slides"][0]
        first.update(patches=report["patches"], embed_pps=report["patches_per_s"], stage_s=report["seconds"],
                     pps=report["patches"] / first["wall_s"])
        hit = zeus_segment([str(slide), *model, "--prompts", str(other_prompts), "--out", str(out)],
                           work / "stats.json")
        hit_report = json.loads((out / "run.json").read_text())["slides"][0]
        assert hit_report["cache"] == "hit", hit_report
        hit.update(stage_s=hit_report["seconds"])
        runs.append({"first": first, "cache_hit": hit, "hit_share": hit["wall_s"] / first["wall_s"]})
        print(f"repeat {r + 1}: first {first['wall_s']:.1f} s ({first['patches']} patches, "
              f"{first['embed_pps']:.0f} patches/s embedding, peak {first['peak_rss_mb']:.0f} MB); "
              f"cache hit {hit['wall_s']:.1f} s ({100 * runs[-1]['hit_share']:.1f} %), "
              f"peak {hit['peak_rss_mb']:.0f} MB",
              flush=True)

    def med(kind: str, key: str) -> float:
        return float(statistics.median(run[kind][key] for run in runs))

    share = statistics.median(run["hit_share"] for run in runs)
    peak = max(run["first"]["peak_rss_mb"] for run in runs)
    rows = [["first run", med("first", "wall_s"), runs[0]["first"]["patches"], med("first", "embed_pps"),
             med("first", "pps"), med("first", "peak_rss_mb")],
            ["cache hit, new prompts", med("cache_hit", "wall_s"), runs[0]["first"]["patches"], "-", "-",
             med("cache_hit", "peak_rss_mb")]]
    print(table(rows, ["run", "wall s", "patches", "patches/s (embed)", "patches/s (whole run)", "peak RSS MB"]))
    print(f"peak RSS {peak / 1024:.2f} GB (target <= 3 GB: {'holds' if peak <= 3072 else 'misses'}); cache-hit run "
          f"{100 * share:.1f} % of the first (target <= 5 %: {'holds' if share <= 0.05 else 'misses'})")
    write_json(args.json, {"benchmark": "end_to_end", "machine": machine(), "model": args.model or "tiny",
                           "slide": [args.width, args.height],
                           "slide_mb": slide.stat().st_size / 1e6, "tissue_fraction": args.tissue_fraction,
                           "workers": args.workers, "batch_size": args.batch_size, "runs": runs,
                           "median_first_s": med("first", "wall_s"), "median_hit_s": med("cache_hit", "wall_s"),
                           "hit_share": share, "peak_rss_mb": peak})
    return 0


if __name__ == "__main__":
    sys.exit(main())
