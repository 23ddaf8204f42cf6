"""KEEP (``Astaxanthin/KEEP``): the authors' remote-code model, loaded as their model card shows.

``AutoModel.from_pretrained(folder, trust_remote_code=True)`` runs the modelling code shipped in the
model's Hub folder (a timm ViT-L/16 with a projection MLP, and a BERT text tower);
``AutoTokenizer`` with ``max_length=256, padding='max_length', truncation=True``; images are
resized (shortest side 224, bicubic), centre-cropped and normalised with ImageNet mean/std.
``encode_image`` and ``encode_text`` return 768-d vectors (already unit-norm).

Written against the authors' documentation: the modelling code comes from the Hub, so it is
not exercised without the model's folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ModelError
from .base import IMAGENET_MEAN, IMAGENET_STD, Encoder, ImagePreprocess

HF_FILES = ("*.json", "*.py", "*.txt", "*.safetensors", "pytorch_model.bin")
MAX_LENGTH = 256
EXTRA_HINT = "pip install 'zeus-qupath[keep]' (brings transformers and timm)"


class KeepEncoder(Encoder):
    """KEEP's ``encode_image`` / ``encode_text``."""

    def __init__(self, name: str, model: torch.nn.Module, tokenizer, device: torch.device, precision: str) -> None:
        self.name = name
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.preprocess = ImagePreprocess(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")
        scale = getattr(model, "logit_scale", None)
        self.logit_scale = float(scale.exp().item()) if scale is not None else 100.0
        self.embed_dim = int(getattr(model.config, "projection_dim", 768))

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(
            list(texts), max_length=MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt"
        )
        return self.model.encode_text({k: v.to(self.device) for k, v in enc.items()})


def load(preset, pretrained: str | None, device: torch.device, precision: str) -> KeepEncoder:
    """KEEP from ``--pretrained DIR`` (a copy of the Hub folder, code included) or the HF cache."""
    try:
        import timm  # noqa: F401  (the remote code builds its vision tower with timm)
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ModelError(f"model {preset.name}: its code is not installed ({exc.name or exc}); {EXTRA_HINT}") from exc
    from .hub import hf_snapshot

    if pretrained:
        folder = Path(pretrained).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"model {preset.name}: --pretrained must be a folder holding config.json, the modelling .py files, "
                f"the tokenizer files and model.safetensors (a copy of {preset.hf_repo}); "
                f"not found: {folder / 'config.json'}"
            )
    else:
        folder = hf_snapshot(preset.hf_repo, HF_FILES, preset.name, preset.gated)
    try:
        model = AutoModel.from_pretrained(str(folder), trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True, do_lower_case=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model {preset.name}: cannot load {folder} ({first[:200]})") from exc
    return KeepEncoder(preset.name, model, tokenizer, device, precision)
