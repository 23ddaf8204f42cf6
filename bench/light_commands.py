"""Light commands: the whole `zeus polygons` process against the whole full-resolution ZEUS rule process.

    python bench/light_commands.py [--sizes 16384] [--repeats 3] [--fullres-max 16384]

The scores are reconstruction.py's (random smooth fields at 448/112 on a square slide, 70 % of the
patches kept), saved as a scores file. Measured, each in a fresh process:

* `zeus polygons SCORES --out FILE` as users run it (`python -m zeus_qupath`), peak RSS (VmHWM of the
  process, interpreter and imports included) and wall time, and which model modules it imported;
* the same interpreter that only imports the command line (`zeus --help`): start-up alone;
* the full-resolution ZEUS rule (reconstruct.zeus_mask_fullres, what the authors' code does) in a fresh
  process that builds the same scores: its peak RSS and time (reconstruction.py's measurement).

Prints a table and writes bench/results/light_commands.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, measure, table, write_json  # noqa: E402
from reconstruction import make_scores, run_fullres  # noqa: E402

# runs the command line in this interpreter, then reports its own peak RSS (VmHWM is per process: an exec
# starts it afresh, unlike ru_maxrss) and the modules it imported
WRAPPER = r"""
import json, sys
try:
    from zeus_qupath.cli import main
    rc = main(sys.argv[2:])
except SystemExit as exc:  # --help
    rc = exc.code or 0
with open("/proc/self/status") as fh:
    hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
with open(sys.argv[1], "w") as fh:
    json.dump({"rc": rc, "peak_rss_mb": hwm / 1024, "modules": sorted(sys.modules)}, fh)
sys.exit(rc)
"""
MODEL_MODULES = ("torch", "open_clip", "transformers", "timm")


def zeus(args: list[str], stats: Path) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", WRAPPER, str(stats), *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"zeus {' '.join(args)} failed ({res.returncode}):\n{res.stderr}")
    out = json.loads(stats.read_text())
    modules = out.pop("modules")
    out["model_modules"] = sorted(m for m in modules if m.split(".")[0] in MODEL_MODULES and "." not in m)
    out["wall_s"] = wall
    return out


def save_scores(size: int, path: Path) -> int:
    scores = make_scores(size)
    scores.save(path)
    return len(scores.coords)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fullres-repeats", type=int, default=1)
    ap.add_argument("--fullres-max", type=int, default=16384, help="largest size to run the full-resolution rule at")
    ap.add_argument("--json", default="bench/results/light_commands.json")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        help_runs = [zeus(["--help"], work / "stats.json") for _ in range(args.repeats)]
        for size in args.sizes:
            scores = work / f"s{size}.scores.npz"
            patches = save_scores(size, scores)
            runs = [zeus(["polygons", str(scores), "--out", str(work / "out.geojson")], work / "stats.json")
                    for _ in range(args.repeats)]
            regions = len(json.loads((work / "out.geojson").read_text())["features"])
            entry = {"size": size, "patches": patches, "regions": regions, "polygons_runs": runs,
                     "polygons_peak_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                     "polygons_wall_s": statistics.median(r["wall_s"] for r in runs),
                     "polygons_model_modules": sorted({m for r in runs for m in r["model_modules"]})}
            print(f"{size}: zeus polygons {entry['polygons_peak_mb']:.0f} MB, {entry['polygons_wall_s']:.2f} s, "
                  f"{regions} regions, model modules: {','.join(entry['polygons_model_modules']) or 'none'}",
                  flush=True)
            if size <= args.fullres_max:
                full = [measure(run_fullres, size) for _ in range(args.fullres_repeats)]
                entry.update(fullres_runs=full, fullres_peak_mb=statistics.median(r["peak_rss_mb"] for r in full),
                             fullres_s=statistics.median(r["seconds"] for r in full))
                entry["peak_ratio"] = entry["fullres_peak_mb"] / entry["polygons_peak_mb"]
                print(f"{size}: full-resolution rule {entry['fullres_peak_mb']:.0f} MB, {entry['fullres_s']:.1f} s",
                      flush=True)
            results.append(entry)
    start = {"peak_mb": statistics.median(r["peak_rss_mb"] for r in help_runs),
             "wall_s": statistics.median(r["wall_s"] for r in help_runs),
             "model_modules": sorted({m for r in help_runs for m in r["model_modules"]})}
    rows = [[r["size"], r["patches"], r["polygons_peak_mb"], r["polygons_wall_s"], r.get("fullres_peak_mb", "-"),
             r.get("fullres_s", "-"), r.get("peak_ratio", "-"), ",".join(r["polygons_model_modules"]) or "none"]
            for r in results]
    print(table(rows, ["size", "patches", "polygons peak MB", "polygons wall s", "full-res peak MB", "full-res s",
                       "peak ratio", "model modules"]))
    print(f"zeus --help (start-up alone): {start['peak_mb']:.0f} MB, {start['wall_s']:.2f} s")
    write_json(args.json, {"benchmark": "light_commands", "machine": machine(), "startup": start,
                           "help_runs": help_runs, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
