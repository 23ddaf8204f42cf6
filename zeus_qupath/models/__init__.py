"""A registry of model presets behind one factory, :func:`load_encoder`.

``--model`` takes a preset name (``keep``, the default; ``conch``, ...), ``open_clip:NAME_OR_CONFIG_JSON``
(with ``--pretrained TAG_OR_FILE`` as open_clip takes it), or several of these joined by commas for
an ensemble (handled by the scoring stage).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import ModelError
from .base import (
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_MEAN,
    OPENAI_STD,
    Encoder,
    ImagePreprocess,
    resolve_device,
)

__all__ = ["PRESETS", "Encoder", "ImagePreprocess", "ModelPreset", "load_encoder", "preset_or_none"]


@dataclass(frozen=True)
class ModelPreset:
    """What a user needs to know about a model, and which backend loads it."""

    name: str
    backend: str  # module in zeus_qupath.models with a `load(preset, pretrained, device, precision)`
    source: str  # the authors' loading identifier
    hf_repo: str | None
    license: str
    gated: bool
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context_length: int
    embed_dim: int
    extra: str | None  # pip extra that brings its code
    embedding_call: str
    description: str


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset(
            "quiltnet-b32", "openclip", "hf-hub:wisdomik/QuiltNet-B-32", "wisdomik/QuiltNet-B-32", "MIT", False,
            224, OPENAI_MEAN, OPENAI_STD, 77, 512, None, "model.encode_image(x) / model.encode_text(tokens)",
            "QuiltNet ViT-B/32 (open_clip, trained on Quilt-1M)",
        ),
        ModelPreset(
            "quiltnet-b16", "openclip", "hf-hub:wisdomik/QuiltNet-B-16", "wisdomik/QuiltNet-B-16", "MIT", False,
            224, OPENAI_MEAN, OPENAI_STD, 77, 512, None, "model.encode_image(x) / model.encode_text(tokens)",
            "QuiltNet ViT-B/16 (open_clip, trained on Quilt-1M)",
        ),
        ModelPreset(
            "conch", "conch", "conch_ViT-B-16 + hf_hub:MahmoodLab/conch", "MahmoodLab/conch", "CC-BY-NC-ND-4.0", True,
            448, OPENAI_MEAN, OPENAI_STD, 128, 512, "conch",
            "model.encode_image(x, proj_contrast=True, normalize=False) / model.encode_text(tokens)",
            "CONCH ViT-B/16 at 448 px (Mahmood Lab)",
        ),
        ModelPreset(
            "plip", "plip", "transformers CLIPModel vinid/plip", "vinid/plip", "unstated (code: MIT)", False,
            224, OPENAI_MEAN, OPENAI_STD, 77, 512, "plip", "get_image_features(pixel_values) / get_text_features(ids)",
            "PLIP (CLIP ViT-B/32 fine-tuned on OpenPath)",
        ),
        ModelPreset(
            "keep", "keep", "KEEP built in zeus_qupath.models.keep_model from Astaxanthin/KEEP's config.json + weights",
            "Astaxanthin/KEEP", "MIT", False, 224, IMAGENET_MEAN, IMAGENET_STD, 256, 768, "keep",
            "encode_image(x): normalize(visual_head(ViT-L/16 [CLS])) / encode_text(ids): normalize(BERT pooler_output)",
            "KEEP ViT-L/16 + PubMedBERT (knowledge-enhanced pathology VLM; evaluated by ZEUS)",
        ),
        ModelPreset(
            "musk", "musk", "timm musk_large_patch16_384 + hf_hub:xiangjx/musk", "xiangjx/musk", "CC-BY-NC-ND-4.0",
            True, 384, HALF_MEAN, HALF_STD, 100, 1024, "musk",
            "model(image=x, with_head=True, out_norm=True)[0] / model(text_description=ids, with_head=True)[1]",
            "MUSK large (multimodal pathology model)",
        ),
    ]
}


def preset_or_none(name: str) -> ModelPreset | None:
    return PRESETS.get(name.strip().lower())


def load_encoder(model: str, pretrained: str | None = None, device: str = "auto", precision: str = "auto",
                 random_weights: bool = False) -> Encoder:
    """The encoder for one ``--model`` value (a preset or ``open_clip:...``); fails with a one-line ModelError.

    A model without its weights is refused; ``random_weights`` (``open_clip:`` models only) builds it with
    seeded random weights on purpose, for tests.
    """
    dev = resolve_device(device)
    spec = model.strip()
    if spec.startswith("open_clip:"):
        from .openclip import load_open_clip

        return load_open_clip(spec[len("open_clip:") :], pretrained, dev, precision, random_weights=random_weights)
    if random_weights:
        raise ModelError(f"--random-weights is for open_clip:NAME_OR_CONFIG_JSON models, not preset {spec!r}")
    preset = preset_or_none(spec)
    if preset is None:
        known = ", ".join(sorted(PRESETS))
        raise ModelError(f"unknown model {spec!r}: use one of {known}, or open_clip:NAME_OR_CONFIG_JSON")
    backend = importlib.import_module(f"{__name__}.{preset.backend}")
    return backend.load(preset, pretrained, dev, precision)
