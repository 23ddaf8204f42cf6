"""Finding model weights: a local file, or the Hugging Face cache (downloading only when allowed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import ModelError


def hf_snapshot(repo: str, patterns: Sequence[str], model: str, gated: bool = False) -> Path:
    """Local folder with ``repo``'s files matching ``patterns``, from the cache or the Hub.

    Tries the cache first; downloads only when that fails and ``HF_HUB_OFFLINE`` is not set.
    Raises a one-line ``ModelError`` naming the model, what is missing and how to get it.
    """
    try:
        import huggingface_hub as hf
    except ImportError as exc:  # pragma: no cover - a dependency of open_clip
        raise ModelError(f"model {model}: huggingface_hub is not installed") from exc
    try:
        return Path(hf.snapshot_download(repo, allow_patterns=list(patterns), local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            return Path(hf.snapshot_download(repo, allow_patterns=list(patterns)))
        except Exception as exc:
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            reason = lines[0] if lines else type(exc).__name__
    login = " after `hf auth login` with a token approved for this gated model" if gated else ""
    raise ModelError(
        f"model {model}: weights {repo} are not in the Hugging Face cache and could not be downloaded "
        f"({reason[:160]}); run `hf download {repo}`{login} on a machine with network "
        f"(then copy ~/.cache/huggingface), or pass --pretrained DIR"
    )


def local_file(path: str | os.PathLike[str], model: str) -> Path:
    """A weights file the user named; a one-line error if it does not exist."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"model {model}: weights file not found: {p}")
    return p


def weights_folder(preset, pretrained: str | None, marker: str, contents: str, patterns: Sequence[str]) -> Path:
    """``--pretrained DIR`` (a copy of the preset's Hub folder, recognised by its ``marker`` file), or the
    preset's snapshot in the Hugging Face cache; ``contents`` tells the user what the folder must hold."""
    if not pretrained:
        return hf_snapshot(preset.hf_repo, patterns, preset.name, preset.gated)
    folder = Path(pretrained).expanduser()
    if not (folder / marker).is_file():
        raise ModelError(
            f"model {preset.name}: --pretrained must be a folder holding {contents} (a copy of {preset.hf_repo}); "
            f"not found: {folder / marker}"
        )
    return folder
