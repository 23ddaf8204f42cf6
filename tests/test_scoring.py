"""Scoring: cosine scores per model, ensembles (``--model a,b``) averaged over the models' own prototypes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zeus_qupath.models import load_encoder
from zeus_qupath.prompts import class_prototypes, load_prompts
from zeus_qupath.scoring import cosine_scores, slide_scores
from zeus_qupath.screening import embed_prompts


def noise_patches(n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 448, 448, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def prompts(spindle_prompts):
    return load_prompts(spindle_prompts)


@pytest.fixture(scope="module")
def second_encoder(tiny_model, tmp_path_factory):
    """Another open_clip model from the tiny config, with a 48-d embedding and random weights (seeded)."""
    config = json.loads(tiny_model.config_path.read_text())
    config["embed_dim"] = 48
    path = tmp_path_factory.mktemp("second-model") / "zeus-tiny-random.json"
    path.write_text(json.dumps(config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return load_encoder(f"open_clip:{path}", None, "cpu", random_weights=True)


@pytest.fixture(scope="module")
def patches():
    return noise_patches()


def test_single_model_scores_are_cosines_with_the_prototypes(tiny_encoder, prompts, patches):
    feats = tiny_encoder.encode_images(patches)
    scores, meta = slide_scores([feats], [tiny_encoder], prompts)
    expected = cosine_scores(feats, class_prototypes(tiny_encoder, prompts))
    assert scores.dtype == np.float32 and scores.shape == (len(patches), 2)
    np.testing.assert_array_equal(scores, expected)
    assert meta["models"] == [tiny_encoder.name] and meta["ensemble"] is None
    assert meta["prompts_sha256"] == prompts.sha256 and meta["prompt_screening"] is None
    (entry,) = meta["per_model"]
    assert entry["embed_dim"] == tiny_encoder.embed_dim and len(entry["prototype_sha256"]) == 64
    json.dumps(meta)


def test_given_prototypes_or_text_embeddings_are_used(tiny_encoder, prompts, patches):
    feats = tiny_encoder.encode_images(patches)
    protos = class_prototypes(tiny_encoder, prompts)
    emb = embed_prompts(tiny_encoder, prompts)
    np.testing.assert_array_equal(emb.prototypes(), protos)  # the same numbers as ZEUS's prototypes
    swapped = protos[::-1].copy()
    scores, _ = slide_scores([feats], [tiny_encoder], prompts, [swapped])
    np.testing.assert_array_equal(scores, cosine_scores(feats, swapped))
    scores, _ = slide_scores([feats], [tiny_encoder], prompts, text_embeddings=[emb])
    np.testing.assert_array_equal(scores, cosine_scores(feats, protos))


def test_ensemble_is_the_mean_of_each_models_scores(tiny_encoder, second_encoder, prompts, patches):
    f1 = tiny_encoder.encode_images(patches)
    f2 = second_encoder.encode_images(patches)
    assert f1.shape[1] == 64 and f2.shape[1] == 48  # each model keeps its own space
    s1, _ = slide_scores([f1], [tiny_encoder], prompts)
    s2, _ = slide_scores([f2], [second_encoder], prompts)
    specs = ["open_clip:zeus-tiny.json", "open_clip:zeus-tiny-random.json"]
    scores, meta = slide_scores([f1, f2], [tiny_encoder, second_encoder], prompts, model_specs=specs)
    assert scores.dtype == np.float32 and scores.shape == s1.shape
    np.testing.assert_allclose(scores, (s1.astype(np.float64) + s2) / 2, rtol=0, atol=1e-7)
    assert not np.allclose(scores, s1) and not np.allclose(scores, s2)
    # each model with its own prototypes: the same numbers as scoring each one by hand
    np.testing.assert_array_equal(s2, cosine_scores(f2, class_prototypes(second_encoder, prompts)))
    assert meta["models"] == ["zeus-tiny", "zeus-tiny-random"] and meta["model_specs"] == specs
    assert "mean" in meta["ensemble"]
    assert [m["embed_dim"] for m in meta["per_model"]] == [64, 48]
    assert [m["spec"] for m in meta["per_model"]] == specs
    # same prompts, no screening: both models' prototypes come from the same texts
    assert meta["per_model"][0]["prototype_sha256"] == meta["per_model"][1]["prototype_sha256"]


def test_inconsistent_inputs_are_refused(tiny_encoder, second_encoder, prompts, patches):
    f1 = tiny_encoder.encode_images(patches)
    f2 = second_encoder.encode_images(patches[:5])
    with pytest.raises(ValueError, match="one feature array per encoder"):
        slide_scores([f1], [tiny_encoder, second_encoder], prompts)
    with pytest.raises(ValueError, match="different patch counts"):
        slide_scores([f1, f2], [tiny_encoder, second_encoder], prompts)
    with pytest.raises(ValueError, match="prototypes"):
        slide_scores([f1], [tiny_encoder], prompts, [np.zeros((2, 64)), np.zeros((2, 64))])
