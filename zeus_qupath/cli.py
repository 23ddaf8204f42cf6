"""The ``zeus`` command line: parses arguments and wires the modules together, nothing more."""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .console import configure_console, os_error_line
from .errors import ZeusError, one_line
from .output_set import OutputSet, writable_dir
from .params import (
    DEFAULT_MODEL,
    DEFAULT_PATCH_SIZE,
    DEFAULT_STRIDE,
    DEFAULT_THRESHOLD,
    DEFAULT_TISSUE_RULE,
    TISSUE_RULES,
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus a hint), like every other error of ``zeus``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


MAX_PX = 1 << 31  # level-0 pixel sizes and positions: nothing a slide reader can open is larger


def _number(kind: type, low: float, high: float, low_open: bool = False, what: str = "") -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` (int or float) in [low, high] (or (low, high] with ``low_open``)."""
    left = "(" if low_open else "["

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"must be {what or 'a number'} in {left}{low:g}, {high:g}], got {text!r}")
        return value

    return parse


_positive_float = _number(float, 0.0, 1e9, low_open=True, what="a positive number")
_positive_int = _number(int, 1, MAX_PX, what="a positive integer")
_patch_px = _number(int, 1, 16384, what="a patch size in px")
_area = _number(float, 0.0, 1e18, what="an area (>= 0)")
_tolerance = _number(float, 0.0, 1e6, what="a tolerance in px (>= 0)")
_mpp = _number(float, 0.0, 1000.0, low_open=True, what="a pixel size in um/px")
_port = _number(int, 0, 65535, what="a TCP port")
_batch = _number(int, 1, 65536, what="a batch size")
_level0_px = _number(int, 1, 1 << 20, what="a size in level-0 px")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected W,H, got {text!r}") from None
    if not (0 < w <= MAX_PX and 0 < h <= MAX_PX):
        raise argparse.ArgumentTypeError(f"W and H must be positive pixel counts up to {MAX_PX}, got {text!r}")
    return w, h


def _add_polygon_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", default=DEFAULT_THRESHOLD, help="zeus (default: ZEUS's blur rule), argmax, or prob:P")
    p.add_argument("--min-area", type=_area, default=0.0, metavar="UM2",
                   help="drop regions smaller than this (um^2; px^2 when the pixel size is unknown)")
    p.add_argument("--min-hole-area", type=_area, default=0.0, metavar="UM2", help="fill holes smaller than this")
    p.add_argument("--tolerance", type=_tolerance, default=None, metavar="PX",
                   help="outline simplification tolerance in level-0 px (default: 2, or half a mask pixel if larger)")


def _add_patch_options(p: argparse.ArgumentParser) -> None:
    """The patch, tissue and model-run options ``zeus segment`` and ``zeus serve`` share: one definition each,
    one validator, the defaults in ``--help``."""
    p.add_argument("--patch-size", type=_patch_px, default=DEFAULT_PATCH_SIZE, metavar="PX",
                   help=f"patch side in px at the cutting resolution (default: {DEFAULT_PATCH_SIZE}, as ZEUS)")
    p.add_argument("--stride", type=_patch_px, default=DEFAULT_STRIDE, metavar="PX",
                   help=f"step between patches in px (default: {DEFAULT_STRIDE}, as ZEUS)")
    p.add_argument("--target-mpp", type=_mpp, default=None, metavar="UM_PER_PX",
                   help="cut patches at this pixel size (um/px); default: level 0 as ZEUS does")
    p.add_argument("--tissue", choices=TISSUE_RULES, default=DEFAULT_TISSUE_RULE,
                   help="tissue and patch rule: zeus (default; CLAM's contours, per-contour grids, four-point test, "
                        "white/black filters, as ZEUS) or coarse (earlier versions' rule: every patch touching a "
                        "coarse tissue mask; finds tissue in small crops where CLAM's area filter finds none)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (default: auto, CUDA when available, else the CPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="model arithmetic (default: auto, fp32 everywhere; bf16/fp16 only on CUDA, when asked)")
    p.add_argument("--batch-size", type=_batch, default=64, help="patches per model call (default: 64)")


def _add_sampling_option(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--sampling", choices=("exact", "adaptive"), default="exact",
                   help="which grid patches are embedded: exact (default; every one, as ZEUS) or adaptive (a coarse "
                        "lattice, then only patches that could change the mask; see the README's Adaptive sampling)"
                        + what)


def _add_tiles_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiles", action="store_true",
                   help="also write <stem>.tiles.geojson: each patch's class scores as QuPath tile detections "
                        "(Measure > Show measurement maps shows the ZEUS heatmap)")


def _segment_params(args: argparse.Namespace):
    from .params import SegmentParams, Threshold

    return SegmentParams(
        patch_size=args.patch_size, stride=args.stride, target_mpp=args.target_mpp, mpp=args.mpp,
        batch_size=args.batch_size, workers=args.workers, threshold=Threshold.parse(args.threshold),
        min_area_um2=args.min_area, min_hole_area_um2=args.min_hole_area, tolerance_px=args.tolerance,
        detect_tissue=not args.no_tissue, tissue=args.tissue, heatmap_tiles=args.tiles,
        sampling=getattr(args, "sampling", "exact"),
    )


def cmd_segment(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle model threads must not spin on the readers' cores
    from .prompts import prompt_file
    from .runs.run import RunConfig, run_segment
    from .screening import parse_screening

    if not args.slides and not args.manifest:
        raise ZeusError("no slides given: name slide files, folders or patterns, or pass --manifest FILE")
    if args.workers is None:  # a GPU needs many decoding threads; on the CPU the model needs the cores
        from .models.base import resolve_device

        gpu = args.executor == "local" and resolve_device(args.device).type == "cuda"
        args.workers = max(2, min(16, (os.cpu_count() or 2) - 2)) if gpu else 2
    config = RunConfig(
        slides=tuple(args.slides), prompts=str(prompt_file(args.prompts)), out_dir=args.out, model=args.model,
        pretrained=args.pretrained, positive_class=args.positive_class, device=args.device,
        precision=args.precision, params=_segment_params(args), progress=not args.quiet,
        manifest=args.manifest, cache_dir=args.cache, use_cache=not args.no_cache, resume=not args.redo,
        skip_errors=args.skip_errors, executor=args.executor, ray_address=args.ray_address, prefetch=args.prefetch,
        screening_k=parse_screening(args.prompt_screening), random_weights=args.random_weights,
        adapter=args.adapter,
    )
    report = run_segment(config)
    if args.project and report.slides:
        from .bridge.publish import publish_outputs

        print(publish_outputs(args.project, [args.out], backend=args.backend, uri_map=args.uri_map).summary())
    for r in report.done:
        for w in r.warnings:
            print(f"zeus: warning: {w}", file=sys.stderr)
    print(report.summary())
    print(f"run summary: {report.path}")
    if report.failures:
        print(f"zeus: {len(report.failures)} slide(s) failed (see the table above and {report.path})", file=sys.stderr)
        return 1
    return 0


def cmd_polygons(args: argparse.Namespace) -> int:
    from .heatmap import write_tiles
    from .outputs import TILES_SUFFIX, PatchScores
    from .params import SegmentParams, Threshold
    from .qupath_geojson import write_geojson
    from .segment import geojson_from_scores

    scores = PatchScores.load(args.scores)
    params = SegmentParams(min_area_um2=args.min_area, min_hole_area_um2=args.min_hole_area,
                           tolerance_px=args.tolerance)
    collection = geojson_from_scores(scores, Threshold.parse(args.threshold), params)
    out = args.out or str(Path(args.scores).with_suffix("").with_suffix("")) + ".geojson"
    tiles = out.removesuffix(".geojson") + TILES_SUFFIX
    with OutputSet(Path(out).parent) as staged:  # the GeoJSON and its tiles appear together, or neither
        if args.tiles:
            n_tiles = write_tiles(staged.path(Path(tiles).name), scores)
        write_geojson(staged.path(Path(out).name), collection)
    print(f"{len(collection['features'])} regions -> {out}")
    if args.tiles:
        print(f"{n_tiles} tiles -> {tiles}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    scores = evaluate(args.pred, args.gt, tissue=args.tissue, slide=args.slide, size=args.size,
                      class_name=args.class_name)
    print(json.dumps(scores.to_dict(), indent=2))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .features import score_features
    from .models import load_encoder
    from .outputs import output_stem
    from .prompts import load_prompts, prompt_file
    from .qupath_geojson import write_geojson
    from .reconstruct import Threshold
    from .screening import parse_screening
    from .segment import SegmentParams, geojson_from_scores

    screening_k = parse_screening(args.prompt_screening)
    threshold = Threshold.parse(args.threshold)
    prompts = load_prompts(prompt_file(args.prompts), args.positive_class)
    out = writable_dir(args.out, "--out")
    adapter = _load_adapter(args.adapter, screening_k)
    encoder = load_encoder(args.model, args.pretrained, args.device, random_weights=args.random_weights)
    if adapter is not None:
        from .identity import model_identity

        ident = model_identity(args.model, args.pretrained, encoder)
        applied = {**adapter.header["identity"], "model_digest": ident.digest, "prompts_sha256": prompts.sha256,
                   "classes": prompts.class_names, "positive_class": prompts.positive_class}
        adapter.check(applied, f"adapter {Path(args.adapter).name}")  # precision and tissue: the features' maker's
    scores = score_features(args.features, encoder, prompts, patch_size=args.patch_size, stride=args.stride,
                            width=args.width, height=args.height, mpp=args.mpp, screening_k=screening_k,
                            adapter=adapter)
    if adapter is not None:
        geometry = adapter.header["identity"]["geometry"]
        if (scores.patch_size, scores.stride) != (geometry["patch_size"], geometry["stride"]):
            raise ZeusError(f"adapter {Path(args.adapter).name} was learned on {geometry['patch_size']} px patches "
                            f"at stride {geometry['stride']}, the features are {scores.patch_size} / {scores.stride}")
    for warning in scores.meta.get("warnings", []):
        print(f"zeus: warning: {warning}", file=sys.stderr)
    stem = output_stem(Path(args.features).name.removesuffix(".h5").removesuffix(".hdf5"))
    params = SegmentParams(min_area_um2=args.min_area, min_hole_area_um2=args.min_hole_area,
                           tolerance_px=args.tolerance)
    collection = geojson_from_scores(scores, threshold, params)
    with OutputSet(out) as staged:  # both files, or neither
        scores.save(staged.path(f"{stem}.scores.npz"))
        write_geojson(staged.path(f"{stem}.geojson"), collection)
    print(f"{len(scores.coords)} patches, {len(collection['features'])} regions -> {out / (stem + '.geojson')}")
    return 0


def _load_adapter(path: str | None, screening_k: int | None):
    """The adapter file, checked (one line, exit 2, when damaged), before any model is loaded."""
    if path is None:
        return None
    from .adapter import Adapter

    if screening_k is not None:
        raise ZeusError("--adapter and --prompt-screening do not go together (the adapter replaces the prompt scores)")
    return Adapter.load(path)


def _class_map(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        src, sep, dst = item.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise ZeusError(f"--map expects ANNOTATOR_CLASS=PROMPT_CLASS (or =negative), got {item!r}")
        out[src.strip()] = dst.strip()
    return out


def cmd_learn(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .bridge.corrections import read_corrections
    from .learn import LearnConfig, format_table, learn_from_corrections
    from .prompts import load_prompts, prompt_file

    slides = _class_map(args.slide) if args.slide else {}
    positive = load_prompts(prompt_file(args.prompts), args.positive_class).positive_class
    images, notes = read_corrections(args.source, originals=args.originals, slides=slides, images=args.images,
                                     backend=args.backend, positive_class=positive)
    for note in notes:
        print(f"zeus: {note}", file=sys.stderr)
    cache = args.cache
    if cache is None and args.originals and (Path(args.originals) / ".cache").is_dir():
        cache = str(Path(args.originals) / ".cache")  # zeus segment's default cache of that output folder
    if cache is None:
        print("zeus: note: no --cache: every slide is embedded now and not kept (give zeus segment's cache folder "
              "to reuse its embeddings)", file=sys.stderr)
    config = LearnConfig(out=args.out, model=args.model, pretrained=args.pretrained,
                         random_weights=args.random_weights, prompts=str(prompt_file(args.prompts)),
                         positive_class=args.positive_class, device=args.device, precision=args.precision,
                         params=_segment_params(args), cache_dir=cache, class_map=_class_map(args.map),
                         force=args.force)
    result = learn_from_corrections(images, config)
    print(format_table(result.cv))
    if result.written:
        extra = "" if result.cv.better else " (--force: cross-validation did not find it better than zero-shot)"
        print(f"adapter -> {args.out}{extra}")
        print(f"apply it: zeus segment SLIDES --adapter {args.out} (same --model, --prompts and patch options)")
        return 0
    print(f"zeus: the adapter is not better than zero-shot in cross-validation (mean held-out Dice "
          f"{result.cv.mean(result.cv.best):.3f} vs {result.cv.zero_shot_mean:.3f}); not written "
          "(--force writes it anyway)", file=sys.stderr)
    return 1


def cmd_project_add(args: argparse.Namespace) -> int:
    from .bridge.publish import publish_outputs

    print(publish_outputs(args.project, args.outputs, backend=args.backend, uri_map=args.uri_map).summary())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .bridge.export import export_corrections
    from .bridge.export_report import format_table

    if args.downsample is not None and args.mpp is not None:
        raise ZeusError("give --downsample or --mpp, not both")
    report = export_corrections(args.source, args.out, downsample=args.downsample, mpp=args.mpp,
                                classes=args.classes, backend=args.backend, originals=args.originals,
                                positive_class=args.positive_class)
    print(format_table(report))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import PRESETS
    from .models.availability import check_model, model_status

    if args.check:
        print(json.dumps(check_model(args.check, pretrained=args.pretrained, device=args.device), indent=2))
        return 0
    rows = [("preset", "code", "weights", "licence", "weights looked for in")]
    notes = []
    for name in sorted(PRESETS, key=lambda n: n != DEFAULT_MODEL):  # the default first, then the table's order
        preset = PRESETS[name]
        st = model_status(name)
        rows.append((name + (" (default)" if name == DEFAULT_MODEL else ""),
                     "yes" if st.code_available else "no", "yes" if st.weights_available else "no",
                     preset.license, str(st.weights_location)))
        if not st.code_available:
            notes.append(f"{name}: {st.code_detail}")
        if not st.weights_available and preset.hf_repo:
            login = " (gated: accept its terms on the Hub page, then `hf auth login`)" if preset.gated else ""
            notes.append(f"{name}: get the weights with `hf download {preset.hf_repo}`{login}, "
                         f"or pass --pretrained with a local copy")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    for note in notes:
        print(note)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .bridge.service import ServiceConfig, serve
    from .params import SegmentParams, Threshold
    from .prompts import DEFAULT_PROMPT_SET

    params = SegmentParams(threshold=Threshold.parse(args.threshold), batch_size=args.batch_size,
                           patch_size=args.patch_size, stride=args.stride, target_mpp=args.target_mpp,
                           tissue=args.tissue, sampling=args.sampling)
    serve(ServiceConfig(host=args.host, port=args.port, token_env=args.token_env, roots=tuple(args.root or ()),
                        model=args.model, pretrained=args.pretrained, prompts=args.prompts or DEFAULT_PROMPT_SET,
                        device=args.device,
                        precision=args.precision, params=params, cache_dir=args.cache,
                        allowed_hosts=tuple(args.allowed_host), allow_origins=tuple(args.allow_origin),
                        max_models=args.max_models, max_patches=args.max_patches,
                        max_region_vertices=args.max_region_vertices, adapter=args.adapter))
    return 0


def _add_project_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "paquo", "files"],
                   help="paquo (needs a QuPath install) or files (QuPath-free); auto picks paquo when QuPath is found")
    p.add_argument("--uri-map", action="append", default=[], metavar="SRC=DST",
                   help="rewrite slide paths for the annotators' machines, e.g. /data/slides=Z:\\slides (repeatable)")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, progress=not args.quiet, cache_dir=args.cache)
    r = result.run.slides[0]
    print(f"demo slide {result.slide}: {r.width}x{r.height} px, {r.patches} patches in {r.seconds['embed']:.1f} s "
          f"({r.patches_per_s:.0f} patches/s on {result.run.config['model']['device']}), {r.regions} regions")
    print(f"Dice vs the known tumor mask (inside tissue): {result.dice.dice:.3f} "
          f"(precision {result.dice.precision:.3f}, recall {result.dice.recall:.3f})")
    print(f"outputs: {r.outputs['geojson']}, {r.outputs['overlay']}, {r.outputs['scores']}, {result.run.path}")
    print("Drag the .geojson onto the slide in QuPath to see the outlines.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="zeus", description="Zero-shot tumor pre-segmentation of whole-slide images (ZEUS) for QuPath.")
    parser.add_argument("--version", action="version", version=f"zeus-qupath {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and other libraries' log messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("segment", help="segment slides into QuPath GeoJSON, scores and overlays")
    p.add_argument("slides", nargs="*", metavar="SLIDE",
                   help="slide files, folders of slides, or glob patterns (quote them, e.g. 'data/**/*.svs')")
    p.add_argument("--manifest", default=None, metavar="CSV",
                   help="CSV of slides with columns slide[,mpp] (paths relative to the CSV's folder)")
    p.add_argument("--prompts", default=None, metavar="FILE_OR_SET",
                   help="prompt file (ZEUS template JSON) or a bundled set's name "
                        "(default: zeus_spindle_cell, ZEUS's published prompts)")
    p.add_argument("--positive-class", default=None, help="class to outline (default: from the prompt file)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"preset name (default: {DEFAULT_MODEL}) or open_clip:NAME_OR_CONFIG_JSON; "
                        "several joined by commas average their scores")
    p.add_argument("--pretrained", default=None,
                   help="open_clip tag or checkpoint file; a preset's weights folder (comma-separated, one per model)")
    p.add_argument("--random-weights", action="store_true",
                   help="run open_clip models given no --pretrained with seeded random weights, on purpose (tests)")
    p.add_argument("--out", default="zeus-out", help="output folder (default: zeus-out)")
    _add_patch_options(p)
    p.add_argument("--mpp", type=_mpp, default=None, help="override the slide's pixel size (um/px)")
    p.add_argument("--workers", type=_number(int, 1, 256, what="a thread count"), default=None,
                   help="slide-reading threads (default: 2 on the CPU; with a GPU, the cores less two, at most 16)")
    p.add_argument("--prefetch", type=_number(int, 0, 1024, what="a region count"), default=2, metavar="N",
                   help="decoded regions read ahead beyond one per worker (bounds memory; default 2)")
    p.add_argument("--no-tissue", action="store_true", help="embed every patch, not only those touching tissue")
    _add_sampling_option(p)
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="patch embedding cache (default: OUT/.cache); a rerun with other prompts only re-scores")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    p.add_argument("--redo", action="store_true",
                   help="segment every slide again, even those done before with the same parameters")
    p.add_argument("--skip-errors", action="store_true",
                   help="continue past a slide that fails (the run still exits non-zero and lists it)")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="run slides in this process (default) or as Ray tasks (needs: pip install ray)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to use (default: start a local one on the loopback interface)")
    p.add_argument("--prompt-screening", default=None, metavar="top-K",
                   help="KEEP's prompt screening per slide (off by default: every prompt, as ZEUS)")
    p.add_argument("--adapter", default=None, metavar="FILE",
                   help="score with an adapter zeus learn wrote (learned from corrected slides; same model, "
                        "precision, patch geometry, tissue rule and prompts, else refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--project", default=None, metavar="DIR", help="also add the results to this QuPath project")
    _add_project_options(p)
    _add_polygon_options(p)
    _add_tiles_option(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("polygons", help="re-threshold a scores file into GeoJSON (no model, no GPU)")
    p.add_argument("scores", metavar="SCORES.npz")
    p.add_argument("--out", default=None, metavar="FILE.geojson")
    _add_polygon_options(p)
    _add_tiles_option(p)
    p.set_defaults(func=cmd_polygons)

    p = sub.add_parser("score", help="scores and GeoJSON from patch features computed elsewhere (CLAM/Trident HDF5)")
    p.add_argument("features", metavar="FEATURES.h5", help="HDF5 with coords (N, 2) and features (N, D)")
    p.add_argument("--model", required=True, help="the model whose text-aligned space the features are in")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--random-weights", action="store_true", help="as in zeus segment (tests only)")
    p.add_argument("--prompts", default=None, metavar="FILE_OR_SET",
                   help="prompt file or a bundled set's name (default: zeus_spindle_cell, ZEUS's published prompts)")
    p.add_argument("--positive-class", default=None)
    p.add_argument("--out", default="zeus-out")
    p.add_argument("--patch-size", type=_level0_px, default=None, help="level-0 px (default: from the file)")
    p.add_argument("--stride", type=_level0_px, default=None, help="level-0 px (default: from the coordinates)")
    p.add_argument("--width", type=_positive_int, default=None)
    p.add_argument("--height", type=_positive_int, default=None)
    p.add_argument("--mpp", type=_mpp, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--prompt-screening", default=None, metavar="top-K", help="KEEP's prompt screening (off by default)")
    p.add_argument("--adapter", default=None, metavar="FILE", help="score with an adapter zeus learn wrote")
    _add_polygon_options(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", help="Dice, precision and recall inside tissue (JSON)")
    p.add_argument("pred", metavar="PRED", help="GeoJSON or mask image (PNG/TIFF/NPY)")
    p.add_argument("gt", metavar="GT", help="GeoJSON or mask image (PNG/TIFF/NPY)")
    p.add_argument("--tissue", default=None, metavar="MASK_OR_SLIDE", help="tissue mask (PNG/NPY) or the slide")
    p.add_argument("--slide", default=None, help="the slide (for its size, when GeoJSON is compared)")
    p.add_argument("--size", type=_size, default=None, metavar="W,H", help="level-0 size instead of --slide")
    p.add_argument("--class", dest="class_name", default=None, help="only annotations of this class (GeoJSON)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("project", help="QuPath projects")
    psub = p.add_subparsers(dest="project_command", required=True, metavar="ACTION")
    pa = psub.add_parser("add", help="add results computed earlier to a QuPath project (creates it if needed)")
    pa.add_argument("project", metavar="DIR", help="QuPath project folder")
    pa.add_argument("outputs", nargs="+", metavar="OUTPUT_DIR_OR_GEOJSON", help="zeus segment output folders or files")
    _add_project_options(pa)
    pa.set_defaults(func=cmd_project_add)

    p = sub.add_parser("export", help="export corrected annotations as training data, with a corrections table")
    p.add_argument("source", metavar="PROJECT_OR_DIR", help="QuPath project, or a folder of QuPath-exported GeoJSON")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--downsample", type=_positive_float, default=None, help="label mask downsample (default 16)")
    p.add_argument("--mpp", type=_mpp, default=None, help="label mask pixel size (um/px) instead")
    p.add_argument("--classes", nargs="+", default=None, help="classes to export, in label order (1, 2, ...)")
    p.add_argument("--originals", default=None, metavar="DIR", help="ZEUS output folder (for a plain folder source)")
    p.add_argument("--positive-class", default=None, help="class compared with ZEUS's outline (default: Tumor)")
    p.add_argument("--backend", default="auto", choices=["auto", "paquo", "files"])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("learn", help="learn an adapter from corrected slides (cross-validated; zeus segment --adapter)")
    p.add_argument("source", metavar="PROJECT_OR_DIR",
                   help="QuPath project, or a folder of QuPath-exported GeoJSON named after their images")
    p.add_argument("--out", required=True, metavar="ADAPTER.npz", help="the adapter file to write")
    p.add_argument("--images", nargs="+", default=None, metavar="NAME",
                   help="learn from these images (default: those an annotator changed after ZEUS's import)")
    p.add_argument("--slide", action="append", default=[], metavar="NAME=PATH",
                   help="the slide file of an image (default: the project entry's URI, or --originals' run.json)")
    p.add_argument("--originals", default=None, metavar="DIR", help="ZEUS output folder (for a plain folder source)")
    p.add_argument("--map", action="append", default=[], metavar="CLASS=PROMPT_CLASS",
                   help="label an annotator class as a prompt class (or =negative); other classes the prompts "
                        "lack are negative, Ignore* is left out (repeatable)")
    p.add_argument("--force", action="store_true", help="write the adapter even if cross-validation finds it no better")
    p.add_argument("--backend", default="auto", choices=["auto", "paquo", "files"])
    p.add_argument("--prompts", default=None, metavar="FILE_OR_SET", help="as in zeus segment")
    p.add_argument("--positive-class", default=None)
    p.add_argument("--model", default=DEFAULT_MODEL, help="as in zeus segment (one model)")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--random-weights", action="store_true", help="as in zeus segment (tests only)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--patch-size", type=_patch_px, default=DEFAULT_PATCH_SIZE)
    p.add_argument("--stride", type=_patch_px, default=DEFAULT_STRIDE)
    p.add_argument("--target-mpp", type=_mpp, default=None)
    p.add_argument("--mpp", type=_mpp, default=None)
    p.add_argument("--no-tissue", action="store_true")
    p.add_argument("--tissue", choices=TISSUE_RULES, default=DEFAULT_TISSUE_RULE)
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="the embedding cache zeus segment filled (its --cache, or OUT/.cache; default: --originals' "
                        ".cache); uncached slides are embedded once and stored there")
    p.add_argument("--batch-size", type=_batch, default=64)
    p.add_argument("--workers", type=_number(int, 1, 256, what="a thread count"), default=2)
    p.add_argument("--threshold", default=DEFAULT_THRESHOLD,
                   help="the mask rule the Dice is computed with (as zeus segment)")
    p.set_defaults(func=cmd_learn, min_area=0.0, min_hole_area=0.0, tolerance=None, tiles=False)

    p = sub.add_parser("serve", help="local HTTP service for the QuPath scripts (loopback, token, allowed roots)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=_port, default=8765)
    p.add_argument("--root", action="append", metavar="DIR",
                   help="folder whose slides may be segmented (repeatable; required)")
    p.add_argument("--token-env", default="ZEUS_TOKEN",
                   help="environment variable holding the token (default ZEUS_TOKEN); generated and printed if unset")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"preset name (default: {DEFAULT_MODEL}) or open_clip:...")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--prompts", default=None, metavar="FILE_OR_SET",
                   help="bundled prompt set name or a prompt file "
                        "(default: zeus_spindle_cell, ZEUS's published prompts)")
    p.add_argument("--threshold", default=DEFAULT_THRESHOLD, help="default threshold (zeus, argmax, prob:P)")
    _add_patch_options(p)  # the same options, defaults and limits as zeus segment
    _add_sampling_option(p, "; for requests that name none (a request's \"sampling\" overrides it)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="embedding cache folder shared with zeus segment --cache DIR (or a zeus segment --out "
                        "folder: its .cache); default: memory only")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests addressed to this host name (besides loopback names; repeatable)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from this origin call the service, e.g. http://lab:8080 (repeatable)")
    p.add_argument("--max-models", type=_positive_int, default=2, help="models kept loaded (least recently used go)")
    p.add_argument("--max-patches", type=_positive_int, default=1_000_000, help="patches one request may score")
    p.add_argument("--max-region-vertices", type=_positive_int, default=10_000, help="vertices of a request's region")
    p.add_argument("--adapter", default=None, metavar="FILE",
                   help="zeus learn's adapter for requests that name none (a request may name another under a "
                        "--root, or \"none\")")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("models", help="list model presets and whether their code and weights are here")
    p.add_argument("--check", default=None, metavar="NAME", help="load NAME and embed one synthetic patch and prompt")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="segment a synthetic slide with a tiny offline model and score it")
    p.add_argument("--out", default="zeus-demo", help="output folder (default: zeus-demo)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="where the tiny model is kept (default: OUT/tiny-model)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    _add_debug_option(sub)
    return parser


def _add_debug_option(sub: argparse._SubParsersAction) -> None:
    """``--debug`` after the command too (``zeus segment ... --debug``), on every command and action."""
    for command in sub.choices.values():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        for action in nested:
            _add_debug_option(action)
        if not nested:
            command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help="show tracebacks and other libraries' log messages")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_console(args.debug)
    try:
        return int(args.func(args) or 0)
    except ZeusError as exc:
        if args.debug:  # the traceback too, and the same exit status as without --debug
            traceback.print_exc()
        print(f"zeus: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable folder, a full disk, a file that vanished: the environment's, not a bug
        if args.debug:  # the traceback too, and the same exit status as without --debug
            traceback.print_exc()
        print(f"zeus: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zeus: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        hint = " (try a smaller --batch-size)" if args.command in ("segment", "serve") else ""
        print(f"zeus: error: out of memory{hint}", file=sys.stderr)
        return 1
    except RecursionError:
        if args.debug:  # the traceback too, and the same exit status as without --debug
            traceback.print_exc()
        print("zeus: error: an input file is nested too deeply", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        if args.debug:  # the traceback too, and the same exit status as without --debug
            traceback.print_exc()
        print(f"zeus: internal error: {type(exc).__name__}: {one_line(str(exc))} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
