"""Prompt screening (``--prompt-screening top-K``): KEEP's classifier ranking, per slide and per model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zeus_qupath import screening
from zeus_qupath.errors import PromptError, ZeusError
from zeus_qupath.prompts import class_prototypes, load_prompts, parse_prompts
from zeus_qupath.scoring import cosine_scores, slide_scores
from zeus_qupath.screening import (
    classifier_combinations,
    embed_prompts,
    parse_screening,
    rank_scores,
    screen_prompts,
)


@pytest.fixture(scope="module")
def prompts(spindle_prompts):
    return load_prompts(spindle_prompts)


@pytest.fixture(scope="module")
def features(tiny_encoder):
    pixels = np.random.default_rng(3).integers(0, 256, (16, 448, 448, 3), dtype=np.uint8)
    return tiny_encoder.encode_images(pixels)


@pytest.fixture(scope="module")
def embeddings(tiny_encoder, prompts):
    return embed_prompts(tiny_encoder, prompts)


def keep_rank_cls_score(features: np.ndarray, classifier: np.ndarray) -> float:
    """KEEP's ``rank_cls_score`` written out as its code does it (torch, classifier is (D, C))."""
    logits = torch.from_numpy(features) @ torch.from_numpy(classifier)
    top1, _ = logits.max(1)
    values, _ = torch.topk(logits, k=logits.shape[1], dim=1, largest=True)
    second = values[:, 1]
    return float(((top1 - second) - torch.abs(top1 + second - 1)).mean())


@pytest.mark.parametrize(
    "text,k", [("top-50", 50), ("TOP-3", 3), ("top7", 7), (" top-1 ", 1), ("off", None), ("", None), (None, None)]
)
def test_parse_screening(text, k):
    assert parse_screening(text) == k


@pytest.mark.parametrize("text", ["top-0", "top-", "best-5", "top-x", "50", "top-5.5"])
def test_parse_screening_refuses_bad_values(text):
    with pytest.raises(ZeusError, match="--prompt-screening") as exc:
        parse_screening(text)
    assert "\n" not in str(exc.value)


def test_classifiers_pair_one_name_per_class_under_each_template(prompts):
    combos = classifier_combinations(prompts)
    normal, tumor = prompts.classes
    assert combos.shape == (len(normal.templates) * len(normal.classnames) * len(tumor.classnames), 2)  # 15*7*12
    assert len({tuple(r) for r in combos}) == len(combos)
    n_texts, t_texts = normal.texts(), tumor.texts()
    for i, j in combos[::37]:
        template = normal.templates[i // len(normal.classnames)]  # one template shared by the pair
        assert n_texts[i] == template.replace("CLASSNAME", normal.classnames[i % len(normal.classnames)])
        assert t_texts[j] == template.replace("CLASSNAME", tumor.classnames[j % len(tumor.classnames)])


def test_per_class_templates_give_every_pair_of_texts():
    ps = parse_prompts({"0": {"classnames": {"normal": ["n1", "n2"], "tumor": ["t1"]},
                              "templates": {"normal": ["CLASSNAME.", "a CLASSNAME"], "tumor": ["CLASSNAME!"]}}},
                       "f.json")
    assert sorted(map(tuple, classifier_combinations(ps))) == [(i, 0) for i in range(4)]


def test_keep_prompt_file_gives_keeps_own_classifiers():
    """A KEEP-style prompt file (one group per template x tumour name x normal name) parses into the same set."""
    templates, tumors, normals = ["CLASSNAME.", "a photomicrograph showing CLASSNAME."], ["tumor tissue",
                                                                                         "cancerous tissue"], [
        "normal tissue", "benign tissue", "breast non-cancerous tissue"]
    groups, i = {}, 0
    for t in templates:
        for tu in tumors:
            for no in normals:
                groups[str(i)] = {"classnames": {"Tumor": tu, "Normal": no}, "templates": t}
                i += 1
    ps = parse_prompts(groups, "keep_prompts.json")
    combos = classifier_combinations(ps)
    texts = [c.texts() for c in ps.classes]
    ours = {tuple(texts[c][combo[c]] for c in range(2)) for combo in combos}
    keeps = {(g["templates"].replace("CLASSNAME", g["classnames"]["Tumor"]),
              g["templates"].replace("CLASSNAME", g["classnames"]["Normal"])) for g in groups.values()}
    assert ps.class_names == ["Tumor", "Normal"] and ours == keeps and len(combos) == len(groups)


@pytest.mark.parametrize("n_cls", [2, 3])
def test_rank_scores_equal_keeps_rank_cls_score(n_cls, monkeypatch):
    rng = np.random.default_rng(n_cls)
    d = 16
    centres = rng.normal(size=(3, d))
    feats = (centres[rng.integers(0, 3, 300)] + 0.4 * rng.normal(size=(300, d))).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    # texts near the patch clusters, so that top1 + top2 falls on both sides of 1
    embeddings = []
    for _ in range(n_cls):
        e = centres[rng.integers(0, 3, 4)] + 0.6 * rng.normal(size=(4, d))
        embeddings.append((e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32))
    combos = np.array(np.meshgrid(*[np.arange(4)] * n_cls, indexing="ij")).reshape(n_cls, -1).T
    monkeypatch.setattr(screening, "_BLOCK_ELEMENTS", 4096)  # many small blocks of patches and classifiers
    ours = rank_scores(feats, embeddings, combos)
    ref = [keep_rank_cls_score(feats, np.stack([embeddings[c][i] for c, i in enumerate(row)], axis=1))
           for row in combos]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    pair_sums = [np.sort(feats @ np.stack([embeddings[c][i] for c, i in enumerate(row)], axis=1), axis=1)[:, -2:]
                 .sum(axis=1) for row in combos]
    assert (np.concatenate(pair_sums) > 1).any() and (np.concatenate(pair_sums) < 1).any()  # both branches of |.|


def test_screening_keeps_the_k_best_classifiers(tiny_encoder, prompts, features, embeddings):
    k = 20
    result = screen_prompts(features, tiny_encoder, prompts, k, embeddings=embeddings)
    assert len(result.kept) == k and result.patches == len(features)
    kept_scores = result.scores[result.kept]
    others = np.delete(result.scores, result.kept)
    assert np.all(np.diff(kept_scores) <= 0) and kept_scores.min() >= others.max()
    # every kept classifier contributes one text per class: the weights of each class add up to k
    assert [int(w.sum()) for w in result.weights()] == [k, k]
    for cls, texts in result.kept_texts.items():
        assert texts and set(texts) <= set(prompts.classes[prompts.class_names.index(cls)].texts())
    # KEEP's merge: the normalised sum of the kept classifiers' unit text embeddings
    chosen = result.combinations[result.kept]
    for c, emb in enumerate(embeddings.embeddings):
        total = emb[chosen[:, c]].astype(np.float64).sum(axis=0)
        np.testing.assert_allclose(result.prototypes[c], total / np.linalg.norm(total), atol=1e-6)
    assert len(result.kept_classifiers) == k and result.kept_classifiers[0]["score"] == pytest.approx(
        result.scores.max(), abs=1e-6)


def test_k_at_least_all_classifiers_equals_no_screening(tiny_encoder, prompts, features, embeddings):
    m = len(classifier_combinations(prompts))
    result = screen_prompts(features, tiny_encoder, prompts, m + 5, embeddings=embeddings)
    assert len(result.kept) == m
    np.testing.assert_array_equal(result.prototypes, class_prototypes(tiny_encoder, prompts))
    plain, _ = slide_scores([features], [tiny_encoder], prompts)
    screened, meta = slide_scores([features], [tiny_encoder], prompts, screening_k=m)
    np.testing.assert_array_equal(screened, plain)
    assert meta["per_model"][0]["screening"]["kept_count"] == m


def test_screening_changes_scores_only_through_the_prototypes(tiny_encoder, prompts, features, embeddings):
    result = screen_prompts(features, tiny_encoder, prompts, 1, embeddings=embeddings)
    (best,) = result.kept
    single = np.stack([embeddings.embeddings[c][result.combinations[best, c]] for c in range(2)])
    np.testing.assert_allclose(result.prototypes, single, atol=1e-6)  # one classifier: its own two texts
    scores, meta = slide_scores([features], [tiny_encoder], prompts, screening_k=1, text_embeddings=[embeddings])
    np.testing.assert_array_equal(scores, cosine_scores(features, result.prototypes))
    plain, plain_meta = slide_scores([features], [tiny_encoder], prompts)
    assert not np.allclose(scores, plain)
    assert meta["per_model"][0]["prototype_sha256"] != plain_meta["per_model"][0]["prototype_sha256"]


def test_kept_prompts_are_recorded(tiny_encoder, prompts, features):
    scores, meta = slide_scores([features], [tiny_encoder], prompts, screening_k=5, model_specs=["open_clip:x.json"])
    meta = json.loads(json.dumps(meta))  # JSON-able, as it goes into the scores file and run.json
    assert meta["prompt_screening"] == {"method": "KEEP top-k classifiers", "k": 5}
    record = meta["per_model"][0]["screening"]
    assert record["k"] == 5 and record["ranked"] == 1260 and record["patches"] == len(features)
    assert len(record["kept"]) == 5
    all_texts = {c.name: set(c.texts()) for c in prompts.classes}
    for entry in record["kept"]:
        assert set(entry["texts"]) == {"normal", "tumor"}
        assert all(entry["texts"][cls] in all_texts[cls] for cls in all_texts)
        assert isinstance(entry["score"], float)
    assert set(record["kept_texts"]) == {"normal", "tumor"}
    flat = {cls: {e["texts"][cls] for e in record["kept"]} for cls in all_texts}
    assert {cls: set(v) for cls, v in record["kept_texts"].items()} == flat


def test_each_model_of_an_ensemble_screens_on_its_own(tiny_encoder, prompts, features, embeddings):
    scores, meta = slide_scores([features, features], [tiny_encoder, tiny_encoder], prompts, screening_k=3)
    assert [m["screening"]["kept_count"] for m in meta["per_model"]] == [3, 3]
    single, _ = slide_scores([features], [tiny_encoder], prompts, screening_k=3)
    np.testing.assert_allclose(scores, single, atol=1e-7)


def test_no_patches_skips_screening(tiny_encoder, prompts):
    empty = np.zeros((0, tiny_encoder.embed_dim), dtype=np.float32)
    scores, meta = slide_scores([empty], [tiny_encoder], prompts, screening_k=5)
    assert scores.shape == (0, 2) and "skipped" in meta["per_model"][0]["screening"]


def test_too_many_combinations_is_a_prompt_error(prompts, monkeypatch):
    monkeypatch.setattr(screening, "MAX_CLASSIFIERS", 1000)
    with pytest.raises(PromptError, match="1,260 prompt combinations"):
        classifier_combinations(prompts)
