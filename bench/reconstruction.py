"""Mask reconstruction: the grid rule against the full-resolution ZEUS rule, time and peak memory.

    python bench/reconstruction.py [--sizes 8192 16384 32768] [--repeats 3] [--fullres-max 16384]

Each measurement runs in a fresh process (peak RSS is per process). Random smooth score fields at
448/112 on square slides, 70 % of the patches kept (partial tissue). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, measure, median_of, table, write_json  # noqa: E402


def make_scores(size: int, seed: int = 0):
    from scipy import ndimage

    from zeus_qupath.grid import grid_shape
    from zeus_qupath.outputs import PatchScores

    rng = np.random.default_rng(seed)
    rows, cols = grid_shape(size, size, 448, 112)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    index = np.stack([r.ravel(), c.ravel()], axis=1)
    tissue = ndimage.gaussian_filter(rng.normal(size=(rows, cols)), 4)
    index = index[(tissue >= np.quantile(tissue, 0.3))[index[:, 0], index[:, 1]]]
    field = ndimage.gaussian_filter(rng.normal(size=(rows, cols, 2)), (3, 3, 0))
    field[..., 1] -= 0.1
    values = field[index[:, 0], index[:, 1]] + rng.normal(0, 0.05, (len(index), 2))
    return PatchScores(index[:, ::-1] * 112, values.astype(np.float32), ("normal", "tumor"), "tumor", 448, 112,
                       size, size, 0.5)


def run_grid(size: int) -> dict:
    from zeus_qupath.reconstruct import zeus_mask

    mask = zeus_mask(make_scores(size))
    return {"pixel_size": mask.pixel_size, "positive_fraction": float(mask.mask.mean())}


def run_fullres(size: int) -> dict:
    from zeus_qupath.reconstruct import zeus_mask_fullres

    return {"positive_fraction": float(zeus_mask_fullres(make_scores(size)).mean())}


def run_baseline(size: int) -> dict:
    make_scores(size)
    return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fullres-repeats", type=int, default=1)
    ap.add_argument("--fullres-max", type=int, default=16384, help="largest size to run the full-resolution rule at")
    ap.add_argument("--json", default="bench/results/reconstruction.json")
    args = ap.parse_args()
    results = []
    for size in args.sizes:
        base = measure(run_baseline, size)
        grid = [measure(run_grid, size) for _ in range(args.repeats)]
        # times and memory net of building the random scores, which every run does first
        entry = {"size": size, "baseline_rss_mb": base["peak_rss_mb"], "baseline_s": base["seconds"],
                 "grid_runs": grid, "grid_s": median_of(grid, "seconds") - base["seconds"],
                 "grid_peak_mb": median_of(grid, "peak_rss_mb")}
        if size <= args.fullres_max:
            full = [measure(run_fullres, size) for _ in range(args.fullres_repeats)]
            entry.update(fullres_runs=full, fullres_s=median_of(full, "seconds") - base["seconds"],
                         fullres_peak_mb=median_of(full, "peak_rss_mb"))
            entry["speedup"] = entry["fullres_s"] / entry["grid_s"]
            # memory attributable to the step: peak minus the process that only built the scores
            g = max(entry["grid_peak_mb"] - base["peak_rss_mb"], 1.0)
            f = max(entry["fullres_peak_mb"] - base["peak_rss_mb"], 1.0)
            entry.update(grid_step_mb=g, fullres_step_mb=f, memory_ratio=f / g)
        results.append(entry)
        print(f"{size}: grid {entry['grid_s']:.3f} s" + (f", full {entry['fullres_s']:.1f} s" if "fullres_s" in entry
                                                          else ""), flush=True)
    rows = [[r["size"], r["grid_s"], r.get("fullres_s", "-"), r.get("speedup", "-"), r["grid_peak_mb"],
             r.get("fullres_peak_mb", "-"), r.get("memory_ratio", "-")] for r in results]
    print(table(rows, ["size", "grid s", "full-res s", "speed-up", "grid peak MB", "full peak MB", "step mem ratio"]))
    write_json(args.json, {"benchmark": "reconstruction", "machine": machine(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
