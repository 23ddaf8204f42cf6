"""What can run here: each preset's code and weights, without importing its packages or downloading.

``model_status`` only looks (``importlib.util.find_spec`` and the Hugging Face cache);
``check_model`` loads a model and embeds one synthetic patch and one prompt.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelError
from . import PRESETS, ModelPreset

# per backend: modules its code needs, and the weight files it reads (each inner tuple: any one of them)
_CODE: dict[str, tuple[str, ...]] = {
    "openclip": ("open_clip",),
    "conch": ("conch.open_clip_custom", "transformers", "timm"),
    "plip": ("transformers",),
    "keep": ("transformers", "timm"),
    "musk": ("musk.modeling", "timm", "transformers", "sentencepiece", "einops", "fairscale"),
}
_WEIGHTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "openclip": (("open_clip_config.json",), ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")),
    "conch": (("pytorch_model.bin",),),
    "plip": (("config.json",), ("model.safetensors", "pytorch_model.bin")),
    "keep": (("config.json",), ("vocab.txt",), ("model.safetensors", "pytorch_model.bin")),
    "musk": (("model.safetensors",),),
}


@dataclass(frozen=True)
class ModelStatus:
    """Whether a preset's code is importable and its weights are in the local Hugging Face cache."""

    preset: str
    code_available: bool
    code_detail: str
    weights_available: bool
    weights_location: str
    note: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module without a spec
        return False


def hf_cache_dir(repo: str) -> Path:
    """The Hugging Face cache folder of a model repository (whether or not it exists)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))


def _cached(repo: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


def _note(preset: ModelPreset) -> str:
    parts = [f"licence {preset.license}"]
    if preset.gated:
        parts.append(f"gated: accept the terms on the Hub page of {preset.hf_repo}, then `hf auth login` (or HF_TOKEN)")
    if preset.backend == "musk":
        parts.append("code from github.com/lilab-stanford/MUSK (pip install -e a clone), not PyPI")
    if preset.backend == "keep":
        parts.append("built in zeus-qupath from the folder's config.json; its modelling code is never run")
    if preset.backend == "plip":
        parts.append("no licence file states the weights' terms (the code's setup.py says MIT); read the model card")
    parts.append("or pass --pretrained with a local copy")
    return "; ".join(parts)


def model_status(name: str) -> ModelStatus:
    """Code and weights of preset ``name``, looked up without importing the model packages or downloading."""
    preset = PRESETS.get(name.strip().lower())
    if preset is None:
        raise ModelError(f"unknown model {name!r}: use one of {', '.join(sorted(PRESETS))}")
    missing = [m for m in _CODE[preset.backend] if not _has_module(m)]
    if missing:
        hint = f"pip install 'zeus-qupath[{preset.extra}]'" if preset.extra else "pip install zeus-qupath"
        if "musk.modeling" in missing:
            hint += " and the authors' package (pip install -e a clone of github.com/lilab-stanford/MUSK)"
        code_detail = f"missing {', '.join(missing)}: {hint}"
    else:
        code_detail = "importable: " + ", ".join(_CODE[preset.backend])
    repo = preset.hf_repo or ""
    groups = _WEIGHTS[preset.backend]
    found = bool(repo) and all(any(_cached(repo, f) for f in group) for group in groups)
    return ModelStatus(
        preset=preset.name,
        code_available=not missing,
        code_detail=code_detail,
        weights_available=found,
        weights_location=str(hf_cache_dir(repo)) if repo else "",
        note=_note(preset),
    )


def synthetic_patch(size: int = 448, seed: int = 0) -> np.ndarray:
    """A (1, size, size, 3) uint8 H&E-like patch: pink background with purple blobs, deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.empty((size, size, 3), np.float32)
    img[:] = (235, 190, 215)
    for _ in range(40):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 80, size / 25)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        img[blob] = (110, 60, 150)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)[None]


def check_model(
    name: str, pretrained: str | None = None, device: str = "cpu", precision: str = "auto"
) -> dict[str, object]:
    """Load ``name`` (a preset or ``open_clip:...``), embed one synthetic 448 px patch and one prompt.

    Returns dims, norms, the image-text cosine and timings; raises ``ModelError`` when the model cannot
    be loaded or its image and text embeddings do not share one dimension.
    """
    from . import load_encoder

    t0 = time.perf_counter()
    enc = load_encoder(name, pretrained=pretrained, device=device, precision=precision)
    t1 = time.perf_counter()
    image = enc.encode_images(synthetic_patch(448))
    t2 = time.perf_counter()
    text = enc.encode_texts(["an H&E image of tumor tissue"])
    t3 = time.perf_counter()
    if image.shape[-1] != text.shape[-1]:
        raise ModelError(f"model {name}: image embeddings have {image.shape[-1]} dims but text {text.shape[-1]}")
    return {
        "model": enc.name,
        "device": str(enc.device),
        "input_size": enc.preprocess.size,
        "embed_dim": int(enc.embed_dim),
        "image_dim": int(image.shape[-1]),
        "text_dim": int(text.shape[-1]),
        "image_norm": float(np.linalg.norm(image[0])),
        "text_norm": float(np.linalg.norm(text[0])),
        "cosine": float(image[0] @ text[0]),
        "load_s": round(t1 - t0, 3),
        "image_s": round(t2 - t1, 3),
        "text_s": round(t3 - t2, 3),
    }
