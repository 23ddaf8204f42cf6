"""Tests of the offline sample material: prompt files, synthetic slides, the tiny open_clip model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tiffslide
from PIL import Image
from scipy import ndimage

from zeus_qupath.errors import PromptError, ZeusError
from zeus_qupath.samples import PROMPTS_DIR, prompt_path
from zeus_qupath.samples.synthetic import (
    BACKGROUND,
    NORMAL,
    TUMOR,
    label_map,
    make_synthetic_slide,
    read_label_map,
)
from zeus_qupath.samples.tiny_model import (
    TINY_MODEL_NAME,
    TRAIN_SEED_OFFSET,
    labelled_patches,
    load_or_train_tiny_model,
    load_tiny_model,
    read_prompt_classes,
    tiny_model_config,
    zero_shot_accuracy,
)

DEMO_SEED = 1  # evaluation slide; the tiny model trains on seed TRAIN_SEED_OFFSET + 0


def _child_env() -> dict[str, str]:
    """Environment for a child Python that imports this checkout the same way the tests do."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


@pytest.fixture(scope="session")
def demo_slide(tmp_path_factory: pytest.TempPathFactory):
    return make_synthetic_slide(tmp_path_factory.mktemp("slide") / "demo.tif", seed=DEMO_SEED)


@pytest.fixture(scope="session")
def demo_level0(demo_slide) -> np.ndarray:
    with tiffslide.TiffSlide(demo_slide.path) as ts:
        return np.asarray(ts.read_region((0, 0), 0, ts.dimensions).convert("RGB"))


@pytest.fixture(scope="session")
def tiny(tiny_model):
    return tiny_model  # the session's shared tiny model (tests/conftest.py), trained once


def _cell_colour_class(img: np.ndarray, ds: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of each ds x ds cell and a plain colour rule: grey -> 0, pink -> 1, purple -> 2."""
    h, w = img.shape[0] // ds, img.shape[1] // ds
    cells = img[: h * ds, : w * ds].astype(np.float32).reshape(h, ds, w, ds, 3).mean(axis=(1, 3))
    sat = (cells.max(-1) - cells.min(-1)) / cells.max(-1)
    purple = cells[..., 2] - cells[..., 0]  # blue minus red: haematoxylin vs eosin
    return cells, np.where(sat < 0.05, BACKGROUND, np.where(purple > 0, TUMOR, NORMAL))


# --------------------------------------------------------------------------- prompt files


def test_prompt_files_follow_the_zeus_template_format():
    files = sorted(PROMPTS_DIR.glob("*.json"))
    assert {f.stem for f in files} >= {"spindle_cell", "cutaneous_metastasis"}
    for f in files:
        entry = json.loads(f.read_text(encoding="utf-8"))["0"]
        assert set(entry["classnames"]) == {"normal", "tumor"}
        assert entry.get("positive_class", "tumor") == "tumor"  # ZEUS's own file names none: tumor is guessed
        assert all("CLASSNAME" in t for t in entry["templates"])
        for names in entry["classnames"].values():
            assert len(names) == len(set(names)) and all(n.strip() for n in names)
        classes, texts, positive = read_prompt_classes(f)
        assert classes == ("normal", "tumor") and positive == "tumor"
        assert not any("CLASSNAME" in t for ts in texts.values() for t in ts)

    spindle = json.loads(prompt_path("spindle_cell").read_text(encoding="utf-8"))["0"]
    assert len(spindle["classnames"]["normal"]) == 7
    assert len(spindle["classnames"]["tumor"]) == 12
    assert len(spindle["templates"]) == 15
    _, texts, _ = read_prompt_classes(prompt_path("spindle_cell"))
    assert len(texts["normal"]) == 7 * 15 and len(texts["tumor"]) == 12 * 15


def test_bad_prompt_files_raise_prompt_error(tmp_path: Path):
    with pytest.raises(PromptError, match="not found"):
        read_prompt_classes(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for content in ("{", '{"1": {}}', '{"0": {"classnames": {"tumor": ["x"]}, "templates": ["CLASSNAME"]}}',
                    '{"0": {"classnames": {"normal": ["a"], "tumor": ["b"]}, "templates": []}}'):
        bad.write_text(content, encoding="utf-8")
        with pytest.raises(PromptError):
            read_prompt_classes(bad)
    with pytest.raises(FileNotFoundError):
        prompt_path("no_such_set")


# --------------------------------------------------------------------------- synthetic slides


def test_slide_opens_with_tiffslide_with_levels_and_mpp(demo_slide):
    assert (demo_slide.width, demo_slide.height, demo_slide.mpp) == (6144, 4096, 0.5)
    with tiffslide.TiffSlide(demo_slide.path) as ts:
        assert ts.dimensions == (6144, 4096)
        assert ts.level_dimensions == ((6144, 4096), (1536, 1024))
        assert ts.level_downsamples == pytest.approx((1.0, 4.0))
        assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
        assert float(ts.properties["tiffslide.mpp-y"]) == pytest.approx(0.5)
        assert ts.properties["tiffslide.level[0].tile-width"] == 256
        region = ts.read_region((1000, 1000), 0, (448, 448)).convert("RGB")
        assert region.size == (448, 448)


def test_pyramid_has_levels_down_to_under_2000_px(tmp_path: Path):
    s = make_synthetic_slide(tmp_path / "tall.tif", 9000, 2500, seed=2, mpp=0.25, tissue_fraction=0.2)
    with tiffslide.TiffSlide(s.path) as ts:
        dims = ts.level_dimensions
        assert dims == ((9000, 2500), (2250, 625), (563, 157))
        assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
        assert max(dims[-1]) < 2000 <= max(dims[-2])
    fixed = make_synthetic_slide(tmp_path / "one.tif", 2048, 1024, seed=2, levels=1)
    with tiffslide.TiffSlide(fixed.path) as ts:
        assert ts.level_count == 1


def test_mask_pngs_are_binary_nested_and_near_the_requested_fractions(demo_slide):
    ds = demo_slide.mask_downsample
    tumor = np.asarray(Image.open(demo_slide.tumor_mask_path))
    tissue = np.asarray(Image.open(demo_slide.tissue_mask_path))
    expected_shape = (math.ceil(demo_slide.height / ds), math.ceil(demo_slide.width / ds))
    assert tumor.shape == tissue.shape == expected_shape
    assert set(np.unique(tumor)) <= {0, 255} and set(np.unique(tissue)) <= {0, 255}
    assert not (tumor & ~tissue).any(), "tumor must lie inside the tissue"
    assert 0.3 < (tissue > 0).mean() < 0.55  # requested 0.45 of the slide
    assert 0.15 < (tumor > 0).sum() / (tissue > 0).sum() < 0.4  # requested 0.3 of the tissue
    labels = read_label_map(demo_slide)
    np.testing.assert_array_equal(labels, label_map(demo_slide.width, demo_slide.height, seed=DEMO_SEED))
    # tumor regions are large relative to a 448 px patch
    comp, n = ndimage.label(labels == TUMOR)
    assert n >= 1
    biggest = max(ndimage.find_objects(comp), key=lambda sl: (sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start))
    assert max(biggest[0].stop - biggest[0].start, biggest[1].stop - biggest[1].start) * ds >= 1500


def test_level0_pixels_follow_the_masks_cell_by_cell(demo_slide, demo_level0):
    """Every mask cell's colour says its class: the level-0 truth is the masks upsampled."""
    labels = read_label_map(demo_slide)
    cells, colour_class = _cell_colour_class(demo_level0, demo_slide.mask_downsample)
    assert colour_class.shape == labels.shape
    assert (colour_class == labels).mean() == 1.0
    mean = {c: cells[labels == c].mean(axis=0) for c in (BACKGROUND, NORMAL, TUMOR)}
    np.testing.assert_allclose(mean[BACKGROUND], 240.0, atol=2.0)
    r, g, b = mean[TUMOR]
    assert b > r and b > g, "tumor is purple/blue (haematoxylin)"
    assert mean[NORMAL][0] > mean[NORMAL][2] > mean[NORMAL][1], "normal stroma is pink (eosin)"
    assert mean[TUMOR].sum() < mean[NORMAL].sum() - 100, "tumor is darker than stroma"


def test_tumor_tiles_have_more_dark_nuclei_than_normal_tiles(demo_slide, demo_level0):
    labels = read_label_map(demo_slide)
    ds = demo_slide.mask_downsample
    pure = {c: ndimage.binary_erosion(labels == c, iterations=4) for c in (NORMAL, TUMOR)}
    dark = {}
    for c, mask in pure.items():
        ys, xs = np.nonzero(mask)
        picks = np.linspace(0, len(ys) - 1, 5).round().astype(int)
        fractions = []
        for i in picks:
            y, x = ys[i] * ds, xs[i] * ds
            tile = demo_level0[y : y + 128, x : x + 128].astype(np.float32)
            fractions.append((tile.mean(-1) < 120).mean())  # haematoxylin-dark pixels
        dark[c] = fractions
    assert min(dark[TUMOR]) > 0.2
    assert max(dark[NORMAL]) < 0.1


def test_background_is_low_saturation_for_tissue_detection(demo_slide):
    with tiffslide.TiffSlide(demo_slide.path) as ts:
        low = np.asarray(ts.read_region((0, 0), 1, ts.level_dimensions[1]).convert("HSV"))
    tissue = np.asarray(Image.open(demo_slide.tissue_mask_path)) > 0
    ds = demo_slide.mask_downsample // 4  # level 1 pixels per mask cell
    sat = low[..., 1][: tissue.shape[0] * ds, : tissue.shape[1] * ds]
    cell_sat = sat.reshape(tissue.shape[0], ds, tissue.shape[1], ds).mean(axis=(1, 3))
    away = ndimage.binary_erosion(~tissue, iterations=1, border_value=1)  # JPEG chroma bleeds ~1 cell at level 1
    assert np.median(cell_sat[~tissue]) < 2
    assert np.median(cell_sat[tissue]) > 25
    assert cell_sat[away].max() < 0.4 * np.percentile(cell_sat[tissue], 5)  # a clean gap for Otsu


def test_lower_level_looks_like_level0(demo_slide, demo_level0):
    labels = read_label_map(demo_slide)
    with tiffslide.TiffSlide(demo_slide.path) as ts:
        low = np.asarray(ts.read_region((0, 0), 1, ts.level_dimensions[1]).convert("RGB"))
    cells0, _ = _cell_colour_class(demo_level0, demo_slide.mask_downsample)
    cells1, cls1 = _cell_colour_class(low, demo_slide.mask_downsample // 4)
    assert (cls1 == labels).mean() > 0.99
    for c in (BACKGROUND, NORMAL, TUMOR):
        np.testing.assert_allclose(cells1[labels == c].mean(0), cells0[labels == c].mean(0), atol=4.0)


def test_generation_is_deterministic_and_seeded(tmp_path: Path):
    def pixels(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        s = make_synthetic_slide(tmp_path / name, 2048, 1536, seed=seed)
        with tiffslide.TiffSlide(s.path) as ts:
            return np.asarray(ts.read_region((0, 0), 0, ts.dimensions)), read_label_map(s)

    a, la = pixels("a.tif", 5)
    b, lb = pixels("b.tif", 5)
    c, lc = pixels("c.tif", 6)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(la, lc)


def test_invalid_arguments_raise_zeus_error(tmp_path: Path):
    out = tmp_path / "x.tif"
    for kwargs in ({"tile": 100}, {"tissue_fraction": 0.0}, {"tumor_fraction": 1.0}, {"mpp": 0.0}, {"levels": 0}):
        with pytest.raises(ZeusError):
            make_synthetic_slide(out, 512, 512, **kwargs)
    with pytest.raises(ZeusError):
        make_synthetic_slide(out, 0, 512)
    assert not out.exists()


@pytest.mark.slow
def test_cli_writes_slide_and_masks(tmp_path: Path):
    out = tmp_path / "cli.tif"
    proc = subprocess.run(
        [sys.executable, "-m", "zeus_qupath.samples.synthetic", str(out), "--width", "1024", "--height", "768",
         "--seed", "3"],
        capture_output=True, text=True, env=_child_env(), check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cli.tumor.png").is_file() and (tmp_path / "cli.tissue.png").is_file()
    with tiffslide.TiffSlide(out) as ts:
        assert ts.dimensions == (1024, 768)
    bad = subprocess.run(
        [sys.executable, "-m", "zeus_qupath.samples.synthetic", str(tmp_path / "bad.tif"), "--tile", "100"],
        capture_output=True, text=True, env=_child_env(), check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "multiple of 16" in bad.stderr


@pytest.mark.slow
def test_large_mostly_background_slide_writes_with_small_memory(tmp_path: Path):
    """40000 x 30000 px (3.6 GB of RGB) written in a child process whose peak RSS we read back."""
    out = tmp_path / "big.tif"
    code = textwrap.dedent(
        f"""
        import json
        from zeus_qupath.samples.synthetic import make_synthetic_slide
        make_synthetic_slide({str(out)!r}, 40000, 30000, seed=7, tissue_fraction=0.01)
        # VmHWM is this process's own peak; ru_maxrss would carry over the parent's peak across exec
        hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
        print(json.dumps({{"maxrss_kb": int(hwm.split()[1])}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    maxrss_mb = json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024
    assert maxrss_mb < 1500, f"peak RSS {maxrss_mb:.0f} MB"
    with tiffslide.TiffSlide(out) as ts:
        assert ts.level_dimensions[0] == (40000, 30000)
        assert ts.level_dimensions[-1][0] < 2000
        corner = np.asarray(ts.read_region((0, 0), 0, (256, 256)).convert("RGB")).astype(int)
        assert abs(corner.mean() - 240) < 2
    assert out.stat().st_size < 200e6


# --------------------------------------------------------------------------- tiny model


def test_tiny_model_files_and_open_clip_preprocessing(tiny):
    import open_clip
    from torchvision import transforms as T

    assert tiny.model_name == TINY_MODEL_NAME == tiny.config_path.stem
    cfg = json.loads(tiny.config_path.read_text(encoding="utf-8"))
    assert cfg == tiny_model_config()
    assert cfg["vision_cfg"]["image_size"] == 64
    assert cfg["text_cfg"]["context_length"] == 77 and cfg["text_cfg"]["vocab_size"] == 49408
    model, preprocess, tokenizer = load_tiny_model(tiny)
    steps = preprocess.transforms
    resize = next(t for t in steps if isinstance(t, T.Resize))
    norm = next(t for t in steps if isinstance(t, T.Normalize))
    assert resize.interpolation == T.InterpolationMode.BICUBIC and resize.size == 64
    assert tuple(norm.mean) == open_clip.OPENAI_DATASET_MEAN and tuple(norm.std) == open_clip.OPENAI_DATASET_STD
    tokens = tokenizer(["a histopathology image of normal skin."])
    assert tuple(tokens.shape) == (1, 77)
    x = preprocess(Image.new("RGB", (448, 448), (240, 240, 240))).unsqueeze(0)
    assert tuple(x.shape) == (1, 3, 64, 64)
    feats = model.encode_image(x, normalize=True)
    assert tuple(feats.shape) == (1, cfg["embed_dim"])


@pytest.mark.slow
def test_engine_loading_route_works_in_a_fresh_process(tiny):
    """add_model_config(<json>) + create_model_and_transforms(<stem>, pretrained=<ckpt>), nothing else."""
    import torch

    code = textwrap.dedent(
        f"""
        import json, open_clip, torch
        open_clip.add_model_config({str(tiny.config_path)!r})
        model, _, preprocess = open_clip.create_model_and_transforms(
            {tiny.config_path.stem!r}, pretrained={str(tiny.checkpoint_path)!r})
        model.eval()
        tok = open_clip.get_tokenizer({tiny.config_path.stem!r})(["an image of dermatofibrosarcoma protuberans."])
        with torch.no_grad():
            print(json.dumps(model.encode_text(tok, normalize=True)[0].tolist()))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    fresh = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    model, _, tokenizer = load_tiny_model(tiny)
    with torch.no_grad():
        here = model.encode_text(tokenizer(["an image of dermatofibrosarcoma protuberans."]), normalize=True)[0]
    torch.testing.assert_close(fresh, here, atol=1e-5, rtol=1e-5)


def test_tiny_model_classifies_held_out_tiles(tiny, demo_slide):
    meta = json.loads((tiny.config_path.parent / f"{TINY_MODEL_NAME}.meta.json").read_text(encoding="utf-8"))
    assert meta["train_slide_seed"] == TRAIN_SEED_OFFSET != DEMO_SEED  # never trained on the evaluated slide
    data = labelled_patches(demo_slide, limit=60)
    assert (np.bincount(data.labels, minlength=2) > 10).all()
    acc = zero_shot_accuracy(tiny, prompt_path("spindle_cell"), demo_slide)
    assert acc >= 0.9


def test_cached_model_is_reused(tiny):
    mtime = tiny.checkpoint_path.stat().st_mtime_ns
    again = load_or_train_tiny_model(tiny.config_path.parent.parent, prompt_path("spindle_cell"), seed=0)
    assert again == tiny
    assert tiny.checkpoint_path.stat().st_mtime_ns == mtime


def test_a_confounder_takes_only_normal_tissue_and_leaves_the_default_layout_alone(tmp_path: Path):
    """confounder_fraction > 0 adds a third, necrosis-like texture on normal tissue; 0 changes nothing."""
    from zeus_qupath.samples.synthetic import CONFOUNDER

    w, h, seed = 3072, 2048, 7
    plain = label_map(w, h, seed=seed)
    with_conf = label_map(w, h, seed=seed, confounder_fraction=0.4)
    np.testing.assert_array_equal(label_map(w, h, seed=seed, confounder_fraction=0.0), plain)
    np.testing.assert_array_equal(with_conf == TUMOR, plain == TUMOR)  # the tumor is where it was
    np.testing.assert_array_equal(with_conf != BACKGROUND, plain != BACKGROUND)  # and the tissue
    conf = with_conf == CONFOUNDER
    assert np.all(plain[conf] == NORMAL) and 0.15 < conf.sum() / (plain == NORMAL).sum() < 0.6
    slide = make_synthetic_slide(tmp_path / "c.tif", w, h, seed=seed, confounder_fraction=0.4)
    np.testing.assert_array_equal(read_label_map(slide), with_conf)  # the masks written say the same
    ds = slide.mask_downsample
    with tiffslide.TiffSlide(slide.path) as ts:
        img = np.asarray(ts.read_region((0, 0), 0, (w, h)).convert("RGB")).astype(np.float64)
    cells = img[: h // ds * ds, : w // ds * ds].reshape(h // ds, ds, w // ds, ds, 3).mean(axis=(1, 3))
    lab = with_conf[: h // ds, : w // ds]
    mean = {c: cells[lab == c].mean(axis=0) for c in (NORMAL, TUMOR, CONFOUNDER)}
    # its own colour: redder than the pink stroma, brighter than the purple tumor
    assert mean[CONFOUNDER][1] < mean[NORMAL][1] - 20 and mean[CONFOUNDER].sum() > mean[TUMOR].sum() + 60
    assert make_synthetic_slide(tmp_path / "p.tif", 512, 512, seed=1).confounder_mask_path is None
