"""A tiny open_clip model fitted offline, on CPU, to synthetic slides and a ZEUS prompt file.

It is not a pathology model. It exists so that tests and the demo run the *real* open_clip code
path without downloading weights: a JSON model config registered with ``open_clip.add_model_config``,
``open_clip.create_model_and_transforms(name, pretrained=<checkpoint file>)``, open_clip's own
preprocessing (bicubic resize, centre crop, OpenAI mean/std, RGB), its BPE tokenizer, and
``encode_image`` / ``encode_text``. The engine loads it exactly like that::

    open_clip.add_model_config(tiny.config_path)          # registers "zeus-tiny"
    model, _, preprocess = open_clip.create_model_and_transforms(
        tiny.config_path.stem, pretrained=str(tiny.checkpoint_path))
    tokenizer = open_clip.get_tokenizer(tiny.config_path.stem)

Training data: a *training* synthetic slide (seed ``TRAIN_SEED_OFFSET + seed``, never one of the
small seeds used for demo or evaluation slides) is cut into 448 x 448 level-0 patches; a patch
that is at least 90 % tumor is "tumor", one that is at least 90 % normal tissue (and under 2 %
tumor) is "normal", the others are skipped. Each image is paired with a random
(template x class name) caption of its class from the prompt file, and the loss is a symmetric
contrastive loss in which every caption of the image's class is a positive. Classification
follows ZEUS: a class prototype is the mean of the L2-normalised text embeddings of all its
prompts, L2-normalised again; a patch goes to the class of highest cosine similarity.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import tiffslide
import torch
import torch.nn.functional as F
from PIL import Image

from zeus_qupath.errors import PromptError, ZeusError
from zeus_qupath.output_set import atomic_open, atomic_path
from zeus_qupath.samples.synthetic import (
    BACKGROUND,
    CONFOUNDER,
    TUMOR,
    SyntheticSlide,
    make_synthetic_slide,
    read_label_map,
)

TINY_MODEL_NAME = "zeus-tiny"
TRAIN_SEED_OFFSET = 10_000
PATCH_SIZE = 448
DEFAULT_STEPS = 80
_RECIPE_VERSION = 1  # bump when the training recipe changes, so cached models are retrained
_TRAIN_SLIDE = dict(width=6144, height=4096, tissue_fraction=0.5, tumor_fraction=0.45)
# the three-texture variant (``confounder_class``): the training slide also has the necrosis-like texture
_TRAIN_SLIDE_CONFOUNDER = dict(width=6144, height=4096, tissue_fraction=0.6, tumor_fraction=0.35,
                               confounder_fraction=0.45)

__all__ = [
    "DEFAULT_STEPS",
    "PATCH_SIZE",
    "TINY_MODEL_NAME",
    "TRAIN_SEED_OFFSET",
    "LabelledPatches",
    "TinyModel",
    "labelled_patches",
    "load_or_train_tiny_model",
    "load_tiny_model",
    "main",
    "read_prompt_classes",
    "tiny_model_config",
    "train_tiny_model",
    "zero_shot_accuracy",
]


@dataclass(frozen=True)
class TinyModel:
    """A trained tiny model on disk: the open_clip config JSON and its state-dict checkpoint."""

    config_path: Path
    checkpoint_path: Path
    model_name: str = TINY_MODEL_NAME


@dataclass(frozen=True)
class LabelledPatches:
    """Pure patches cut from a synthetic slide: uint8 RGB (N, P, P, 3), class index per patch."""

    images: np.ndarray
    labels: np.ndarray
    coords: np.ndarray  # (N, 2) top-left (x, y), level-0 px
    classes: tuple[str, ...]


def tiny_model_config() -> dict[str, Any]:
    """The open_clip model config of the tiny CLIP (ViT 64 px / patch 16, 2+2 layers, 64-d embeddings)."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


# --------------------------------------------------------------------------- prompts


def read_prompt_classes(prompts_path: str | Path) -> tuple[tuple[str, ...], dict[str, list[str]], str]:
    """Read a ZEUS template file: (class names in file order, class -> prompt texts, positive class)."""
    path = Path(prompts_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptError(f"prompt file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise PromptError(f"cannot read prompt file {path}: {e}") from None
    entry = data.get("0") if isinstance(data, dict) else None
    if not isinstance(entry, dict):
        raise PromptError(f"prompt file {path} has no '0' entry")
    classnames, templates = entry.get("classnames"), entry.get("templates")
    if not isinstance(classnames, dict) or len(classnames) < 2:
        raise PromptError(f"prompt file {path}: 'classnames' must map at least two classes to name lists")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise PromptError(f"prompt file {path}: 'templates' must be a non-empty list of strings")
    texts: dict[str, list[str]] = {}
    for cls, names in classnames.items():
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise PromptError(f"prompt file {path}: class {cls!r} needs a non-empty list of names")
        texts[cls] = [t.replace("CLASSNAME", n) for n in names for t in templates]
    positive = entry.get("positive_class", "tumor")
    if positive not in classnames:
        raise PromptError(f"prompt file {path}: positive class {positive!r} is not one of {list(classnames)}")
    return tuple(classnames), texts, positive


# --------------------------------------------------------------------------- data


def _cell_overlap(start: int, size: int, ds: int, n: int) -> np.ndarray:
    """Pixels of [start, start+size) falling in each of the n label-map cells of width ds."""
    edges = np.arange(n + 1) * ds
    return np.clip(np.minimum(edges[1:], start + size) - np.maximum(edges[:-1], start), 0, None)


def labelled_patches(
    slide: SyntheticSlide,
    classes: tuple[str, ...] = ("normal", "tumor"),
    *,
    positive_class: str = "tumor",
    patch: int = PATCH_SIZE,
    stride: int = 224,
    purity: float = 0.9,
    limit: int | None = None,
    confounder_class: str | None = None,
) -> LabelledPatches:
    """Cut pure level-0 patches of a synthetic slide, labelled exactly from its masks.

    The positive class gets patches >= ``purity`` tumor; the first other class gets patches >=
    ``purity`` normal tissue with under 2 % tumor; mixed and background patches are skipped.
    ``limit`` keeps an evenly spread subset of at most that many patches per class.
    ``confounder_class`` (one of ``classes``) gets patches >= ``purity`` of the slide's confounder
    texture (``CONFOUNDER``); normal patches then also have under 2 % of it.
    """
    negative = next(c for c in classes if c not in (positive_class, confounder_class))
    labels = read_label_map(slide)
    ds = slide.mask_downsample
    mh, mw = labels.shape
    onehot = np.stack([labels == BACKGROUND, labels == TUMOR, labels == CONFOUNDER], axis=0).astype(np.float64)
    picked: dict[str, list[tuple[int, int]]] = {positive_class: [], negative: []}
    if confounder_class is not None:
        picked[confounder_class] = []
    for y in range(0, slide.height - patch + 1, stride):
        wy = _cell_overlap(y, patch, ds, mh)
        for x in range(0, slide.width - patch + 1, stride):
            wx = _cell_overlap(x, patch, ds, mw)
            bg, tumor, conf = (wy @ onehot @ wx) / float(patch * patch)
            if tumor >= purity:
                picked[positive_class].append((x, y))
            elif confounder_class is not None and conf >= purity:
                picked[confounder_class].append((x, y))
            elif 1.0 - bg - tumor - conf >= purity and tumor < 0.02 and conf < 0.02:
                picked[negative].append((x, y))
    coords, idx = [], []
    for cls, xy in picked.items():
        if limit is not None and len(xy) > limit:
            xy = [xy[i] for i in np.linspace(0, len(xy) - 1, limit).round().astype(int)]
        coords += xy
        idx += [classes.index(cls)] * len(xy)
    images = np.zeros((len(coords), patch, patch, 3), dtype=np.uint8)
    rows: dict[int, list[int]] = {}
    for i, (_, y) in enumerate(coords):
        rows.setdefault(y, []).append(i)
    with tiffslide.TiffSlide(slide.path) as ts:
        for y, members in rows.items():  # one strip per patch row: each tile is decoded a few times, not 16
            x0 = min(coords[i][0] for i in members)
            x1 = max(coords[i][0] for i in members) + patch
            strip = np.asarray(ts.read_region((x0, y), 0, (x1 - x0, patch)).convert("RGB"))
            for i in members:
                images[i] = strip[:, coords[i][0] - x0 : coords[i][0] - x0 + patch]
    return LabelledPatches(
        images=images,
        labels=np.asarray(idx, dtype=np.int64),
        coords=np.asarray(coords, dtype=np.int64).reshape(-1, 2),
        classes=tuple(classes),
    )


def _preprocess_all(preprocess: Any, images: np.ndarray) -> torch.Tensor:
    if len(images) == 0:
        return torch.zeros((0, 3, 1, 1))
    return torch.stack([preprocess(Image.fromarray(im)) for im in images])


# --------------------------------------------------------------------------- model I/O


def _register(config_path: Path) -> str:
    open_clip.add_model_config(config_path)
    return config_path.stem


def load_tiny_model(tiny: TinyModel, device: str = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """Load a trained tiny model the way the engine does; returns (model, preprocess, tokenizer)."""
    name = _register(tiny.config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=str(tiny.checkpoint_path), device=device
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def _prototypes(model: torch.nn.Module, tokenizer: Any, texts: dict[str, list[str]], classes: tuple[str, ...],
                device: str) -> torch.Tensor:
    protos = []
    for cls in classes:
        emb = model.encode_text(tokenizer(texts[cls]).to(device), normalize=True)
        protos.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(protos)


@torch.no_grad()
def _classify(model: torch.nn.Module, pixels: torch.Tensor, protos: torch.Tensor, device: str) -> np.ndarray:
    preds = []
    for i in range(0, len(pixels), 256):
        feats = model.encode_image(pixels[i : i + 256].to(device), normalize=True)
        preds.append((feats @ protos.T).argmax(dim=1).cpu())
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def zero_shot_accuracy(
    tiny: TinyModel, prompts_path: str | Path, slide: SyntheticSlide, *, device: str = "cpu",
    limit: int | None = 150,
) -> float:
    """Accuracy of the ZEUS prototype rule on pure patches of ``slide`` (load path = the engine's)."""
    classes, texts, positive = read_prompt_classes(prompts_path)
    model, preprocess, tokenizer = load_tiny_model(tiny, device)
    data = labelled_patches(slide, classes, positive_class=positive, limit=limit)
    if len(data.labels) == 0:
        raise ZeusError(f"no pure tumor/normal patches in {slide.path}")
    protos = _prototypes(model, tokenizer, texts, classes, device)
    preds = _classify(model, _preprocess_all(preprocess, data.images), protos, device)
    return float((preds == data.labels).mean())


# --------------------------------------------------------------------------- training


def _cache_key(prompts_path: Path, seed: int, steps: int, confounder_class: str | None = None) -> str:
    facts = {
        "config": tiny_model_config(),
        "prompts_sha256": hashlib.sha256(prompts_path.read_bytes()).hexdigest(),
        "seed": seed,
        "steps": steps,
        "recipe": _RECIPE_VERSION,
        "train_slide": _TRAIN_SLIDE,
        "open_clip": open_clip.__version__,
    }
    if confounder_class is not None:  # the two-texture model's key stays what it was
        facts["train_slide"] = _TRAIN_SLIDE_CONFOUNDER
        facts["confounder_class"] = confounder_class
    blob = json.dumps(facts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def train_tiny_model(
    out_dir: str | Path,
    prompts_path: str | Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    device: str = "cpu",
    batch_size: int = 64,
    confounder_class: str | None = None,
) -> TinyModel:
    """Fit the tiny model on a training synthetic slide and write config + checkpoint to ``out_dir``.

    ``confounder_class`` (a class of the prompt file, not its positive class) trains the three-texture
    variant: the training slide also has the necrosis-like confounder texture, whose pure patches are
    captioned with that class's prompts.

    Writes ``zeus-tiny.json`` (open_clip config), ``zeus-tiny.pt`` (state dict) and
    ``zeus-tiny.meta.json`` (cache key, training facts), each atomically.
    """
    out_dir = Path(out_dir)
    prompts_path = Path(prompts_path)
    classes, texts, positive = read_prompt_classes(prompts_path)
    if confounder_class is not None and (confounder_class not in classes or confounder_class == positive
                                         or len(classes) < 3):
        raise ZeusError(f"confounder class {confounder_class!r} must be a non-positive class of a prompt file "
                        f"with at least three classes (it has {list(classes)})")
    if steps < 1:
        raise ZeusError(f"steps must be >= 1, got {steps}")
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / f"{TINY_MODEL_NAME}.json") as fh:
        json.dump(tiny_model_config(), fh, indent=2)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ops are tiny: more threads only add sync cost (a lot, on a busy CPU)
    try:
        with torch.random.fork_rng(devices=[]):  # seed the model init without touching the caller's RNG
            return _train(out_dir, prompts_path, classes, texts, positive, seed=seed, steps=steps, device=device,
                          batch_size=batch_size, t0=t0, confounder_class=confounder_class)
    finally:
        torch.set_num_threads(threads)


def _train(
    out_dir: Path,
    prompts_path: Path,
    classes: tuple[str, ...],
    texts: dict[str, list[str]],
    positive: str,
    *,
    seed: int,
    steps: int,
    device: str,
    batch_size: int,
    t0: float,
    confounder_class: str | None = None,
) -> TinyModel:
    config_path = out_dir / f"{TINY_MODEL_NAME}.json"
    checkpoint_path = out_dir / f"{TINY_MODEL_NAME}.pt"
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    name = _register(config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    tokenizer = open_clip.get_tokenizer(name)

    with tempfile.TemporaryDirectory(prefix="zeus-tiny-train-") as tmp:
        layout = _TRAIN_SLIDE if confounder_class is None else _TRAIN_SLIDE_CONFOUNDER
        slide = make_synthetic_slide(Path(tmp) / "train.tif", seed=TRAIN_SEED_OFFSET + seed, **layout)
        data = labelled_patches(slide, classes, positive_class=positive, stride=112,
                                confounder_class=confounder_class)
    counts = np.bincount(data.labels, minlength=len(classes))
    if (counts == 0).any():
        found = dict(zip(classes, counts.tolist(), strict=True))
        raise ZeusError(f"training slide gave no patches for some class: {found}")
    pixels = _preprocess_all(preprocess, data.images)
    labels = torch.from_numpy(data.labels)
    del data

    all_texts = [t for cls in classes for t in texts[cls]]
    text_class = torch.tensor([i for i, cls in enumerate(classes) for _ in texts[cls]])
    tokens = tokenizer(all_texts)
    by_class_img = [torch.nonzero(labels == c).flatten() for c in range(len(classes))]
    by_class_txt = [torch.nonzero(text_class == c).flatten() for c in range(len(classes))]

    # the 49408 x 64 token table keeps its random init: updating it would dominate each step's cost,
    # and the text transformer on top learns the class names just as well
    model.token_embedding.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    model.train()
    n_cls = len(classes)
    per_class = max(1, batch_size // n_cls)
    txt_per_class = max(1, per_class // 2)
    y = torch.arange(n_cls).repeat_interleave(per_class)
    y_txt = torch.arange(n_cls).repeat_interleave(txt_per_class)
    pos = (y[:, None] == y_txt[None, :]).float().to(device)
    target_i2t = pos / pos.sum(dim=1, keepdim=True)
    target_t2i = (pos / pos.sum(dim=0, keepdim=True)).T
    for _ in range(steps):
        # class-balanced batch of images and, separately, of captions (random template x class name);
        # every caption of an image's class is a positive for it, and vice versa
        img_idx = torch.cat([pool[torch.randint(len(pool), (per_class,), generator=gen)] for pool in by_class_img])
        txt_idx = torch.cat(
            [pool[torch.randint(len(pool), (txt_per_class,), generator=gen)] for pool in by_class_txt]
        )
        x = pixels[img_idx]
        flip = torch.rand(len(x), 2, generator=gen) < 0.5
        x = torch.where(flip[:, 0, None, None, None], x.flip(-1), x)
        x = torch.where(flip[:, 1, None, None, None], x.flip(-2), x)
        img_f = model.encode_image(x.to(device), normalize=True)
        txt_f = model.encode_text(tokens[txt_idx].to(device), normalize=True)
        logits = model.logit_scale.exp() * img_f @ txt_f.T
        loss = 0.5 * (
            -(target_i2t * F.log_softmax(logits, dim=1)).sum(1).mean()
            - (target_t2i * F.log_softmax(logits.T, dim=1)).sum(1).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100.0))
    model.eval()

    protos = _prototypes(model, tokenizer, texts, classes, device)
    train_acc = float((_classify(model, pixels, protos, device) == labels.numpy()).mean())
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(checkpoint_path) as tmp:
        torch.save(state, tmp)
    meta = {
        "key": _cache_key(prompts_path, seed, steps, confounder_class),
        "confounder_class": confounder_class,
        "model_name": TINY_MODEL_NAME,
        "prompts": prompts_path.name,
        "classes": list(classes),
        "seed": seed,
        "train_slide_seed": TRAIN_SEED_OFFSET + seed,
        "steps": steps,
        "train_patches": {c: int(n) for c, n in zip(classes, counts, strict=True)},
        "final_loss": float(loss.item()),
        "train_accuracy": train_acc,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    with atomic_open(out_dir / f"{TINY_MODEL_NAME}.meta.json") as fh:
        json.dump(meta, fh, indent=2)
    return TinyModel(config_path=config_path, checkpoint_path=checkpoint_path)


def load_or_train_tiny_model(
    cache_dir: str | Path, prompts_path: str | Path, seed: int = 0, *, steps: int = DEFAULT_STEPS,
    confounder_class: str | None = None,
) -> TinyModel:
    """Reuse a cached model whose config, prompt file contents, seed and recipe match; else train one.

    Models live in ``cache_dir/zeus-tiny-<key>/``, so caches for different prompt files coexist.
    """
    prompts_path = Path(prompts_path)
    read_prompt_classes(prompts_path)  # fail early on a bad prompt file
    key = _cache_key(prompts_path, seed, steps, confounder_class)
    out_dir = Path(cache_dir) / f"{TINY_MODEL_NAME}-{key[:16]}"
    tiny = TinyModel(out_dir / f"{TINY_MODEL_NAME}.json", out_dir / f"{TINY_MODEL_NAME}.pt")
    meta_path = out_dir / f"{TINY_MODEL_NAME}.meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        cached = (
            meta.get("key") == key
            and tiny.checkpoint_path.is_file()
            and json.loads(tiny.config_path.read_text(encoding="utf-8")) == tiny_model_config()
        )
    except (OSError, ValueError):
        cached = False
    if cached:
        return tiny
    return train_tiny_model(out_dir, prompts_path, seed=seed, steps=steps, confounder_class=confounder_class)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m zeus_qupath.samples.tiny_model OUT_DIR --prompts FILE``."""
    p = argparse.ArgumentParser(
        prog="python -m zeus_qupath.samples.tiny_model",
        description="Fit the tiny open_clip test model on synthetic tiles (offline, CPU).",
    )
    p.add_argument("out_dir", type=Path)
    p.add_argument("--prompts", type=Path, required=True, help="ZEUS prompt template JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--eval-seed", type=int, default=1, help="seed of the held-out slide to report accuracy on")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    args = p.parse_args(argv)
    try:
        t0 = time.perf_counter()
        tiny = train_tiny_model(args.out_dir, args.prompts, seed=args.seed, steps=args.steps)
        print(f"trained {tiny.model_name} in {time.perf_counter() - t0:.1f} s")
        print(f"  config:     {tiny.config_path}")
        print(f"  checkpoint: {tiny.checkpoint_path}")
        if not args.no_eval:
            with tempfile.TemporaryDirectory(prefix="zeus-tiny-eval-") as tmp:
                slide = make_synthetic_slide(Path(tmp) / "heldout.tif", seed=args.eval_seed)
                acc = zero_shot_accuracy(tiny, args.prompts, slide)
            print(f"  held-out zero-shot accuracy (slide seed {args.eval_seed}): {acc:.3f}")
    except ZeusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
