"""PLIP (``vinid/plip``): a Hugging Face ``CLIPModel`` with its ``CLIPProcessor``, as the PLIP authors use it.

Images: the processor's own resize (shortest side, its resample filter), centre crop, rescale and
mean/std, read from the checkpoint's ``preprocessor_config.json``; ``get_image_features``.
Texts: the checkpoint's CLIP tokenizer (padding, truncation to 77) and ``get_text_features``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ModelError
from .base import Encoder, ImagePreprocess

HF_FILES = (
    "config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "pytorch_model.bin",
    "model.safetensors",
)
EXTRA_HINT = "pip install 'zeus-qupath[plip]' (brings transformers)"

# PIL.Image.Resampling values, as CLIPImageProcessor stores them in "resample"
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def preprocess_from_processor(image_processor) -> ImagePreprocess:
    """The tensor form of a ``CLIPImageProcessor`` (resize shortest edge, centre crop, rescale, normalise)."""
    size = getattr(image_processor, "size", None) or {}
    crop = getattr(image_processor, "crop_size", None) or {}
    short = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    crop_h = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
    crop_w = crop.get("width") if isinstance(crop, dict) else getattr(crop, "width", None)
    resample = getattr(image_processor, "resample", 3)
    interp = _PIL_RESAMPLE.get(int(getattr(resample, "value", resample)))
    problems = []
    if not (getattr(image_processor, "do_resize", True) and getattr(image_processor, "do_center_crop", True)):
        problems.append("resize and centre crop must both be on")
    if short is None or crop_h != short or crop_w != short:
        problems.append(f"resize {size} and crop {crop} must be one square size")
    if interp is None:
        problems.append(f"resample {resample}")
    if abs(float(getattr(image_processor, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        problems.append(f"rescale factor {image_processor.rescale_factor}")
    if problems:
        raise ModelError(f"unsupported CLIP image processor settings: {'; '.join(problems)}")
    return ImagePreprocess(
        size=int(short),
        mean=tuple(float(v) for v in image_processor.image_mean),
        std=tuple(float(v) for v in image_processor.image_std),
        interpolation=interp,
    )


def _features(out) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 returns an output whose pooler_output holds them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFClipEncoder(Encoder):
    """A transformers ``CLIPModel`` with its image processor and tokenizer."""

    def __init__(
        self, name: str, model: torch.nn.Module, image_processor, tokenizer, device: torch.device, precision: str
    ) -> None:
        super().__init__(name, model, tokenizer, device, precision)
        self.preprocess = preprocess_from_processor(image_processor)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.logit_scale = float(model.logit_scale.exp().item())
        self.embed_dim = int(model.config.projection_dim)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=x))

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return _features(
            self.model.get_text_features(
                input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device)
            )
        )


def load(preset, pretrained: str | None, device: torch.device, precision: str) -> HFClipEncoder:
    """PLIP from ``--pretrained DIR`` (a copy of the Hub folder) or the HF cache."""
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as exc:
        raise ModelError(f"model {preset.name}: its code is not installed ({exc.name or exc}); {EXTRA_HINT}") from exc
    from .hub import weights_folder

    folder = weights_folder(preset, pretrained, "config.json",
                            "config.json, preprocessor_config.json, the tokenizer files and the weights", HF_FILES)
    try:
        model = CLIPModel.from_pretrained(str(folder))
        processor = CLIPProcessor.from_pretrained(str(folder))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model {preset.name}: cannot load {folder} ({first[:200]})") from exc
    return HFClipEncoder(preset.name, model, processor.image_processor, processor.tokenizer, device, precision)
