"""Patch delivery: model-ready patch batches per second from the streaming reader, against the alternatives.

    python bench/patch_delivery.py [--size 16384] [--repeats 3] [--workers 2] [--batch-size 64]

On one synthetic JPEG-tiled pyramidal slide and its tissue grid (448 px patches, stride 112), each
repeat times, in this process and in turn:

* pipeline, host batches: :class:`~zeus_qupath.reader.RegionStream` (one region per block of grid
  cells, decoded by ``--workers`` threads with bounded read-ahead) and
  :class:`~zeus_qupath.reader.PatchBatcher`, delivering (B, 448, 448, 3) uint8 batches, the
  encoder's input on the CPU;
* pipeline, device regions: the same stream delivering the decoded block regions, which the GPU path
  uploads once each and cuts into patches on the device (no host copy of the overlapping patches);
* per-patch: one ``read_region`` per patch (the CLAM/ZEUS way) by as many threads, each with its own
  slide handle, stacked into the same batches; timed on the first ``--per-patch-sample`` patches of
  the grid (row-major), since the whole grid takes minutes this way;
* decode-once: the compressed bytes of every level-0 tile under a tissue patch read and decoded once
  (tifffile's decoder, no region assembly, same number of threads): the floor for any reader,
  expressed per patch of the grid.

Prints a table of medians and writes JSON (bench/results/patch_delivery.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_json  # noqa: E402

from zeus_qupath.grid import PatchGeometry, PatchGrid, make_grid  # noqa: E402
from zeus_qupath.reader import PatchBatcher, ReadPlan, RegionRead, RegionStream, patch_windows  # noqa: E402
from zeus_qupath.slide import Slide  # noqa: E402
from zeus_qupath.tissue import detect_tissue  # noqa: E402

TILE = 256


def bench_slide(folder: Path, size: int):
    from zeus_qupath.samples.synthetic import make_synthetic_slide

    path = folder / f"delivery_{size}.tif"
    if not path.exists():
        t0 = time.perf_counter()
        make_synthetic_slide(path, size, size, seed=5)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def run_pipeline(path: Path, grid: PatchGrid, workers: int, batch_size: int, block_cells: int,
                 batches: bool = True) -> int:
    """Patches delivered: as host batches (the CPU encoder's input) or as decoded block regions (the GPU path's
    input: each region is uploaded once and its patches are cut on the device)."""
    stream = RegionStream([ReadPlan.for_grid(0, str(path), grid, block_cells=block_cells)], workers=workers)
    batcher = PatchBatcher(batch_size, reuse=True)  # as the encoder stage uses it
    n = 0
    for ev in stream:
        if isinstance(ev, RegionRead):
            if not batches:
                n += len(ev.block.indices)
                continue
            rows, cols = ev.block.local_cells(grid)
            for batch in batcher.add(ev.block.indices, patch_windows(ev.pixels, grid.geometry), rows, cols):
                n += len(batch.indices)
    for batch in batcher.flush():
        n += len(batch.indices)
    return n


class _Handles(threading.local):
    slide: Slide | None = None


def run_per_patch(path: Path, coords: np.ndarray, workers: int, batch_size: int, patch: int) -> int:
    local = _Handles()
    handles: list[Slide] = []

    def read(xy: np.ndarray) -> np.ndarray:
        if local.slide is None:
            local.slide = Slide(path)
            handles.append(local.slide)
        return local.slide.read_region(int(xy[0]), int(xy[1]), patch, patch)

    n = 0
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(coords), batch_size):
            batch = np.stack(list(pool.map(read, coords[start:start + batch_size])))
            n += len(batch)
    for h in handles:
        h.close()
    return n


def tissue_tiles(grid: PatchGrid, width: int, height: int) -> np.ndarray:
    """(K, 2) tile (col, row) of every level-0 tile that a grid patch covers."""
    tw, th = -(-width // TILE), -(-height // TILE)
    need = np.zeros((th, tw), bool)
    p = grid.geometry.patch_size_l0
    for x, y in grid.coords:
        need[y // TILE: min(th, (y + p - 1) // TILE + 1), x // TILE: min(tw, (x + p - 1) // TILE + 1)] = True
    r, c = np.nonzero(need)
    return np.stack([c, r], axis=1)


def run_decode_once(path: Path, tiles: np.ndarray, workers: int) -> int:
    """Read and decode each tile's compressed bytes once (tifffile's own decoder), ``workers`` threads."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[0].keyframe
        across = -(-page.imagewidth // page.tilewidth)
        decode, tables = page.decode, page.jpegtables
        offsets, counts = page.dataoffsets, page.databytecounts

        def read(chunk: np.ndarray) -> int:
            with open(path, "rb") as fh:
                for c, r in chunk:
                    i = int(r) * across + int(c)
                    fh.seek(offsets[i])
                    decode(fh.read(counts[i]), i, jpegtables=tables)
            return len(chunk)

        with ThreadPoolExecutor(workers) as pool:
            return sum(pool.map(read, np.array_split(tiles, max(1, len(tiles) // 64))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384, help="square synthetic slide side (px)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--block-cells", type=int, default=24)
    ap.add_argument("--per-patch-sample", type=int, default=1000)
    ap.add_argument("--slides-dir", default="bench/results/slides")
    ap.add_argument("--json", default="bench/results/patch_delivery.json")
    args = ap.parse_args()
    folder = Path(args.slides_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = bench_slide(folder, args.size)
    geo = PatchGeometry(448, 112)
    with Slide(path) as s:
        width, height = s.dimensions
        grid = make_grid(width, height, geo, detect_tissue(s))
    tiles = tissue_tiles(grid, width, height)
    sample = grid.coords[: args.per_patch_sample]
    print(f"slide {width} x {height}: {len(grid)} tissue patches, {len(tiles)} tissue tiles", flush=True)
    runs = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        n = run_pipeline(path, grid, args.workers, args.batch_size, args.block_cells)
        t_pipe = time.perf_counter() - t0
        assert n == len(grid)
        t0 = time.perf_counter()
        n = run_pipeline(path, grid, args.workers, args.batch_size, args.block_cells, batches=False)
        t_regions = time.perf_counter() - t0
        assert n == len(grid)
        t0 = time.perf_counter()
        run_per_patch(path, sample, args.workers, args.batch_size, geo.patch_size)
        t_patch = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_decode_once(path, tiles, args.workers)
        t_decode = time.perf_counter() - t0
        run = {"pipeline_s": t_pipe, "pipeline_pps": len(grid) / t_pipe, "regions_s": t_regions,
               "regions_pps": len(grid) / t_regions, "per_patch_s": t_patch,
               "per_patch_pps": len(sample) / t_patch, "decode_once_s": t_decode,
               "decode_once_pps": len(grid) / t_decode}
        runs.append(run)
        print(f"repeat {r + 1}: pipeline batches {run['pipeline_pps']:.0f} patches/s, regions "
              f"{run['regions_pps']:.0f}, per-patch {run['per_patch_pps']:.0f}, decode-once "
              f"{run['decode_once_pps']:.0f}", flush=True)
    med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}

    def ratio(a: str, b: str) -> float:
        return float(statistics.median(run[a] / run[b] for run in runs))

    rows = [["pipeline -> host batches (B, 448, 448, 3) (CPU path)", med["pipeline_pps"],
             ratio("pipeline_pps", "per_patch_pps"), ratio("pipeline_pps", "decode_once_pps")],
            ["pipeline -> block regions, cut on the device (GPU path)", med["regions_pps"],
             ratio("regions_pps", "per_patch_pps"), ratio("regions_pps", "decode_once_pps")],
            ["per-patch read_region, same threads (CLAM/ZEUS)", med["per_patch_pps"], 1.0,
             ratio("per_patch_pps", "decode_once_pps")],
            ["decode every tissue tile once", med["decode_once_pps"], ratio("decode_once_pps", "per_patch_pps"), 1.0]]
    print(table(rows, ["delivery", "patches/s", "x per-patch", "x decode-once"]))
    for label, key in (("host batches", "pipeline_pps"), ("device regions", "regions_pps")):
        rp, rd = ratio(key, "per_patch_pps"), ratio(key, "decode_once_pps")
        print(f"{label}: {rp:.1f}x per-patch (target >= 10x: {'holds' if rp >= 10 else 'misses'}), "
              f"{100 * rd:.0f} % of decode-once (target >= 50 %: {'holds' if rd >= 0.5 else 'misses'})")
    ratio_patch, ratio_decode = ratio("pipeline_pps", "per_patch_pps"), ratio("pipeline_pps", "decode_once_pps")
    write_json(args.json, {"benchmark": "patch_delivery", "machine": machine(), "slide": [width, height],
                           "patches": len(grid), "tissue_tiles": int(len(tiles)), "workers": args.workers,
                           "batch_size": args.batch_size, "block_cells": args.block_cells,
                           "per_patch_sample": len(sample), "runs": runs, "median": med,
                           "ratio_vs_per_patch": ratio_patch, "ratio_vs_decode_once": ratio_decode,
                           "regions_ratio_vs_per_patch": ratio("regions_pps", "per_patch_pps"),
                           "regions_ratio_vs_decode_once": ratio("regions_pps", "decode_once_pps")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
