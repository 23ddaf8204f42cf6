"""open_clip models (QuiltNet, any open_clip config): the authors' own loading and embedding code."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ModelError
from .base import Encoder, ImagePreprocess

_LOCAL_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_pytorch_model.bin", "open_clip_model.safetensors", "*.txt")


_OPTIONAL = ("transformers", "timm")  # what open_clip imports for HF text towers, timm image towers and CoCa
_OPTIONAL_MODULES = ("open_clip.hf_model", "open_clip.timm_model", "open_clip.coca_model")


def _plain_config(spec: str) -> bool:
    """True for a config JSON file whose towers are open_clip's own (no HF text tower, no timm tower, no CoCa)."""
    if not spec.endswith(".json"):
        return False
    try:
        cfg = json.loads(Path(spec).expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # let the loader report it
    if not isinstance(cfg, dict) or "multimodal_cfg" in cfg:
        return False
    text, vision = cfg.get("text_cfg") or {}, cfg.get("vision_cfg") or {}
    return isinstance(text, dict) and isinstance(vision, dict) and not text.get("hf_model_name") \
        and not vision.get("timm_model_name")


def import_open_clip(spec: str, plain: bool | None = None):
    """open_clip, imported without transformers and timm when ``spec`` needs neither (start-up time).

    open_clip imports both at its own import, for towers most configs do not have (about 2-3 s of a
    run's start-up). For a plain config JSON they are hidden while open_clip is imported (its modules
    then record them as absent); a later model that needs them re-imports those open_clip modules,
    which re-binds the names in place, so earlier models keep working.
    """
    import importlib
    import sys

    plain = _plain_config(spec) if plain is None else plain
    if "open_clip" in sys.modules:
        if not plain:
            for name in _OPTIONAL_MODULES:
                module = sys.modules.get(name)
                if module is not None and any(getattr(module, m, "") is None for m in _OPTIONAL):
                    importlib.reload(module)
        return sys.modules["open_clip"]
    hidden = [m for m in _OPTIONAL if m not in sys.modules] if plain else []
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]  # "import m" raises ImportError while hidden
    try:
        import open_clip
    finally:
        for m in hidden:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]
    return open_clip


class OpenClipEncoder(Encoder):
    """An open_clip ``CLIP``/``CustomTextCLIP``: ``encode_image`` and ``encode_text``."""

    def __init__(self, name: str, model: torch.nn.Module, tokenizer, device: torch.device, precision: str) -> None:
        super().__init__(name, model, tokenizer, device, precision)
        cfg = model.visual.preprocess_cfg
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        if cfg.get("resize_mode", "shortest") != "shortest":
            raise ModelError(f"model {name}: resize mode {cfg['resize_mode']} is not supported")
        self.preprocess = ImagePreprocess(
            size=int(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg["interpolation"]
        )
        self.logit_scale = float(model.logit_scale.exp().item())
        with torch.inference_mode():
            self.embed_dim = int(self.text_features(["a"]).shape[-1])

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device))


def load_open_clip(
    spec: str, pretrained: str | None, device: torch.device, precision: str, display_name: str | None = None,
    random_weights: bool = False, _weights_checked: bool = False, _plain: bool = False,
) -> OpenClipEncoder:
    """Build an open_clip model from a built-in name, a config JSON file, or a ``local-dir:``/``hf-hub:`` id.

    ``pretrained`` is what open_clip takes: a tag of a built-in model or a checkpoint file. A config JSON
    file (with a checkpoint file) is loaded as a private ``local-dir:`` folder, never registered with
    open_clip: registering would change the model of that name for the whole process.
    """
    open_clip = import_open_clip(spec, True if _plain else None)

    name = spec
    path = Path(spec).expanduser()
    if not _weights_checked:
        _refuse_missing_weights(spec, pretrained, display_name, random_weights)
    if random_weights:  # asked for explicitly: seeded, so the same "model" every run (and cache key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return load_open_clip(spec, None, device, precision, display_name, random_weights=False,
                                  _weights_checked=True, _plain=_plain)
    if spec.endswith(".json"):
        with tempfile.TemporaryDirectory(prefix="zeus-open_clip-") as folder:
            _private_model_dir(path, pretrained, Path(folder))
            return load_open_clip(f"local-dir:{folder}", None, device, precision, display_name or path.stem,
                                  _weights_checked=True, _plain=_plain_config(spec))
    elif not spec.startswith(("hf-hub:", "local-dir:")) and name not in open_clip.list_models():
        raise ModelError(f"unknown open_clip model {spec!r} (see open_clip.list_models(), or pass a config .json)")
    if pretrained and not spec.startswith(("hf-hub:", "local-dir:")):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags and not Path(pretrained).expanduser().is_file():
            raise ModelError(
                f"model {display_name or spec}: --pretrained {pretrained!r} is neither a file nor a tag {tags}"
            )
    ckpt = pretrained
    if pretrained and Path(pretrained).expanduser().is_file():
        ckpt = str(Path(pretrained).expanduser())
    try:
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=ckpt, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except ModelError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model {display_name or spec}: cannot load ({first[:200]})") from exc
    return OpenClipEncoder(display_name or name, model, tokenizer, device, precision)



def _refuse_missing_weights(spec: str, pretrained: str | None, display_name: str | None,
                            random_weights: bool) -> None:
    """A model runs with the weights the user meant, or with random weights only when asked for explicitly.

    open_clip itself builds a randomly initialised model when given a config or a built-in name without
    ``pretrained`` (it only logs a warning); zeus refuses that. ``hf-hub:`` ids fetch their own weights and
    ``local-dir:`` folders must hold them.
    """
    label = display_name or spec
    if random_weights:
        if pretrained:
            raise ModelError(f"model {label}: give --pretrained or --random-weights, not both")
        return
    if pretrained or spec.startswith("hf-hub:"):
        return
    if spec.startswith("local-dir:"):
        folder = Path(spec[len("local-dir:"):]).expanduser()
        if any((folder / f).is_file() for f in _LOCAL_DIR_WEIGHTS):
            return
        raise ModelError(f"model {label}: no weights in {folder} (expected one of {', '.join(_LOCAL_DIR_WEIGHTS)})")
    raise ModelError(
        f"model {label}: no weights given; pass --pretrained TAG_OR_FILE (open_clip's pretrained tag or a "
        "checkpoint file), or --random-weights to run it with random weights on purpose (tests only)"
    )


def _private_model_dir(config: Path, pretrained: str | None, folder: Path) -> None:
    """Lay out ``config`` (+ the checkpoint ``pretrained``) as an open_clip ``local-dir:`` folder in ``folder``."""
    if not config.is_file():
        raise ModelError(f"model config not found: {config}")
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"model config {config.name} is not valid JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg", data), dict):
        raise ModelError(f"model config {config.name} is not an open_clip model config (a JSON object)")
    wrapped = data if "model_cfg" in data else {"model_cfg": data}
    (folder / "open_clip_config.json").write_text(json.dumps(wrapped))
    if pretrained:
        ckpt = Path(pretrained).expanduser()
        if not ckpt.is_file():
            raise ModelError(f"model {config.stem}: with a config file, --pretrained must be a checkpoint file, "
                             f"got {pretrained!r}")
        link = "open_clip_model.safetensors" if ckpt.suffix == ".safetensors" else "open_clip_pytorch_model.bin"
        (folder / link).symlink_to(ckpt.resolve())


def load(preset, pretrained: str | None, device: torch.device, precision: str) -> OpenClipEncoder:
    """Load an open_clip preset from a local copy of its Hub folder (``--pretrained DIR``) or the HF cache."""
    from .hub import weights_folder

    folder = weights_folder(
        preset, pretrained, "open_clip_config.json",
        "open_clip_config.json and the weights (for a bare checkpoint use --model open_clip:ARCH --pretrained FILE)",
        OPEN_CLIP_FILES,
    )
    return load_open_clip(f"local-dir:{folder}", None, device, precision, display_name=preset.name)
