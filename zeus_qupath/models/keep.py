"""KEEP (``Astaxanthin/KEEP``) as a zeus encoder: built here, never from code downloaded at run time.

The network comes from :mod:`.keep_model` (timm ViT-L/16 + projection MLP, transformers BERT), the
weights from :mod:`.keep_weights` (strict), both read from a copy of the Hub folder (``--pretrained
DIR``) or the Hugging Face cache; the folder's ``modeling_keep.py`` is not read. Text and images are
handled as the authors' README and loaders do:

- texts: a BERT WordPiece tokenizer from the folder's ``vocab.txt`` with ``do_lower_case`` from its
  ``tokenizer_config.json`` (published: true; the authors' GitHub loader also passes it), called with
  ``max_length=256, padding='max_length', truncation=True``; ids, attention mask and token types go to
  BERT, whose pooled output is the embedding;
- images: Resize(224, bicubic) of the shortest side, CenterCrop(224), ToTensor, Normalize with the
  ImageNet mean/std.

``encode_image`` and ``encode_text`` return 768-d unit vectors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ModelError
from .base import IMAGENET_MEAN, IMAGENET_STD, Encoder, ImagePreprocess

# what zeus needs from the Hub folder (``hf download Astaxanthin/KEEP`` brings these and more)
HF_FILES = ("config.json", "tokenizer_config.json", "vocab.txt", "model.safetensors")
MAX_LENGTH = 256
IMAGE_SIZE = 224
EXTRA_HINT = "pip install 'zeus-qupath[keep]' (brings transformers and timm)"
_TOKENIZER_CLASSES = (None, "BertTokenizer", "BertTokenizerFast")


def keep_preprocess() -> ImagePreprocess:
    """KEEP's image transform (Resize 224 bicubic, CenterCrop 224, ImageNet mean/std) on a uint8 batch."""
    return ImagePreprocess(size=IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")


def keep_tokenizer(folder: Path, vocab_size: int):
    """The BERT WordPiece tokenizer of the folder (``vocab.txt`` + ``tokenizer_config.json``)."""
    from transformers import BertTokenizer

    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise ModelError(f"model keep: no vocab.txt in {folder}; "
                         "run `hf download Astaxanthin/KEEP`, or pass --pretrained DIR")
    settings: dict = {}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            settings = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"model keep: cannot read {cfg_path} ({exc})") from None
    if not isinstance(settings, dict) or settings.get("tokenizer_class") not in _TOKENIZER_CLASSES:
        raise ModelError(f"model keep: {cfg_path} does not describe KEEP's BERT tokenizer")
    lower = bool(settings.get("do_lower_case", True))
    lines = sum(1 for _ in vocab.open(encoding="utf-8"))
    # from_pretrained of the class itself: no AutoTokenizer, so config.json's model type is never looked up
    tok = BertTokenizer.from_pretrained(str(folder), do_lower_case=lower, local_files_only=True)
    if len(tok) != lines or len(tok) > vocab_size:
        raise ModelError(
            f"model keep: the tokenizer has {len(tok)} tokens, vocab.txt {lines} lines and the text tower "
            f"{vocab_size} embeddings; they must agree"
        )
    return tok


class KeepEncoder(Encoder):
    """KEEP's ``encode_image`` / ``encode_text`` with the authors' preprocessing and tokenizer settings."""

    def __init__(self, name: str, model: torch.nn.Module, tokenizer, device: torch.device, precision: str) -> None:
        super().__init__(name, model, tokenizer, device, precision)
        self.preprocess = keep_preprocess()
        self.logit_scale = float(model.logit_scale.detach().exp().item())
        self.embed_dim = int(model.config.projection_dim)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(
            list(texts), max_length=MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt"
        )
        return self.model.encode_text(
            enc["input_ids"].to(self.device),
            enc["attention_mask"].to(self.device),
            enc["token_type_ids"].to(self.device) if "token_type_ids" in enc else None,
        )


def load(preset, pretrained: str | None, device: torch.device, precision: str) -> KeepEncoder:
    """KEEP from ``--pretrained DIR`` (a copy of the Hub folder) or the Hugging Face cache."""
    try:
        import timm  # noqa: F401  (the image tower)
        import transformers  # noqa: F401  (the text tower and tokenizer)
    except ImportError as exc:
        raise ModelError(f"model {preset.name}: its code is not installed ({exc.name or exc}); {EXTRA_HINT}") from exc
    from .hub import weights_folder
    from .keep_model import KeepModel, read_keep_config
    from .keep_weights import checkpoint_path, load_keep_weights

    contents = "config.json, tokenizer_config.json, vocab.txt and model.safetensors (or pytorch_model.bin)"
    folder = weights_folder(preset, pretrained, "config.json", contents, HF_FILES)
    config = read_keep_config(folder / "config.json")
    weights = checkpoint_path(folder)
    tokenizer = keep_tokenizer(folder, int(config.text.get("vocab_size", 30522)))
    try:
        model = KeepModel(config)
    except Exception as exc:  # a config value timm or transformers rejects
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model {preset.name}: cannot build KEEP from {folder / 'config.json'} ({first[:200]})") \
            from exc
    load_keep_weights(model, weights)
    return KeepEncoder(preset.name, model, tokenizer, device, precision)
