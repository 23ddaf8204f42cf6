"""KEEP's published checkpoint: read it, map its names onto :class:`~.keep_model.KeepModel`, load it strictly.

The Hub folder ``Astaxanthin/KEEP`` holds ``model.safetensors`` and ``pytorch_model.bin`` (1.66 GB each,
float32). Their names are those of the authors' network (``visual.*``, ``visual_head.*``, ``text.*``,
``logit_scale``) with one difference from timm: the Hub's modelling code renames timm's LayerScale
parameter from ``gamma`` to ``weight``, so the safetensors file stores ``visual.blocks.N.ls1.weight``;
checkpoints saved from timm's own LayerScale (the authors' GitHub loader, ZEUS's ``KEEP.bin``) store
``...ls1.gamma``. Both map to timm's name. Older transformers also saved BERT's ``position_ids``
buffer; it is checked to be 0..n-1 (what the model computes itself) and so used, not ignored.

Every other name must be one of the model's parameters, with its shape, and every parameter must be
in the file: a missing, unexpected, duplicated or misshapen weight stops the load with one line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import ModelError

CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")  # first found wins
_LAYER_SCALE = re.compile(r"^(visual\.blocks\.\d+\.ls[12])\.(weight|gamma)$")
_POSITION_IDS = "text.embeddings.position_ids"


def checkpoint_path(folder: Path) -> Path:
    """The weights file in ``folder``; a one-line error naming both accepted names when there is none."""
    for name in CHECKPOINT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ModelError(
        f"model keep: no weights in {folder} (looked for {' or '.join(CHECKPOINT_FILES)}); "
        "run `hf download Astaxanthin/KEEP` on a machine with network, or pass --pretrained DIR"
    )


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping in a safetensors or PyTorch file (never unpickles code)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model keep: cannot read weights {path} ({first[:160]})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model keep: {path} is not a flat state dict of tensors")
    return dict(state)


def _examples(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:3])
    return shown + (", ..." if len(keys) > 3 else "")


def map_checkpoint(state: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str) -> dict[str, torch.Tensor]:
    """``state`` under the model's own names, after checking it covers the model exactly.

    Raises a one-line ``ModelError`` for missing weights, unexpected weights, two names for one
    weight, shape mismatches, or a ``position_ids`` buffer that is not 0..n-1.
    """
    targets = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        if key == _POSITION_IDS:
            n = tensor.shape[-1] if tensor.ndim else 0
            if tensor.ndim == 0 or not torch.equal(tensor.reshape(-1).long(), torch.arange(n)):
                raise ModelError(f"model keep: {source}: {key} is not 0..n-1, so the text positions would differ")
            continue
        m = _LAYER_SCALE.match(key)
        name = key
        if m:  # the Hub's ``weight`` or timm's ``gamma``: whichever the model uses
            name = next((f"{m.group(1)}.{p}" for p in ("gamma", "weight") if f"{m.group(1)}.{p}" in targets), key)
        if name not in targets:
            unexpected.append(key)
            continue
        if name in mapped:
            raise ModelError(f"model keep: {source} holds {origin[name]} and {key}, two copies of one weight")
        mapped[name], origin[name] = tensor, key
    missing = [k for k in targets if k not in mapped]
    if missing and unexpected:
        raise ModelError(
            f"model keep: {source} does not fit KEEP's architecture: {len(missing)} weight(s) missing "
            f"({_examples(missing)}) and {len(unexpected)} not in the model ({_examples(unexpected)})"
        )
    if missing:
        raise ModelError(f"model keep: {source} lacks {len(missing)} weight(s) KEEP needs ({_examples(missing)})")
    if unexpected:
        raise ModelError(
            f"model keep: {source} has {len(unexpected)} weight(s) KEEP's architecture does not have "
            f"({_examples(unexpected)})"
        )
    wrong = [k for k, t in mapped.items() if tuple(t.shape) != tuple(targets[k].shape)]
    if wrong:
        k = wrong[0]
        raise ModelError(
            f"model keep: {source}: {len(wrong)} weight(s) of the wrong shape, e.g. {origin[k]} is "
            f"{tuple(mapped[k].shape)} but config.json makes it {tuple(targets[k].shape)}"
        )
    return mapped


def load_keep_weights(model: torch.nn.Module, path: Path) -> None:
    """Read ``path`` and load it into ``model`` strictly (every weight used, none missing)."""
    mapped = map_checkpoint(read_checkpoint(path), model, str(path))
    model.load_state_dict(mapped, strict=True)
