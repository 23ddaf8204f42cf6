"""CONCH (Mahmood Lab): the authors' ``conch`` package, its CoCa model, transform and tokenizer.

Zero-shot use, as in the authors' ``conch.downstream.zeroshot_path``: images go through
``encode_image(x, proj_contrast=True)`` (the contrastive projection; without it the features are
not in the text space) and texts through ``encode_text`` after the package's own tokenizer
(``get_tokenizer`` + ``tokenize``: 127 tokens plus one pad slot, 128 in all).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ModelError
from .base import Encoder, ImagePreprocess

MODEL_CFG = "conch_ViT-B-16"
WEIGHTS_FILE = "pytorch_model.bin"
EXTRA_HINT = "pip install 'zeus-qupath[conch]' (brings the conch-fork package, the authors' code)"


def preprocess_from_transform(transform) -> ImagePreprocess:
    """The tensor form of a torchvision ``Compose([Resize(n), CenterCrop(n), ..., ToTensor(), Normalize])``."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    resize = next((t for t in steps if isinstance(t, T.Resize)), None)
    crop = next((t for t in steps if isinstance(t, T.CenterCrop)), None)
    norm = next((t for t in steps if isinstance(t, T.Normalize)), None)
    if resize is None or crop is None or norm is None:
        raise ModelError(f"unexpected image transform (no Resize/CenterCrop/Normalize): {transform}")
    size = resize.size if isinstance(resize.size, int) else resize.size[0]
    crop_size = crop.size[0] if isinstance(crop.size, (tuple, list)) else crop.size
    if isinstance(resize.size, (tuple, list)) and len(resize.size) == 2 and resize.size[0] != resize.size[1]:
        raise ModelError(f"unsupported non-square resize in image transform: {resize}")
    if int(size) != int(crop_size):
        raise ModelError(f"unsupported image transform: resize {size} then crop {crop_size}")
    return ImagePreprocess(
        size=int(size),
        mean=tuple(float(v) for v in norm.mean),
        std=tuple(float(v) for v in norm.std),
        interpolation=resize.interpolation.value,
    )


def conch_tokenizer():
    """CONCH's tokenizer exactly as its ``tokenizer.json`` defines it.

    transformers 4.48 to 4.57 override the file's ``add_prefix_space=True`` byte-level pre-tokenizer
    with ``False`` in ``PreTrainedTokenizerFast.__init__``, which changes the ids of most words
    ("tumor" becomes a different token). Earlier 4.x releases (those CONCH was published with) and
    5.x keep the file's setting; the pre-tokenizer is put back from the file so every release
    gives the same ids.
    """
    from conch.open_clip_custom import custom_tokenizer
    from tokenizers import Tokenizer

    tokenizer = custom_tokenizer.get_tokenizer()
    spec = Tokenizer.from_file(str(custom_tokenizer.TOKENIZER_DIR / custom_tokenizer.DEFAULT_TOKENIZER))
    tokenizer.backend_tokenizer.pre_tokenizer = spec.pre_tokenizer
    return tokenizer


def conch_tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """(T, 128) token ids: the package's ``tokenize`` (transformers 4), or the same call on transformers 5.

    ``tokenize`` calls ``batch_encode_plus``, which transformers 5 removed; ``tokenizer(...)`` with the
    same arguments is what ``batch_encode_plus`` did, followed by the same one-slot pad.
    """
    from conch.open_clip_custom import tokenize

    if hasattr(tokenizer, "batch_encode_plus"):
        return tokenize(texts=list(texts), tokenizer=tokenizer)
    enc = tokenizer(
        list(texts),
        max_length=127,
        add_special_tokens=True,
        return_token_type_ids=False,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return torch.nn.functional.pad(enc["input_ids"], (0, 1), value=tokenizer.pad_token_id)


class ConchEncoder(Encoder):
    """CONCH's CoCa model in its zero-shot configuration."""

    def __init__(self, name: str, model: torch.nn.Module, transform, device: torch.device, precision: str) -> None:
        super().__init__(name, model, conch_tokenizer(), device, precision)
        self.preprocess = preprocess_from_transform(transform)
        self.logit_scale = float(model.logit_scale.exp().item())
        self.embed_dim = int(model.embed_dim)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, proj_contrast=True, normalize=False)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = conch_tokenize(self.tokenizer, texts).to(self.device)
        return self.model.encode_text(tokens, normalize=False)


def _checkpoint(preset, pretrained: str | None) -> Path:
    from .hub import hf_snapshot, local_file

    if pretrained:
        p = Path(pretrained).expanduser()
        if p.is_dir():
            p = p / WEIGHTS_FILE
        return local_file(p, preset.name)
    return hf_snapshot(preset.hf_repo, [WEIGHTS_FILE], preset.name, preset.gated) / WEIGHTS_FILE


def load(preset, pretrained: str | None, device: torch.device, precision: str) -> ConchEncoder:
    """CONCH from ``--pretrained`` (its ``pytorch_model.bin`` or a folder holding it) or the HF cache."""
    try:
        from conch.open_clip_custom import create_model_from_pretrained
    except ImportError as exc:
        raise ModelError(f"model {preset.name}: its code is not installed ({exc.name or exc}); {EXTRA_HINT}") from exc
    ckpt = _checkpoint(preset, pretrained)
    try:
        model, transform = create_model_from_pretrained(MODEL_CFG, checkpoint_path=str(ckpt), device=device)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model {preset.name}: cannot load {ckpt.name} ({first[:200]})") from exc
    return ConchEncoder(preset.name, model, transform, device, precision)
