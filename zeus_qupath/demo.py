"""``zeus demo``: a synthetic slide, a tiny open_clip model fitted offline on other synthetic slides, a full
segmentation run, and Dice against the slide's known tumor mask.

The tiny model only exists to run the real open_clip code path without downloaded weights; real slides
need a real pathology model (see the README's model table).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .evaluate import Scores, evaluate
from .params import SegmentParams
from .runs.run import RunConfig, RunReport, run_segment

DEMO_SEED = 7  # the tiny model trains on other seeds, never on the demo slide
DEMO_SIZE = (6144, 4096)


@dataclass(frozen=True)
class DemoResult:
    run: RunReport
    dice: Scores
    slide: str
    tumor_mask: str


def run_demo(out_dir: str | Path, *, progress: bool = True, cache_dir: str | Path | None = None,
             size: tuple[int, int] = DEMO_SIZE, batch_size: int = 64) -> DemoResult:
    from .samples import prompt_path
    from .samples.synthetic import make_synthetic_slide
    from .samples.tiny_model import load_or_train_tiny_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompt_path("spindle_cell")
    tiny = load_or_train_tiny_model(Path(cache_dir) if cache_dir else out / "tiny-model", prompts)
    slide = make_synthetic_slide(out / "demo_slide.tif", size[0], size[1], seed=DEMO_SEED)
    config = RunConfig(
        slides=(str(slide.path),),
        prompts=str(prompts),
        out_dir=str(out),
        model=f"open_clip:{tiny.config_path}",
        pretrained=str(tiny.checkpoint_path),
        device="cpu",
        params=SegmentParams(batch_size=batch_size),
        progress=progress,
    )
    report = run_segment(config)
    geojson = report.slides[0].outputs["geojson"]
    dice = evaluate(geojson, slide.tumor_mask_path, tissue=slide.tissue_mask_path, slide=slide.path)
    return DemoResult(report, dice, str(slide.path), str(slide.tumor_mask_path))
