"""KEEP built natively: the published checkpoint layout, strict loading, and the authors' forward,
preprocessing and tokenizer settings as independent references.

No KEEP weights exist here. A randomly initialised network is built the way KEEP's authors build it
(their published loader: timm ``vit_large_patch16_224`` with ``img_size``, ``patch_size``,
``init_values=1e-5``, ``num_classes=0``, ``dynamic_img_size=True``; ``visual_head`` =
Linear-GELU-Linear; ``BertModel(BertConfig(**text_config))``; ``logit_scale``), saved in the Hub's
layout (``model.safetensors``, LayerScale stored as ``ls1.weight`` as the Hub's code renames it) or in
timm's layout (``pytorch_model.bin`` with ``ls1.gamma``, as the authors' GitHub loader and ZEUS load it),
next to the Hub's ``config.json`` and ``tokenizer_config.json`` and a small ``vocab.txt`` made here.
Small tower sizes keep the forward tests fast; the full published configuration is checked for its
checkpoint names and shapes on the meta device (no memory) and, in a slow test, end to end.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zeus_qupath.errors import ModelError
from zeus_qupath.models import PRESETS, load_encoder
from zeus_qupath.params import DEFAULT_MODEL

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

CPU = torch.device("cpu")
RESIZE_TOL = 0.05  # PIL's and torchvision's antialiased bicubic kernels differ by a few grey levels

# Astaxanthin/KEEP config.json as published (the Hub's main branch adds architectures/auto_map)
PUBLISHED_CONFIG = {
    "model_type": "keep",
    "vision_config": {
        "model_type": "vit", "img_size": 224, "patch_size": 16, "hidden_size": 1024, "num_heads": 16,
        "num_layers": 24, "mlp_ratio": 4.0, "qkv_bias": True, "drop_rate": 0.0, "attn_drop_rate": 0.0,
        "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True,
    },
    "text_config": {
        "model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12,
    },
    "projection_dim": 768,
}
PUBLISHED_TOKENIZER_CONFIG = '{\n  "do_lower_case": true,\n  "tokenizer_class": "BertTokenizer" \n}\n'

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "an", "h", "&", "e", "image", "of", "tumor", "normal",
         "skin", ",", ".", "!", "-", "with", "nuclei", "stain", "##ed", "neo", "##plastic", "spin", "##dle",
         "cell", "##s", "a", "histopathological", "dermis", "tissue"]
PROMPTS = ["an H&E image of tumor.", "Normal skin, with H&E-stained nuclei!", "neoplastic spindle cells",
           "A histopathological image of Néoplastic dermis tissue"]


def tiny_config() -> dict:
    """The published configuration with small towers (every other field as published)."""
    cfg = copy.deepcopy(PUBLISHED_CONFIG)
    cfg["vision_config"].update(hidden_size=64, num_heads=4, num_layers=2)
    cfg["text_config"].update(vocab_size=len(VOCAB), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=96)
    cfg["projection_dim"] = 48
    return cfg


class AuthorsKeep(torch.nn.Module):
    """KEEP as the authors' published loader constructs it (their call, tower sizes from the config)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        v = cfg["vision_config"]
        sizes = {} if v["hidden_size"] == 1024 else {
            "embed_dim": v["hidden_size"], "depth": v["num_layers"], "num_heads": v["num_heads"]}
        self.visual = timm.create_model("vit_large_patch16_224", pretrained=False, img_size=v["img_size"],
                                        patch_size=v["patch_size"], init_values=v["init_values"],
                                        num_classes=v["num_classes"], dynamic_img_size=True, **sizes)
        d = cfg["projection_dim"]
        self.visual_head = torch.nn.Sequential(torch.nn.Linear(self.visual.num_features, d), torch.nn.GELU(),
                                               torch.nn.Linear(d, d))
        self.text = BertModel(BertConfig(**cfg["text_config"]))
        self.logit_scale = torch.nn.Parameter(torch.ones([]) * np.log(1 / 0.04))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.visual_head(self.visual(x)), dim=-1)

    def encode_text(self, tokens: dict) -> torch.Tensor:
        return torch.nn.functional.normalize(self.text(**tokens).pooler_output, dim=-1)


def hub_layout(state: dict) -> dict:
    """timm's LayerScale ``gamma`` stored as ``weight``, as the Hub's model.safetensors has it."""
    return {k.replace(".ls1.gamma", ".ls1.weight").replace(".ls2.gamma", ".ls2.weight"): v for k, v in state.items()}


def authors_transform():
    """The image transform of KEEP's README, transcribed with torchvision (PIL input)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size=224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size=(224, 224)),
                      T.ToTensor(), T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])


def wordpiece_reference(texts: list[str], vocab: list[str], max_length: int = 256) -> dict[str, torch.Tensor]:
    """BERT's uncased basic + WordPiece tokenization, written out, with KEEP's call settings
    (max_length 256, pad to max_length, truncate): an independent check of the tokenizer path."""
    index = {w: i for i, w in enumerate(vocab)}

    def words(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        out, cur = [], ""
        for c in text:
            if c.isspace():
                out, cur = out + ([cur] if cur else []), ""
            elif unicodedata.category(c).startswith("P") or c in "$+<=>^`|~&":
                out, cur = out + ([cur] if cur else []) + [c], ""
            else:
                cur += c
        return out + ([cur] if cur else [])

    def pieces(word: str) -> list[int]:
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in index:
                end -= 1
            if end == start:
                return [index["[UNK]"]]
            ids.append(index[("##" if start else "") + word[start:end]])
            start = end
        return ids

    rows, masks = [], []
    for text in texts:
        ids = [i for w in words(text) for i in pieces(w)][: max_length - 2]
        ids = [index["[CLS]"], *ids, index["[SEP]"]]
        masks.append([1] * len(ids) + [0] * (max_length - len(ids)))
        rows.append(ids + [index["[PAD]"]] * (max_length - len(ids)))
    ids = torch.tensor(rows)
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.tensor(masks)}


def noise_patch(shape=(448, 448), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def write_folder(folder: Path, cfg: dict, state: dict, fmt: str = "safetensors") -> Path:
    """A copy of the Hub folder: config.json, tokenizer_config.json, vocab.txt, weights, and a trap for
    the remote modelling code (it must never be imported)."""
    folder.mkdir(parents=True, exist_ok=True)
    hub_cfg = {"architectures": ["KEEPModel"],
               "auto_map": {"AutoConfig": "modeling_keep.KEEPConfig", "AutoModel": "modeling_keep.KEEPModel"}, **cfg}
    (folder / "config.json").write_text(json.dumps(hub_cfg, indent=2))
    (folder / "tokenizer_config.json").write_text(PUBLISHED_TOKENIZER_CONFIG)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (folder / "modeling_keep.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('REMOTE_CODE_RAN').touch()\n"
        "raise RuntimeError('remote code executed')\n")
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        safetensors_torch.save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def authors_model() -> AuthorsKeep:
    torch.manual_seed(0)
    model = AuthorsKeep(tiny_config()).eval()
    with torch.no_grad():  # a distinctive value, so a load that kept the initial one is caught
        model.logit_scale.fill_(3.1)
        for block in model.visual.blocks:  # LayerScale far from its 1e-5 start, so its weights matter
            block.ls1.gamma.uniform_(0.5, 1.5)
            block.ls2.gamma.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory, authors_model) -> Path:
    return write_folder(tmp_path_factory.mktemp("keep") / "hub", tiny_config(), hub_layout(authors_model.state_dict()))


@pytest.fixture(scope="module")
def keep(hub_folder):
    return load_encoder("keep", pretrained=str(hub_folder), device="cpu", precision="fp32")


# ---------------------------------------------------------------- the published layout, full size


def test_full_published_config_has_the_published_checkpoint_layout():
    """Our network from the published config.json has exactly the parameters the authors' loader builds:
    every name of the Hub layout maps to one of ours, with its shape, and nothing is left over."""
    from zeus_qupath.models.keep_model import KeepModel, parse_keep_config
    from zeus_qupath.models.keep_weights import map_checkpoint

    with torch.device("meta"):
        ours = KeepModel(parse_keep_config(PUBLISHED_CONFIG))
        ref = AuthorsKeep(PUBLISHED_CONFIG)
    hub = hub_layout(ref.state_dict())
    assert len(hub) == 546 and "visual.blocks.23.ls2.weight" in hub and "text.pooler.dense.bias" in hub
    mapped = map_checkpoint(hub, ours, "published layout")
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    # float32 weights of this network weigh what the Hub lists for model.safetensors: 1.66 GB
    size = sum(v.numel() for v in ours.state_dict().values()) * 4
    assert 1.655e9 < size < 1.665e9, size
    assert ours.visual.global_pool == "token" and ours.visual.embed_dim == 1024 and len(ours.visual.blocks) == 24
    assert ours.text.config.hidden_size == 768 and ours.text.pooler is not None


# ---------------------------------------------------------------- loading and the authors' forward


def test_loads_hub_layout_strictly_and_matches_authors_forward(keep, authors_model):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = keep.image_features(x)
        ref = authors_model.encode_image(x)
    assert ours.shape == (2, 48)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert keep.logit_scale == pytest.approx(np.exp(3.1), rel=1e-6)
    assert keep.embed_dim == 48 and keep.preprocess.size == 224


def test_text_embeddings_equal_authors_forward_on_their_tokenizer_settings(keep, authors_model, monkeypatch):
    texts = [*PROMPTS, " ".join(["tumor", "skin", "nuclei"] * 120)]  # 360 words: truncation at 256 matters
    seen = []
    original = keep.tokenizer.__class__.__call__
    monkeypatch.setattr(keep.tokenizer.__class__, "__call__",
                        lambda self, *a, **k: seen.append(k) or original(self, *a, **k))
    ours = keep.encode_texts(texts)
    assert seen and all(k == {"max_length": 256, "padding": "max_length", "truncation": True,
                              "return_tensors": "pt"} for k in seen)
    with torch.no_grad():
        ref = authors_model.encode_text(wordpiece_reference(texts, VOCAB)).numpy()
    assert ours.shape == (len(texts), 48) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_end_to_end_patch_embedding_follows_authors_transform(keep, authors_model):
    patch = noise_patch()
    ours = keep.encode_images(patch[None])
    with torch.no_grad():
        ref = authors_model.encode_image(authors_transform()(Image.fromarray(patch))[None]).numpy()
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert float(ours[0] @ ref[0]) > 0.999  # only the resize kernels differ (PIL vs torchvision)


def test_timm_layout_bin_loads_to_the_same_model(tmp_path, authors_model, keep):
    folder = write_folder(tmp_path / "bin", tiny_config(), authors_model.state_dict(), fmt="bin")
    enc = load_encoder("keep", pretrained=str(folder), device="cpu", precision="fp32")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(enc.image_features(x), keep.image_features(x), atol=0, rtol=0)
    np.testing.assert_array_equal(enc.encode_texts(PROMPTS[:2]), keep.encode_texts(PROMPTS[:2]))


def test_remote_modelling_code_is_never_run(hub_folder, keep):
    assert (hub_folder / "modeling_keep.py").is_file()
    assert not (hub_folder / "REMOTE_CODE_RAN").exists()
    assert not any("modeling_keep" in name for name in sys.modules)


def test_default_model_is_keep():
    from zeus_qupath.cli import build_parser
    from zeus_qupath.runs.run import RunConfig

    assert DEFAULT_MODEL == "keep" and PRESETS[DEFAULT_MODEL].hf_repo == "Astaxanthin/KEEP"
    parser = build_parser()
    assert parser.parse_args(["segment", "s.svs", "--prompts", "p.json"]).model == DEFAULT_MODEL
    assert parser.parse_args(["serve", "--root", "."]).model == DEFAULT_MODEL
    assert RunConfig(slides=(), prompts="p", out_dir="o").model == DEFAULT_MODEL


def _zeus(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``zeus ARGS`` with an empty, offline Hugging Face cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    return subprocess.run([sys.executable, "-m", "zeus_qupath", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_segment_without_model_asks_for_keep_weights(tmp_path):
    from conftest import shared_file

    prompts = Path(__file__).resolve().parents[1] / "samples" / "prompts" / "spindle_cell.json"
    out = tmp_path / "out"
    res = _zeus(tmp_path, "segment", str(shared_file("wsi", "CMU-1-Small-Region.svs")), "--prompts", str(prompts),
                "--out", str(out))
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "model keep" in err[0] and "hf download Astaxanthin/KEEP" in err[0] and "--pretrained" in err[0]
    assert not out.exists() or not any(p.suffix in (".geojson", ".npz", ".png") for p in out.rglob("*"))


@pytest.mark.slow
def test_zeus_models_marks_keep_as_default(tmp_path):
    res = _zeus(tmp_path, "models")
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.strip()}
    assert rows["keep"][1:4] == ["(default)", "yes", "no"]  # code importable, no weights in the empty cache
    assert "(default)" not in " ".join(" ".join(r) for name, r in rows.items() if name != "keep")


# ---------------------------------------------------------------- strictness


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("text.pooler.dense.bias"), r"lacks 1 weight\(s\) KEEP needs \(text\.pooler\.dense\.bias\)"),
        (lambda s: s.__setitem__("visual.head.weight", torch.zeros(3, 64)),
         r"has 1 weight\(s\) KEEP's architecture does not have \(visual\.head\.weight\)"),
        (lambda s: s.__setitem__("visual.blocks.0.ls1.gamma", s["visual.blocks.0.ls1.weight"].clone()), r"two copies"),
        (lambda s: s.__setitem__("visual_head.2.bias", torch.zeros(47)), r"wrong shape.*visual_head\.2\.bias"),
        (lambda s: s.__setitem__("text.embeddings.position_ids", torch.arange(512)[None].flip(1)), r"position_ids"),
    ],
    ids=["missing", "unexpected", "duplicate", "shape", "position_ids"],
)
def test_strict_loading_one_clear_error(tmp_path, authors_model, edit, message):
    state = hub_layout(authors_model.state_dict())
    edit(state)
    folder = write_folder(tmp_path / "bad", tiny_config(), state)
    with pytest.raises(ModelError, match=message) as err:
        load_encoder("keep", pretrained=str(folder), device="cpu", precision="fp32")
    assert "\n" not in str(err.value) and str(err.value).startswith("model keep:")


def test_position_ids_buffer_of_older_transformers_is_accepted(tmp_path, authors_model, keep):
    state = hub_layout(authors_model.state_dict())
    state["text.embeddings.position_ids"] = torch.arange(512)[None]
    enc = load_encoder("keep", pretrained=str(write_folder(tmp_path / "pos", tiny_config(), state)), device="cpu")
    np.testing.assert_array_equal(enc.encode_texts(PROMPTS[:1]), keep.encode_texts(PROMPTS[:1]))


def test_cli_missing_and_unexpected_weights_exit_2(tmp_path, authors_model, capsys):
    from zeus_qupath.cli import main

    state = hub_layout(authors_model.state_dict())
    state.pop("logit_scale")
    folder = write_folder(tmp_path / "cli", tiny_config(), state)
    assert main(["models", "--check", "keep", "--pretrained", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "logit_scale" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(model_type="clip"), "model_type"),
        (lambda c: c["vision_config"].update(num_classes=1000), "num_classes"),
        (lambda c: c.update(projection_dim=64), "projection_dim"),
        (lambda c: c.pop("text_config"), "text_config"),
    ],
)
def test_config_that_is_not_keeps_is_refused(tmp_path, authors_model, change, message):
    cfg = tiny_config()
    change(cfg)
    folder = write_folder(tmp_path / "cfg", cfg, hub_layout(authors_model.state_dict()))
    with pytest.raises(ModelError, match=message):
        load_encoder("keep", pretrained=str(folder), device="cpu")


def test_folder_without_weights_or_vocab_says_how_to_get_them(tmp_path, hub_folder):
    folder = tmp_path / "partial"
    folder.mkdir()
    for name in ("config.json", "tokenizer_config.json", "vocab.txt"):
        (folder / name).write_bytes((hub_folder / name).read_bytes())
    with pytest.raises(ModelError, match=r"model keep: no weights .*model\.safetensors or pytorch_model\.bin.*"
                                         r"hf download Astaxanthin/KEEP"):
        load_encoder("keep", pretrained=str(folder), device="cpu")
    (folder / "model.safetensors").write_bytes((hub_folder / "model.safetensors").read_bytes())
    (folder / "vocab.txt").unlink()
    with pytest.raises(ModelError, match="no vocab.txt"):
        load_encoder("keep", pretrained=str(folder), device="cpu")


def test_truncated_weights_file_is_one_line(tmp_path, hub_folder):
    folder = tmp_path / "trunc"
    folder.mkdir()
    for name in ("config.json", "tokenizer_config.json", "vocab.txt"):
        (folder / name).write_bytes((hub_folder / name).read_bytes())
    (folder / "model.safetensors").write_bytes((hub_folder / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ModelError, match="cannot read weights") as err:
        load_encoder("keep", pretrained=str(folder), device="cpu")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- tokenizer and preprocessing


def test_tokenizer_ids_equal_wordpiece_reference_with_keeps_settings(keep):
    long_text = " ".join(["tumor"] * 400)
    texts = [*PROMPTS, long_text, "UNSEEN word"]
    enc = keep.tokenizer(texts, max_length=256, padding="max_length", truncation=True, return_tensors="pt")
    ref = wordpiece_reference(texts, VOCAB)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(enc[key], ref[key]), key
    assert enc["input_ids"].shape == (len(texts), 256)
    assert enc["input_ids"][len(PROMPTS), -1] == VOCAB.index("[SEP]")  # truncation keeps [SEP]
    assert enc["input_ids"][0, :9].tolist() == [2, 5, 6, 7, 8, 9, 10, 11, 15]


def test_preprocess_equals_authors_transform():
    from zeus_qupath.models.keep import keep_preprocess

    pre = keep_preprocess()
    tf = authors_transform()
    for shape in [(448, 448), (512, 512), (300, 500)]:
        patch = noise_patch(shape)
        ours = pre(patch[None], CPU)
        ref = tf(Image.fromarray(patch))[None]
        assert ours.shape == ref.shape == (1, 3, 224, 224)
        assert float((ours - ref).abs().max()) < RESIZE_TOL, shape
    patch = noise_patch((224, 224))  # no resize: exactly the authors' ToTensor + Normalize
    torch.testing.assert_close(pre(patch[None], CPU), tf(Image.fromarray(patch))[None], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- full size, end to end


@pytest.mark.slow
def test_full_size_random_keep_in_hub_layout_end_to_end(tmp_path):
    """The published configuration at full size (ViT-L/16 + BERT-base, 1.66 GB of float32), random weights
    saved as the Hub's model.safetensors, loaded by our loader and compared with the authors' forward."""
    torch.manual_seed(0)
    ref = AuthorsKeep(PUBLISHED_CONFIG).eval()
    vocab = VOCAB + [f"w{i}" for i in range(30522 - len(VOCAB))]
    folder = write_folder(tmp_path / "full", PUBLISHED_CONFIG, hub_layout(ref.state_dict()))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        image_ref = ref.encode_image(x)
        text_ref = ref.encode_text(wordpiece_reference(PROMPTS[:2], vocab)).numpy()
    del ref  # peak memory: one model and one checkpoint at a time
    enc = load_encoder("keep", pretrained=str(folder), device="cpu", precision="fp32")
    with torch.no_grad():
        torch.testing.assert_close(enc.image_features(x), image_ref, atol=1e-5, rtol=0)
    text = enc.encode_texts(PROMPTS[:2])
    assert text.shape == (2, 768) and enc.encode_images(noise_patch()[None]).shape == (1, 768)
    np.testing.assert_allclose(text, text_ref, atol=1e-5)
