"""MUSK (Stanford, Li lab): the authors' ``musk`` package, its timm model and XLM-R tokenizer.

As the authors' README and demo do for zero-shot retrieval/classification:
``timm.create_model("musk_large_patch16_384")`` + ``musk.utils.load_model_and_may_interpolate``;
images resized (shortest side 384, bicubic, antialiased), centre-cropped, normalised with timm's
IMAGENET_INCEPTION mean/std (0.5, 0.5, 0.5); ``model(image=x, with_head=True, out_norm=True)[0]``;
texts through ``XLMRobertaTokenizer(tokenizer.spm)`` and ``musk.utils.xlm_tokenizer(max_len=100)``,
then ``model(text_description=ids, padding_mask=pad, with_head=True, out_norm=True)[1]``.

The ``musk`` package is not on PyPI (PyPI's ``musk`` is an unrelated project): it is installed from
the authors' repository. Its ``tokenizer.spm`` lives in the repository's ``musk/models/`` folder and
is left out of a regular (non-editable) pip install.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ModelError
from .base import HALF_MEAN, HALF_STD, Encoder, ImagePreprocess

TIMM_NAME = "musk_large_patch16_384"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.spm"
MAX_LEN = 100
REPO_URL = "https://github.com/lilab-stanford/MUSK"
EXTRA_HINT = (
    f"pip install 'zeus-qupath[musk]' and the authors' package: git clone {REPO_URL} && pip install -e MUSK "
    "(it is not on PyPI; PyPI's 'musk' is another project)"
)


def xlmr_tokenizer(spm: Path):
    """``XLMRobertaTokenizer`` over MUSK's SentencePiece model, giving the ids the authors' code gets.

    transformers 4: the authors' call ``XLMRobertaTokenizer(path)``. transformers 5 took that
    positional argument over for an in-memory vocabulary (a path gives a 5-token vocabulary that
    maps every word to <unk>) and converts a SentencePiece model only when ``from_pretrained``
    finds it under its standard file name (needs sentencepiece and protobuf).
    """
    from transformers import XLMRobertaTokenizer

    if not hasattr(XLMRobertaTokenizer, "convert_to_native_format"):  # transformers 4
        tokenizer = XLMRobertaTokenizer(str(spm))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(spm, Path(tmp) / "sentencepiece.bpe.model")
            tokenizer = XLMRobertaTokenizer.from_pretrained(tmp)
    if len(tokenizer) < 1000:
        raise ModelError(
            f"model musk: {spm.name} was read as a {len(tokenizer)}-token vocabulary; "
            "install sentencepiece and protobuf (pip install 'zeus-qupath[musk]')"
        )
    return tokenizer


class MuskEncoder(Encoder):
    """MUSK's retrieval heads (``with_head=True``), the configuration the authors use for zero-shot."""

    def __init__(self, name: str, model: torch.nn.Module, tokenizer, device: torch.device, precision: str) -> None:
        super().__init__(name, model, tokenizer, device, precision)
        self.preprocess = ImagePreprocess(size=384, mean=HALF_MEAN, std=HALF_STD, interpolation="bicubic")
        self.logit_scale = float(model.logit_scale.exp().item())
        self.embed_dim = int(model.vision_head.weight.shape[0])

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(image=x, with_head=True, out_norm=True)[0]

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        from musk import utils

        ids, pads = zip(*(utils.xlm_tokenizer(t, self.tokenizer, max_len=MAX_LEN) for t in texts), strict=True)
        return self.model(
            text_description=torch.tensor(ids, device=self.device),
            padding_mask=torch.tensor(pads, device=self.device),
            with_head=True,
            out_norm=True,
        )[1]


def _files(preset, pretrained: str | None) -> tuple[Path, Path]:
    """(weights, tokenizer.spm): from --pretrained (a file or a folder), the package folder, or the HF cache."""
    import musk

    from .hub import hf_snapshot, local_file

    folder: Path | None = None
    if pretrained:
        p = Path(pretrained).expanduser()
        folder = p if p.is_dir() else p.parent
        weights = local_file(p / WEIGHTS_FILE if p.is_dir() else p, preset.name)
    else:
        weights = hf_snapshot(preset.hf_repo, [WEIGHTS_FILE], preset.name, preset.gated) / WEIGHTS_FILE
    candidates = [Path(musk.__file__).parent / "models" / TOKENIZER_FILE, weights.parent / TOKENIZER_FILE]
    if folder is not None:
        candidates.insert(0, folder / TOKENIZER_FILE)
    spm = next((c for c in candidates if c.is_file()), None)
    if spm is None:
        raise ModelError(
            f"model {preset.name}: MUSK's text tokenizer {TOKENIZER_FILE} was not found (looked in "
            f"{', '.join(str(c.parent) for c in candidates)}); it is musk/models/{TOKENIZER_FILE} in {REPO_URL}: "
            f"install the package with pip install -e from a clone, or copy the file next to {WEIGHTS_FILE}"
        )
    return weights, spm


def load(preset, pretrained: str | None, device: torch.device, precision: str) -> MuskEncoder:
    """MUSK from ``--pretrained`` (``model.safetensors`` or a folder with it and ``tokenizer.spm``) or the HF cache."""
    try:
        import timm
        from musk import modeling, utils  # noqa: F401  (modeling registers the timm model)
    except ImportError as exc:
        raise ModelError(f"model {preset.name}: its code is not installed ({exc.name or exc}); {EXTRA_HINT}") from exc
    weights, spm = _files(preset, pretrained)
    try:
        tokenizer = xlmr_tokenizer(spm)
        model = timm.create_model(TIMM_NAME)
        utils.load_model_and_may_interpolate(str(weights), model, "model|module", "")
    except ModelError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model {preset.name}: cannot load {weights.name} ({first[:200]})") from exc
    return MuskEncoder(preset.name, model, tokenizer, device, precision)
