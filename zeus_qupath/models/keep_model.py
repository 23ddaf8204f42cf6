"""KEEP's network, built here from its published ``config.json`` with timm and transformers.

KEEP (Zhou et al., Cancer Cell 2026; github.com/MAGIC-AI4Med/KEEP, weights huggingface.co/Astaxanthin/KEEP)
publishes its modelling code only as a Hub file run with ``trust_remote_code``. zeus-qupath never runs
that file: this module builds the same network from the configuration alone.

- image tower ``visual``: a timm ``VisionTransformer`` (the authors call ``vit_large_patch16_224``: 224 px,
  16 px patches, 1024 wide, 24 blocks, 16 heads, MLP ratio 4, qkv bias, LayerScale initialised at 1e-5,
  class token, LayerNorm eps 1e-6, no classifier); its feature is the class token after the final norm
- ``visual_head``: Linear(1024, 768) -> GELU -> Linear(768, 768)
- text tower ``text``: a transformers ``BertModel`` with its pooler (PubMedBERT-base sized: 768 wide, 12 layers,
  12 heads); its feature is ``pooler_output`` (tanh of a dense layer on [CLS]), with no further projection
- both features L2-normalised; ``logit_scale`` a learned scalar (log 25 at initialisation)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError

# what the authors' code hard-codes by calling timm's ``vit_large_patch16_224``; the config repeats it
VIT_L16 = {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "mlp_ratio": 4.0, "qkv_bias": True}


@dataclass(frozen=True)
class KeepVisionConfig:
    """The ViT image tower (KEEP's ``vision_config``)."""

    img_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_ratio: float
    qkv_bias: bool
    init_values: float | None
    dynamic_img_size: bool


@dataclass(frozen=True)
class KeepConfig:
    """KEEP's ``config.json``: the image tower, the BERT text tower's settings, the projection width."""

    vision: KeepVisionConfig
    text: dict[str, Any]  # BertConfig keyword arguments, as published
    projection_dim: int


def parse_keep_config(raw: dict[str, Any], source: str = "config.json") -> KeepConfig:
    """A :class:`KeepConfig` from parsed JSON; a one-line ``ModelError`` for what KEEP's code would not build."""

    def bad(why: str) -> ModelError:
        return ModelError(f"model keep: {source} is not KEEP's configuration ({why})")

    if not isinstance(raw, dict):
        raise bad("not a JSON object")
    if raw.get("model_type", "keep") != "keep":
        raise bad(f"model_type {raw.get('model_type')!r}")
    vision, text = raw.get("vision_config"), raw.get("text_config")
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise bad("vision_config and text_config must both be objects")
    if vision.get("model_type", "vit") != "vit" or text.get("model_type", "bert") != "bert":
        raise bad(f"towers {vision.get('model_type')!r} / {text.get('model_type')!r}, expected 'vit' / 'bert'")
    try:
        v = {**VIT_L16, **vision}
        vis = KeepVisionConfig(
            img_size=int(v["img_size"]),
            patch_size=int(v["patch_size"]),
            width=int(v["hidden_size"]),
            depth=int(v["num_layers"]),
            heads=int(v["num_heads"]),
            mlp_ratio=float(v["mlp_ratio"]),
            qkv_bias=bool(v["qkv_bias"]),
            init_values=None if v.get("init_values") is None else float(v["init_values"]),
            dynamic_img_size=bool(v.get("dynamic_img_size", False)),
        )
        projection_dim = int(raw.get("projection_dim", 768))
        text_width = int(text.get("hidden_size", 768))
    except KeyError as exc:
        raise bad(f"vision_config lacks {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise bad(str(exc)) from None
    if int(vision.get("num_classes", 0)) != 0:
        raise bad("vision_config.num_classes must be 0 (KEEP has no classifier head)")
    if text_width != projection_dim:
        raise bad(f"the text tower is {text_width} wide but projection_dim is {projection_dim}: "
                  "KEEP compares BERT's pooled output with the projected image feature directly")
    bert = {k: val for k, val in text.items() if k != "model_type"}
    return KeepConfig(vision=vis, text=bert, projection_dim=projection_dim)


def read_keep_config(path: str | Path) -> KeepConfig:
    """Parse KEEP's ``config.json`` at ``path``; a one-line ``ModelError`` if it is unreadable or not KEEP's."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model keep: cannot read {path} ({exc})") from None
    return parse_keep_config(raw, str(path))


class KeepModel(nn.Module):
    """KEEP's image and text towers with the parameter layout of its checkpoint (``visual``, ``visual_head``,
    ``text``, ``logit_scale``); LayerScale parameters carry timm's name (``gamma``)."""

    def __init__(self, config: KeepConfig) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer
        from transformers import BertConfig, BertModel

        v = config.vision
        self.config = config
        self.visual = VisionTransformer(
            img_size=v.img_size,
            patch_size=v.patch_size,
            embed_dim=v.width,
            depth=v.depth,
            num_heads=v.heads,
            mlp_ratio=v.mlp_ratio,
            qkv_bias=v.qkv_bias,
            init_values=v.init_values,
            class_token=True,
            global_pool="token",
            num_classes=0,
            dynamic_img_size=v.dynamic_img_size,
        )
        d = config.projection_dim
        self.visual_head = nn.Sequential(nn.Linear(v.width, d), nn.GELU(), nn.Linear(d, d))
        self.text = BertModel(BertConfig(**config.text), add_pooling_layer=True)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.04)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) unit vectors for a normalised (B, 3, H, W) batch."""
        return nn.functional.normalize(self.visual_head(self.visual(pixels)), dim=-1)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(T, D) unit vectors for tokenised texts (BERT's pooled [CLS] output)."""
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return nn.functional.normalize(out.pooler_output, dim=-1)
