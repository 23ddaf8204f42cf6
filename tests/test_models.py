"""Model backends: each one built with RANDOM weights through the authors' own code where that code
installs here, and compared with the authors' own preprocessing; error paths for the rest.

No pathology weights exist in this environment. What stands in for them:
- CONCH: a checkpoint file holding only the position embedding (the authors' loader loads
  non-strictly, so every other weight keeps its random initialisation);
- PLIP: a tiny ``CLIPConfig`` model saved with ``save_pretrained`` beside a ``CLIPProcessor``
  whose tokenizer files are derived from open_clip's copy of the OpenAI CLIP BPE merges;
- open_clip: the built-in ``ViT-B-32`` config with no pretrained tag;
- KEEP: built natively from its published configuration, tested in tests/test_keep.py (error paths here);
  MUSK: error path unless the authors' package is installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zeus_qupath.errors import ModelError
from zeus_qupath.models import PRESETS, load_encoder
from zeus_qupath.models.base import (
    HALF_MEAN,
    HALF_STD,
    OPENAI_MEAN,
    OPENAI_STD,
    ImagePreprocess,
)

CPU = torch.device("cpu")
PROMPTS = ["tumor", "Normal skin, with H&E-stained nuclei!", "neoplastic spindle cells"]
# a resized patch differs from PIL's by a few grey levels at most (PIL and torchvision bicubic
# antialias kernels); on the normalised scale (std ~0.27) that is well below 0.05
RESIZE_TOL = 0.05


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAS_CONCH = _importable("conch.open_clip_custom") and _importable("transformers")
HAS_TRANSFORMERS = _importable("transformers")
HAS_MUSK = _importable("musk.modeling")
NO_CONCH = "conch-fork not installed (pip install 'zeus-qupath[conch]')"
NO_TRANSFORMERS = "transformers not installed (pip install 'zeus-qupath[plip]')"


def noise_patch(shape: tuple[int, int] = (448, 448), seed: int = 0) -> np.ndarray:
    """Uniform noise: the hardest case for comparing two resize implementations."""
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def max_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours.float() - ref.float()).abs().max())


def assert_unit_rows(a: np.ndarray) -> None:
    assert a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-4)


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: every hub lookup must fail without touching the network."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------- base preprocessing


@pytest.mark.parametrize("shape", [(448, 448), (512, 512), (300, 500)])
def test_image_preprocess_matches_torchvision_on_pil(shape):
    from torchvision import transforms as T

    pre = ImagePreprocess(size=224, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic")
    ref_tf = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )
    patch = noise_patch(shape)
    ours = pre(patch[None], CPU)
    assert ours.shape == (1, 3, 224, 224)
    assert max_diff(ours, ref_tf(Image.fromarray(patch))[None]) < RESIZE_TOL


def test_image_preprocess_rejects_non_uint8():
    pre = ImagePreprocess(size=224, mean=OPENAI_MEAN, std=OPENAI_STD)
    with pytest.raises(ValueError):
        pre(np.zeros((1, 448, 448, 3), np.float32), CPU)


# ---------------------------------------------------------------- open_clip (QuiltNet's code path)


@pytest.fixture(scope="module")
def vit_b32():
    return load_encoder("open_clip:ViT-B-32", None, "cpu", "fp32", random_weights=True)


def test_open_clip_preprocess_equals_open_clip_val_transform(vit_b32):
    import open_clip

    cfg = vit_b32.model.visual.preprocess_cfg
    ref_tf = open_clip.image_transform(
        cfg["size"],
        is_train=False,
        mean=cfg["mean"],
        std=cfg["std"],
        resize_mode=cfg["resize_mode"],
        interpolation=cfg["interpolation"],
    )
    patch = noise_patch()
    ours = vit_b32.preprocess(patch[None], CPU)
    assert (vit_b32.preprocess.size, vit_b32.preprocess.mean, vit_b32.preprocess.std) == (224, OPENAI_MEAN, OPENAI_STD)
    assert max_diff(ours, ref_tf(Image.fromarray(patch))[None]) < RESIZE_TOL


def test_open_clip_embeddings_unit_norm_same_dim(vit_b32):
    image = vit_b32.encode_images(noise_patch()[None])
    text = vit_b32.encode_texts(PROMPTS)
    assert image.shape == (1, 512) and text.shape == (3, 512)
    assert_unit_rows(image)
    assert_unit_rows(text)


# ---------------------------------------------------------------- CONCH


@pytest.fixture(scope="module")
def conch_encoder(tmp_path_factory):
    from zeus_qupath.models import conch

    # The authors' loader reads a checkpoint non-strictly but needs the position embedding in it.
    ckpt = tmp_path_factory.mktemp("conch") / "pytorch_model.bin"
    torch.manual_seed(0)
    torch.save({"visual.trunk.pos_embed": torch.randn(1, 28 * 28 + 1, 768) * 0.02}, ckpt)
    return conch.load(PRESETS["conch"], str(ckpt), CPU, "fp32")


@pytest.mark.skipif(not HAS_CONCH, reason=NO_CONCH)
def test_conch_preprocess_is_the_authors_transform(conch_encoder):
    from conch.open_clip_custom.transform import image_transform

    visual = conch_encoder.model.visual
    authors = image_transform(visual.image_size, mean=visual.image_mean, std=visual.image_std)
    pre = conch_encoder.preprocess
    assert (pre.size, pre.mean, pre.std, pre.interpolation) == (448, OPENAI_MEAN, OPENAI_STD, "bicubic")
    assert pre.size == PRESETS["conch"].input_size
    patch = noise_patch((448, 448))
    assert max_diff(pre(patch[None], CPU), authors(Image.fromarray(patch))[None]) < 1e-5  # no resize at 448
    patch = noise_patch((512, 512), seed=1)
    assert max_diff(pre(patch[None], CPU), authors(Image.fromarray(patch))[None]) < RESIZE_TOL


@pytest.mark.skipif(not HAS_CONCH, reason=NO_CONCH)
def test_conch_tokens_follow_its_tokenizer_file(conch_encoder):
    """128 ids: the tokenizer.json's own encoding (prefix space on), truncated to 127, one pad slot."""
    from conch.open_clip_custom import custom_tokenizer
    from tokenizers import Tokenizer

    from zeus_qupath.models.conch import conch_tokenize

    spec = Tokenizer.from_file(str(custom_tokenizer.TOKENIZER_DIR / custom_tokenizer.DEFAULT_TOKENIZER))
    texts = [*PROMPTS, "x " * 300]
    tokens = conch_tokenize(conch_encoder.tokenizer, texts)
    assert tokens.shape == (4, 128) and tokens.dtype == torch.long
    pad = conch_encoder.tokenizer.pad_token_id
    for row, text in zip(tokens.tolist(), texts, strict=True):
        ids = spec.encode(text).ids
        if len(ids) > 127:  # truncation keeps the end-of-text token
            ids = ids[:126] + ids[-1:]
        assert row == ids + [pad] * (128 - len(ids))
    assert tokens[0, :3].tolist() == [1, 427, 2]  # <start_of_text> tumor <end_of_text>


@pytest.mark.skipif(not HAS_CONCH, reason=NO_CONCH)
def test_conch_embeddings_contrastive_512_unit_norm(conch_encoder):
    assert conch_encoder.embed_dim == PRESETS["conch"].embed_dim == 512
    image = conch_encoder.encode_images(noise_patch()[None])
    text = conch_encoder.encode_texts(PROMPTS[:2])
    assert image.shape == (1, 512) and text.shape == (2, 512)
    assert_unit_rows(image)
    assert_unit_rows(text)


def test_conch_missing_weights_names_repo_and_login(offline_empty_cache):
    if not HAS_CONCH:
        pytest.skip(NO_CONCH + ": the missing-code path is tested instead")
    with pytest.raises(ModelError) as err:
        load_encoder("conch", device="cpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert "conch" in msg and "MahmoodLab/conch" in msg and "hf auth login" in msg


def test_conch_missing_package_names_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "conch", None)
    monkeypatch.setitem(sys.modules, "conch.open_clip_custom", None)
    with pytest.raises(ModelError, match=r"zeus-qupath\[conch\]"):
        load_encoder("conch", device="cpu")


# ---------------------------------------------------------------- PLIP


def _clip_bpe_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of the OpenAI CLIP tokenizer, derived from open_clip's BPE merges file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab, merges_file


@pytest.fixture(scope="module")
def plip_folder(tmp_path_factory):
    """A folder laid out like vinid/plip's: a tiny random CLIPModel, CLIP processor and tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("plip")
    vocab, merges = _clip_bpe_files(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer(str(vocab), str(merges))).save_pretrained(
        folder
    )
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(small, image_size=224, patch_size=32),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plip_encoder(plip_folder):
    from zeus_qupath.models import plip

    return plip.load(PRESETS["plip"], str(plip_folder), CPU, "fp32")


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason=NO_TRANSFORMERS)
@pytest.mark.parametrize("shape", [(448, 448), (512, 384)])
def test_plip_preprocess_equals_clip_image_processor(plip_encoder, plip_folder, shape):
    import transformers

    pre = plip_encoder.preprocess
    assert (pre.size, pre.mean, pre.std, pre.interpolation) == (224, OPENAI_MEAN, OPENAI_STD, "bicubic")
    patch = noise_patch(shape)
    ours = pre(patch[None], CPU)
    # CLIPImageProcessor (torchvision-based in transformers 5) and, where it exists, the PIL one
    classes = [transformers.CLIPImageProcessor]
    if hasattr(transformers, "CLIPImageProcessorPil"):
        classes.append(transformers.CLIPImageProcessorPil)
    for cls in classes:
        ref = cls.from_pretrained(str(plip_folder))(images=Image.fromarray(patch), return_tensors="pt")
        assert max_diff(ours, ref["pixel_values"]) < RESIZE_TOL, cls.__name__


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason=NO_TRANSFORMERS)
def test_plip_tokenizer_matches_openai_clip_tokens(plip_encoder):
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")(PROMPTS)
    ours = plip_encoder.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    for ref_row, row in zip(reference.tolist(), ours, strict=True):
        n = sum(1 for t in ref_row if t != 0)
        assert row[:n] == ref_row[:n]


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason=NO_TRANSFORMERS)
def test_plip_embeddings_unit_norm_and_padding_invariant(plip_encoder):
    assert plip_encoder.embed_dim == 16
    image = plip_encoder.encode_images(np.stack([noise_patch(), noise_patch(seed=3)]))
    text = plip_encoder.encode_texts(PROMPTS)
    assert image.shape == (2, 16) and text.shape == (3, 16)
    assert_unit_rows(image)
    assert_unit_rows(text)
    # "tumor" alone and "tumor" padded to the longest prompt of a batch embed the same
    alone = plip_encoder.encode_texts(PROMPTS[:1])
    np.testing.assert_allclose(alone[0], text[0], atol=1e-5)


def test_plip_bad_pretrained_folder(tmp_path):
    if not HAS_TRANSFORMERS:
        pytest.skip(NO_TRANSFORMERS + ": the missing-code path is tested instead")
    with pytest.raises(ModelError, match="config.json"):
        load_encoder("plip", pretrained=str(tmp_path), device="cpu")


def test_plip_missing_weights_names_repo(offline_empty_cache):
    if not HAS_TRANSFORMERS:
        pytest.skip(NO_TRANSFORMERS + ": the missing-code path is tested instead")
    with pytest.raises(ModelError) as err:
        load_encoder("plip", device="cpu")
    assert "vinid/plip" in str(err.value) and "hf download vinid/plip" in str(err.value)


@pytest.mark.parametrize("name", ["plip", "keep"])
def test_transformers_backends_missing_package_name_extra(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelError, match=rf"zeus-qupath\[{name}\]"):
        load_encoder(name, device="cpu")


# ---------------------------------------------------------------- KEEP (built natively: tests/test_keep.py)


def test_keep_missing_weights_names_repo(offline_empty_cache):
    if not HAS_TRANSFORMERS:
        pytest.skip(NO_TRANSFORMERS + ": the missing-code path is tested instead")
    with pytest.raises(ModelError) as err:
        load_encoder("keep", device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "model keep" in msg and "hf download Astaxanthin/KEEP" in msg


def test_keep_bad_pretrained_folder(tmp_path):
    if not HAS_TRANSFORMERS:
        pytest.skip(NO_TRANSFORMERS + ": the missing-code path is tested instead")
    with pytest.raises(ModelError, match="model keep.*config.json"):
        load_encoder("keep", pretrained=str(tmp_path), device="cpu")


# ---------------------------------------------------------------- MUSK


def test_musk_missing_package_names_repo_and_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "musk", None)
    with pytest.raises(ModelError) as err:
        load_encoder("musk", device="cpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert "zeus-qupath[musk]" in msg and "github.com/lilab-stanford/MUSK" in msg and "not on PyPI" in msg


def test_musk_preprocessing_is_the_authors_transform():
    """MUSK's encoder prepares patches as the authors' README transform does (a transcription of it, on PIL images).

    The README: Resize(384, interpolation=3 (bicubic), antialias=True), CenterCrop((384, 384)), ToTensor(),
    Normalize(timm's IMAGENET_INCEPTION_MEAN / _STD); texts through ``xlm_tokenizer(max_len=100)``. The encoder
    is built around a stand-in module (the authors' package and weights are not here): its preprocessing and
    the preset table are the code under test. ImageNet's mean/std would be ~0.6 off, bilinear ~0.02 on average.
    """
    from timm.data.constants import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
    from torchvision import transforms as T

    from zeus_qupath.models.musk import MAX_LEN, MuskEncoder
    from zeus_qupath.slide import Slide

    from conftest import shared_file

    class StandIn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
            self.vision_head = torch.nn.Linear(8, 1024, bias=False)

    enc = MuskEncoder("musk", StandIn(), None, CPU, "fp32")
    authors = T.Compose([T.Resize(384, interpolation=3, antialias=True), T.CenterCrop((384, 384)), T.ToTensor(),
                         T.Normalize(mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD)])
    with Slide(shared_file("wsi", "CMU-1-Small-Region.svs")) as slide:
        for w, h in [(448, 448), (224, 224), (500, 320)]:
            patch = slide.read_region(900, 1200, w, h)
            ours = enc.preprocess(patch[None].copy(), CPU)[0]
            diff = (ours - authors(Image.fromarray(patch))).abs()
            assert diff.mean() < 1e-3 and diff.max() <= 2.5 / 255 / 0.5  # PIL vs tensor bicubic: 2 grey levels
    p = PRESETS["musk"]
    assert (p.input_size, p.mean, p.std, p.context_length) == (enc.preprocess.size, enc.preprocess.mean,
                                                                enc.preprocess.std, MAX_LEN)
    assert MAX_LEN == 100


def _musk_spm() -> Path | None:
    if not HAS_MUSK:
        return None
    import musk

    spm = Path(musk.__file__).parent / "models" / "tokenizer.spm"
    return spm if spm.is_file() else None


@pytest.mark.skipif(
    _musk_spm() is None,
    reason="the authors' musk package (with musk/models/tokenizer.spm) is not installed: it is not on PyPI",
)
def test_musk_random_weights(tmp_path):
    """Runs only where the authors' package is installed from a clone: build, preprocess, token ids, dims."""
    import sentencepiece
    import torchvision
    from safetensors.torch import save_file

    from zeus_qupath.models import musk as musk_backend

    save_file({"logit_scale": torch.tensor(float(np.log(1 / 0.07)))}, str(tmp_path / "model.safetensors"))
    enc = musk_backend.load(PRESETS["musk"], str(tmp_path), CPU, "fp32")
    authors = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(384, interpolation=3, antialias=True),
            torchvision.transforms.CenterCrop((384, 384)),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize(mean=HALF_MEAN, std=HALF_STD),
        ]
    )
    patch = noise_patch()
    assert max_diff(enc.preprocess(patch[None], CPU), authors(Image.fromarray(patch))[None]) < RESIZE_TOL
    # XLM-R ids: SentencePiece ids shifted by one (fairseq), <s> 0, </s> 2, <unk> 3
    sp = sentencepiece.SentencePieceProcessor(model_file=str(_musk_spm()))
    text = "histopathology image of lung adenocarcinoma"
    expected = [0] + [i + 1 if i else 3 for i in sp.encode(text)] + [2]
    assert enc.tokenizer.encode(text) == expected
    image = enc.encode_images(patch[None])
    texts = enc.encode_texts([text, "tumor"])
    assert image.shape == (1, 1024) and texts.shape == (2, 1024)
    assert_unit_rows(image)
    assert_unit_rows(texts)


# ---------------------------------------------------------------- availability


def test_model_status_empty_cache(offline_empty_cache):
    from zeus_qupath.models.availability import model_status

    for name, preset in PRESETS.items():
        status = model_status(name)
        assert status.preset == name
        assert status.weights_available is False
        org, repo = preset.hf_repo.split("/")
        assert Path(status.weights_location) == offline_empty_cache / f"models--{org}--{repo}"
        assert isinstance(status.code_available, bool) and status.code_detail
        if preset.gated:
            assert "gated" in status.note
    assert model_status("conch").code_available is HAS_CONCH
    if not HAS_MUSK:
        assert model_status("musk").code_available is False
    assert "lilab-stanford/MUSK" in model_status("musk").note


def test_model_status_finds_cached_weights(offline_empty_cache):
    from zeus_qupath.models.availability import model_status

    repo_dir = offline_empty_cache / "models--vinid--plip"
    snapshot = repo_dir / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123abcd")
    (snapshot / "config.json").write_text("{}")
    assert model_status("plip").weights_available is False  # config alone is not the weights
    (snapshot / "pytorch_model.bin").write_bytes(b"0")
    assert model_status("plip").weights_available is True


def test_model_status_unknown_model():
    from zeus_qupath.models.availability import model_status

    with pytest.raises(ModelError, match="unknown model"):
        model_status("no-such-model")


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason=NO_TRANSFORMERS)
def test_check_model_reports_dims_and_norms(plip_folder):
    from zeus_qupath.models.availability import check_model

    report = check_model("plip", pretrained=str(plip_folder), device="cpu", precision="fp32")
    assert report["model"] == "plip" and report["device"] == "cpu" and report["input_size"] == 224
    assert report["embed_dim"] == report["image_dim"] == report["text_dim"] == 16
    assert abs(report["image_norm"] - 1) < 1e-4 and abs(report["text_norm"] - 1) < 1e-4
    assert -1.0001 <= report["cosine"] <= 1.0001
    assert all(report[k] >= 0 for k in ("load_s", "image_s", "text_s"))


def test_check_model_cannot_load(offline_empty_cache):
    from zeus_qupath.models.availability import check_model

    with pytest.raises(ModelError):
        check_model("quiltnet-b32")
