"""The one encoder interface the engine uses: image batch in, unit vectors out; texts in, unit vectors out."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

_INTERP = {
    "bicubic": TF.InterpolationMode.BICUBIC,
    "bilinear": TF.InterpolationMode.BILINEAR,
    "nearest": TF.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize (shortest side) + centre crop + scale to [0, 1] + normalise, on a uint8 batch.

    It is the tensor form of the torchvision/PIL transforms the model authors ship (Resize with
    antialiasing, CenterCrop, ToTensor, Normalize), applied to a whole batch on the device.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    _constants: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, pixels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
        x = torch.as_tensor(pixels)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"expected a (B, H, W, 3) uint8 batch, got {tuple(x.shape)} {x.dtype}")
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):
            short = min(h, w)
            # truncation, as torchvision Resize(int) and CLIPImageProcessor compute the long side
            new_h, new_w = int(h * self.size / short), int(w * self.size / short)
            x = TF.resize(x, [new_h, new_w], interpolation=_INTERP[self.interpolation], antialias=True)
            x = TF.center_crop(x, [self.size, self.size])
        x = x.float().div_(255.0)
        if device not in self._constants:  # made once per device: creating them per batch syncs a CUDA stream
            self._constants[device] = (torch.tensor(self.mean, device=device).view(1, 3, 1, 1),
                                       torch.tensor(self.std, device=device).view(1, 3, 1, 1))
        mean, std = self._constants[device]
        return (x - mean) / std


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision``; ``auto`` is fp32 (no autocast) on every device.

    bf16 moves a cosine score by up to ~2e-3 and flips ZEUS's per-pixel argmax where classes are that
    close (bench/RESULTS.md, "Precision"), so reduced precision is only used when asked for, and on CUDA.
    """
    if precision in ("auto", "fp32") or device.type != "cuda":
        return None
    if precision == "fp16" or (precision == "bf16" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


class Encoder(abc.ABC):
    """A frozen vision-language model seen as two functions into one unit-norm space."""

    name: str
    embed_dim: int
    preprocess: ImagePreprocess
    logit_scale: float
    device: torch.device
    precision: str = "auto"

    def __init__(self, name: str, model: torch.nn.Module, tokenizer, device: torch.device, precision: str) -> None:
        """Hold the frozen ``model`` (moved to ``device``, eval mode); subclasses set preprocess, dims, scale."""
        self.name = name
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision

    @abc.abstractmethod
    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Text-aligned image embeddings of a preprocessed batch (not necessarily normalised)."""

    @abc.abstractmethod
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Image-aligned text embeddings (not necessarily normalised)."""

    def _autocast(self) -> torch.autocast:
        dtype = autocast_dtype(self.device, self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def encode_images(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, D) float32 unit vectors for a (B, H, W, 3) uint8 RGB batch of patches."""
        with torch.inference_mode(), self._autocast():
            feats = self.image_features(self.preprocess(pixels, self.device))
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """(T, D) float32 unit vectors for ``texts``."""
        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(texts), batch_size):
                feats = self.text_features(list(texts[i : i + batch_size]))
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out).numpy()
