"""What a result depends on, as short content hashes: slide files, model weights, parameter sets.

A slide's fingerprint is taken from its content, not its path: the sha256 of every byte, so renaming
or copying a slide keeps its fingerprint and any edit, even in place with the same size, changes it.
A :class:`FingerprintMemo` keeps each fingerprint with the file's stat guard (device, inode, size,
mtime, ctime), so an unchanged slide is hashed once, not on every run.

A model's identity is its spec, its weights file or folder fingerprint, its preprocessing, and a hash
of a deterministic sample of every parameter tensor (so weights found in the Hugging Face cache are
identified by content too). :func:`effective_precision` says which autocast dtype an encoder really
runs in, which changes its features slightly.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import SlideError
from .models.base import Encoder, autocast_dtype

_SAMPLES_PER_TENSOR = 64
_FINGERPRINT_VERSION = "zeus-file-sha256-1"


def stable_hash(value: Any) -> str:
    """sha256 of a JSON-able value (keys sorted), hex."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class StatGuard:
    """What the file system says about a file; any write to it changes ``ctime_ns`` (which no user can set)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> StatGuard:
        st = path.stat()
        return cls(int(st.st_dev), int(st.st_ino), int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns))


@dataclass(frozen=True)
class FingerprintMemo:
    """Fingerprints computed before, each kept with the :class:`StatGuard` of the file it was computed from.

    A file whose guard is unchanged (same device, inode, size, mtime and ctime) is not read again; any
    change (an in-place edit, a rename, a copy) means the whole file is hashed again. Entries are small
    JSON files in ``root``; an unreadable or unwritable memo only costs time.
    """

    root: Path

    def _entry(self, guard: StatGuard) -> Path:
        return Path(self.root) / f"{stable_hash([guard.dev, guard.ino])[:32]}.json"

    def get(self, guard: StatGuard) -> str | None:
        try:
            data = json.loads(self._entry(guard).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(data, dict) or data.get("version") != _FINGERPRINT_VERSION:
            return None
        if data.get("guard") != list(vars(guard).values()) or not isinstance(data.get("fingerprint"), str):
            return None
        return data["fingerprint"]

    def put(self, guard: StatGuard, fingerprint: str) -> None:
        from .output_set import atomic_open

        try:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            with atomic_open(self._entry(guard)) as fh:
                json.dump({"version": _FINGERPRINT_VERSION, "guard": list(vars(guard).values()),
                           "fingerprint": fingerprint}, fh)
        except OSError:
            pass


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_fingerprint(path: str | os.PathLike[str], memo: FingerprintMemo | None = None) -> str:
    """Content fingerprint of a slide (or any) file: the sha256 of every byte of it.

    Copies and renamed files share it; any change to the content changes it. With a ``memo``, a file
    whose stat guard (device, inode, size, mtime, ctime) is unchanged since it was last hashed is not read
    again (a 3 GB slide costs one ``stat`` instead of a full read; see the README for the figures).
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError:
        mode = None  # reported below, with the other errors
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise SlideError(f"{p}: not a regular file (a pipe, socket or device cannot be a slide)")
    for _attempt in range(3):
        try:
            before = StatGuard.of(p)
            if memo is not None:
                known = memo.get(before)
                if known is not None:
                    return known
            digest = f"{_FINGERPRINT_VERSION}:{_sha256_file(p)}"
            after = StatGuard.of(p)
        except FileNotFoundError:
            raise SlideError(f"slide not found: {p}") from None
        except IsADirectoryError:
            raise SlideError(f"not a file: {p}") from None
        except OSError as exc:
            raise SlideError(f"cannot read {p.name}: {exc.strerror or exc}") from None
        if before == after:  # not written to while it was read
            if memo is not None:
                memo.put(before, digest)
            return digest
    raise SlideError(f"{p.name} keeps changing while it is read; wait until it is completely written")


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
