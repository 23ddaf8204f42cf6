"""KEEP (``Astaxanthin/KEEP``): the authors' remote-code model, loaded as their own loaders do.

The modelling code ships in the model's Hub folder (a timm ViT-L/16 with a projection MLP, and a
BERT text tower) and runs with ``trust_remote_code``. The model is built as the authors' GitHub
loaders build it (``AutoConfig`` -> ``AutoModel.from_config`` -> ``load_state_dict``, strict)
rather than with ``AutoModel.from_pretrained``: the latter needs attributes that transformers 5
sets in ``post_init()``, which KEEP's code does not call, and fails there; both ways give the
same weights on transformers 4. Texts: ``AutoTokenizer`` (lower case) with ``max_length=256,
padding='max_length', truncation=True``; images: resize (shortest side 224, bicubic), centre crop,
ImageNet mean/std. ``encode_image`` and ``encode_text`` return 768-d unit vectors.

Written against the authors' documentation and code: the real modelling code comes from the Hub,
so it is not exercised without the model's folder.
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
        super().__init__(name, model, tokenizer, device, precision)
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


def _state_dict(folder: Path, model: str) -> dict[str, torch.Tensor]:
    """The weights in ``folder``: ``model.safetensors`` or else ``pytorch_model.bin``."""
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ModelError(f"model {model}: no model.safetensors or pytorch_model.bin in {folder}")


def _load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], name: str) -> None:
    """``load_state_dict`` as strict as the authors', except for BERT's ``position_ids`` buffer.

    Older transformers saved that buffer; newer ones do not keep it in the state dict.
    """
    result = model.load_state_dict(state_dict, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
    if result.missing_keys or unexpected:
        bad = (result.missing_keys + unexpected)[:3]
        raise ModelError(
            f"model {name}: the weights do not fit the model code ({len(result.missing_keys)} missing, "
            f"{len(unexpected)} unexpected keys, e.g. {', '.join(bad)})"
        )


def load(preset, pretrained: str | None, device: torch.device, precision: str) -> KeepEncoder:
    """KEEP from ``--pretrained DIR`` (a copy of the Hub folder, code included) or the HF cache."""
    try:
        import timm  # noqa: F401  (the remote code builds its vision tower with timm)
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ModelError(f"model {preset.name}: its code is not installed ({exc.name or exc}); {EXTRA_HINT}") from exc
    from .hub import weights_folder

    folder = weights_folder(preset, pretrained, "config.json",
                            "config.json, the modelling .py files, the tokenizer files and model.safetensors", HF_FILES)
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
        model = AutoModel.from_config(config, trust_remote_code=True)
        _load_weights(model, _state_dict(folder, preset.name), preset.name)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True, do_lower_case=True)
    except ModelError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model {preset.name}: cannot load {folder} ({first[:200]})") from exc
    return KeepEncoder(preset.name, model, tokenizer, device, precision)
