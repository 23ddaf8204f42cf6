"""Start-up and output writing of `zeus segment` on the demo slide: the time around reading and embedding.

    python bench/startup.py [--runs 3] [--tiny-cache DIR]

`zeus segment` runs on the demo slide (6144 x 4096, the tiny open_clip model, CPU) in a fresh process,
with `-X importtime`, into a fresh output folder (no embedding cache), `--runs` times. Per run:

* wall: the whole process, interpreter start to exit;
* imports: every import of the process (the command line, its lazy imports, torch, open_clip, ...),
  the sum of the top-level entries of Python's import-time log;
* tissue, embed, after-embedding (scoring, mask, polygons and the three output files): run.json's
  per-slide stage times; other: wall minus all of these (model loading, prompts, exit);
* writing (in this process, on the run's own outputs): the scores file, the overlay (heat map drawn
  and PNG written), the GeoJSON, each timed alone; and the mask + polygons step alone.

Baselines measured in the same run: `python -c pass` (the interpreter) and `python -c "import torch,
open_clip"` (the model stack `zeus segment` cannot avoid). Ratios: imports / model-stack imports,
writing / embedding. Medians over the runs. Prints a table and writes bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_json  # noqa: E402


def process(args: list[str], source: Path | None = None) -> tuple[float, str]:
    """Wall time and stderr of ``python ARGS`` in a fresh process (``source``: the zeus_qupath tree it runs)."""
    import os

    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = f"{source}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(source)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        tail = "\n".join(line for line in res.stderr.splitlines() if not line.startswith("import time:"))[-2000:]
        raise SystemExit(f"python {' '.join(args[:4])} ... failed ({res.returncode}):\n{tail}")
    return wall, res.stderr


def import_seconds(log: str) -> tuple[float, list[tuple[float, str]]]:
    """Total import time of a process from its ``-X importtime`` log, and its top-level imports, slowest first."""
    top = []
    for line in log.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if cumulative.strip().isdigit() and not name.startswith("  "):  # nested imports are indented further
            top.append((int(cumulative) / 1e6, name.strip()))
    return sum(s for s, _ in top), sorted(top, reverse=True)


def timed(fn, *args, repeats: int = 3):
    """Median seconds of ``fn(*args)`` and its last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def writing_times(slide: Path, out: Path, tmp: Path) -> dict[str, float]:
    """Each output step of ``zeus segment``, timed alone on the run's outputs."""
    from zeus_qupath.outputs import PatchScores
    from zeus_qupath.overlay import render_overlay, write_png
    from zeus_qupath.params import SegmentParams, Threshold
    from zeus_qupath.qupath_geojson import write_geojson
    from zeus_qupath.segment import geojson_from_scores, polygons_from_scores
    from zeus_qupath.slide import Slide
    from zeus_qupath.tissue import view_downsample

    scores = PatchScores.load(out / f"{slide.stem}.scores.npz")
    with Slide(slide) as s:
        thumbnail = s.read_downsampled(view_downsample(*s.dimensions))
    params = SegmentParams()
    polygons_s, polygons = timed(polygons_from_scores, scores, Threshold(), params)
    collection = geojson_from_scores(scores, Threshold(), params)
    scores_s, _ = timed(scores.save, tmp / "x.scores.npz")
    render_s, image = timed(render_overlay, thumbnail, scores, polygons)
    png_s, _ = timed(write_png, tmp / "x.overlay.png", image)
    geojson_s, _ = timed(write_geojson, tmp / "x.geojson", collection)
    return {"mask_and_polygons_s": polygons_s, "scores_file_s": scores_s, "overlay_render_s": render_s,
            "overlay_png_s": png_s, "geojson_s": geojson_s,
            "writing_s": scores_s + render_s + png_s + geojson_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work-dir", default="bench/results/startup")
    ap.add_argument("--tiny-cache", default=None, help="where the tiny model is kept (default: WORK_DIR/tiny-model)")
    ap.add_argument("--json", default="bench/results/startup.json")
    ap.add_argument("--before", default=None, metavar="REV",
                    help="also run zeus_qupath as of git revision REV (a temporary worktree), alternating with this "
                         "tree: start-up before/after")
    args = ap.parse_args()

    from zeus_qupath.demo import DEMO_SEED, DEMO_SIZE
    from zeus_qupath.samples import prompt_path
    from zeus_qupath.samples.synthetic import make_synthetic_slide
    from zeus_qupath.samples.tiny_model import load_or_train_tiny_model

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    prompts = prompt_path("spindle_cell")
    tiny = load_or_train_tiny_model(Path(args.tiny_cache) if args.tiny_cache else work / "tiny-model", prompts)
    slide = work / "demo_slide.tif"
    if not slide.exists():
        make_synthetic_slide(slide, *DEMO_SIZE, seed=DEMO_SEED)
    command = ["segment", str(slide), "--model", f"open_clip:{tiny.config_path}", "--pretrained",
               str(tiny.checkpoint_path), "--prompts", str(prompts), "--device", "cpu", "--quiet", "--no-cache"]

    if args.before:
        return before_after(args, command, work)
    runs = []
    for r in range(args.runs):
        interpreter_s, _ = process(["-c", "pass"])
        stack_s, _ = process(["-c", "import torch, open_clip"])
        out = work / f"run{r}"
        shutil.rmtree(out, ignore_errors=True)
        wall, log = process(["-X", "importtime", "-m", "zeus_qupath", *command, "--out", str(out)])
        imports, top = import_seconds(log)
        stages = json.loads((out / "run.json").read_text())["slides"][0]["seconds"]
        tmp = work / "writing"
        tmp.mkdir(exist_ok=True)
        run = {"interpreter_s": interpreter_s, "model_stack_import_s": stack_s, "wall_s": wall, "imports_s": imports,
               "tissue_s": stages["tissue"], "embed_s": stages["embed"], "after_embed_s": stages["polygons"],
               "slowest_imports": top[:8], **writing_times(slide, out, tmp)}
        run["other_s"] = wall - imports - stages["tissue"] - stages["embed"] - stages["polygons"]
        runs.append(run)
        print(f"run {r + 1}: wall {wall:.1f} s, imports {imports:.1f} s (torch+open_clip alone {stack_s:.1f} s), "
              f"embed {stages['embed']:.1f} s, after embedding {stages['polygons']:.2f} s, "
              f"writing {run['writing_s']:.2f} s", flush=True)

    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    summary = {k: med(k) for k in runs[0] if k != "slowest_imports"}
    summary["imports_over_model_stack"] = summary["imports_s"] / summary["model_stack_import_s"]
    summary["writing_over_embed"] = summary["writing_s"] / summary["embed_s"]
    rows = [[k.removesuffix("_s"), v] for k, v in summary.items()]
    print(table(rows, ["median over runs (s, or ratio)", "value"]))
    slowest = ", ".join(f"{name} {s:.2f} s" for s, name in runs[-1]["slowest_imports"])
    print(f"slowest top-level imports (last run): {slowest}")
    write_json(args.json, {"benchmark": "startup", "machine": machine(), "slide": list(DEMO_SIZE), "runs": runs,
                           "median": summary})
    return 0


def startup_seconds(out: Path, wall: float) -> float:
    """Wall time outside reading and embedding: start-up to the first batch (imports, model, prompts) plus exit."""
    stages = json.loads((out / "run.json").read_text())["slides"][0]["seconds"]
    return wall - stages["tissue"] - stages["embed"] - stages["polygons"]


def module_import_seconds(log: str, package: str) -> float:
    """Seconds spent importing ``package`` and its submodules (their self times in the ``-X importtime`` log;
    a lazy package such as transformers costs little itself and much in its submodules)."""
    total = 0
    for line in log.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line.split("|")
        name = parts[-1].strip()
        if name == package or name.startswith(package + "."):
            try:
                total += int(parts[0].split(":", 1)[1])
            except ValueError:
                continue
    return total / 1e6


def before_after(args, command: list[str], work: Path) -> int:
    """``zeus segment`` from revision ``args.before`` and from this tree, alternating; medians of start-up."""
    import tempfile

    root = Path(__file__).resolve().parents[1]
    before = Path(tempfile.mkdtemp(prefix="zeus-before-")) / "tree"
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(before), args.before], check=True,
                   capture_output=True)
    rows: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    try:
        for r in range(args.runs):
            for label, source in (("before", before), ("after", root)):
                out = work / f"ab-{label}{r}"
                shutil.rmtree(out, ignore_errors=True)
                wall, log = process(["-X", "importtime", "-m", "zeus_qupath", *command, "--out", str(out)], source)
                imports, _ = import_seconds(log)
                rows[label].append({"wall_s": wall, "imports_s": imports, "startup_s": startup_seconds(out, wall),
                                    "transformers_import_s": module_import_seconds(log, "transformers"),
                                    "timm_import_s": module_import_seconds(log, "timm")})
                print(f"{label} run {r + 1}: wall {wall:.1f} s, start-up {rows[label][-1]['startup_s']:.1f} s, "
                      f"imports {imports:.1f} s", flush=True)
    finally:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(before)], capture_output=True)
    med = {label: {k: float(statistics.median(r[k] for r in runs)) for k in runs[0]} for label, runs in rows.items()}
    print(table([[k.removesuffix("_s"), med["before"][k], med["after"][k]] for k in med["before"]],
                ["median over runs (s)", f"before ({args.before})", "after"]))
    write_json(Path(args.json).with_name("startup_before_after.json"),
               {"benchmark": "startup before/after", "before": args.before, "machine": machine(), "runs": rows,
                "median": med})
    return 0


if __name__ == "__main__":
    sys.exit(main())
