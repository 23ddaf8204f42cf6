"""What a result depends on, as short content hashes: slide files, model weights, parameter sets.

A slide's fingerprint is taken from its content, not its path: the file size, the first and last MiB,
and for TIFF-based slides the layout of every pyramid level (shape, compression, tile offsets and
byte counts, which move whenever any tile's content changes size). Renaming or copying a slide keeps
its fingerprint; rewriting it changes it. Reading costs about 2 MiB plus the TIFF tag tables.

A model's identity is its spec, its weights file or folder fingerprint, its preprocessing, and a hash
of a deterministic sample of every parameter tensor (so weights found in the Hugging Face cache are
identified by content too). :func:`effective_precision` says which autocast dtype an encoder really
runs in, which changes its features slightly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SlideError
from .models.base import Encoder, autocast_dtype

HEAD_TAIL_BYTES = 1 << 20
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_SAMPLES_PER_TENSOR = 64


def stable_hash(value: Any) -> str:
    """sha256 of a JSON-able value (keys sorted), hex."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _head_tail(path: Path, h: Any) -> bytes:
    size = path.stat().st_size
    h.update(f"size={size};".encode())
    with open(path, "rb") as fh:
        head = fh.read(HEAD_TAIL_BYTES)
        h.update(head)
        if size > HEAD_TAIL_BYTES:
            fh.seek(max(size - HEAD_TAIL_BYTES, HEAD_TAIL_BYTES))
            h.update(fh.read())
    return head


def _tiff_layout(path: Path) -> bytes:
    """Digest of the pyramid layout of every series (shapes, compression, tile offsets and sizes)."""
    import tifffile

    h = hashlib.sha256()
    logger = logging.getLogger("tifffile")
    disabled, logger.disabled = logger.disabled, True  # a damaged file is the slide stage's to report
    try:
        with tifffile.TiffFile(path) as tf:
            for series in tf.series:
                for level in series.levels:
                    page = level.keyframe
                    h.update(repr((level.shape, str(level.dtype), int(page.compression))).encode())
                    h.update(np.asarray(page.dataoffsets, dtype=np.int64).tobytes())
                    h.update(np.asarray(page.databytecounts, dtype=np.int64).tobytes())
    except Exception as exc:  # an unreadable layout is still a (different) fingerprint
        h.update(f"unparsed:{type(exc).__name__}".encode())
    finally:
        logger.disabled = disabled
    return h.digest()


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """Content fingerprint of a slide (or any) file: size, first/last MiB, TIFF pyramid layout."""
    p = Path(path)
    h = hashlib.sha256(b"zeus-file-fingerprint-1;")
    try:
        head = _head_tail(p, h)
    except FileNotFoundError:
        raise SlideError(f"slide not found: {p}") from None
    except OSError as exc:
        raise SlideError(f"cannot read {p.name}: {exc.strerror or exc}") from None
    if head[:4] in TIFF_MAGIC:
        h.update(_tiff_layout(p))
    return h.hexdigest()


def folder_fingerprint(path: str | os.PathLike[str]) -> str:
    """Fingerprint of a weights folder: its files' names and fingerprints (not recursive)."""
    p = Path(path)
    h = hashlib.sha256(b"zeus-folder-fingerprint-1;")
    for f in sorted(x for x in p.iterdir() if x.is_file()):
        h.update(f.name.encode() + b"=" + file_fingerprint(f).encode() + b";")
    return h.hexdigest()


def _spec_identity(spec: str) -> str:
    """A model spec; a config JSON path is replaced by a hash of its content."""
    s = spec.strip()
    if s.startswith("open_clip:") and s.endswith(".json"):
        path = Path(s[len("open_clip:"):]).expanduser()
        if path.is_file():
            return f"open_clip-config:{path.stem}:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    return s


def _pretrained_identity(pretrained: str | None) -> str | None:
    if not pretrained:
        return None
    p = Path(pretrained).expanduser()
    if p.is_file():
        return f"file:{file_fingerprint(p)}"
    if p.is_dir():
        return f"folder:{folder_fingerprint(p)}"
    return f"tag:{pretrained}"


def weights_sample_hash(module: Any) -> str:
    """Hash of every parameter/buffer's name, shape, dtype and a fixed sample of its values."""
    h = hashlib.sha256(b"zeus-weights-sample-1;")
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            n = flat.numel()
            if n == 0 or not (tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32, torch.bool)):
                continue
            step = max(1, n // _SAMPLES_PER_TENSOR)
            sample = torch.cat([flat[:8], flat[::step][:_SAMPLES_PER_TENSOR], flat[-8:]])
            h.update(sample.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """Everything that decides a model's patch features, except the precision it runs in."""

    spec: str
    pretrained: str | None
    name: str
    embed_dim: int
    preprocess: tuple[Any, ...]
    weights: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "pretrained": self.pretrained, "name": self.name, "embed_dim": self.embed_dim,
                "preprocess": list(self.preprocess), "weights": self.weights}

    @property
    def digest(self) -> str:
        return stable_hash(self.to_dict())


def model_identity(spec: str, pretrained: str | None, encoder: Encoder) -> ModelIdentity:
    """The identity of a loaded encoder built from ``spec`` and ``pretrained``."""
    pre = encoder.preprocess
    module = getattr(encoder, "model", None)
    return ModelIdentity(
        spec=_spec_identity(spec),
        pretrained=_pretrained_identity(pretrained),
        name=encoder.name,
        embed_dim=int(encoder.embed_dim),
        preprocess=(pre.size, tuple(pre.mean), tuple(pre.std), pre.interpolation),
        weights=weights_sample_hash(module) if module is not None and hasattr(module, "state_dict") else None,
    )


def effective_precision(encoder: Encoder) -> str:
    """The dtype the encoder's image tower really runs in: fp32, bf16 or fp16."""
    dtype = autocast_dtype(encoder.device, encoder.precision)
    if dtype is None:
        return "fp32"
    return "bf16" if dtype == torch.bfloat16 else "fp16"
