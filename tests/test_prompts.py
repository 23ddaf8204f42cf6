"""Prompt files: the ZEUS format, extensions, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zeus_qupath.errors import PromptError
from zeus_qupath.prompts import load_prompts, parse_prompts

ZEUS = {"0": {"classnames": {"normal": ["normal skin", "dermis"], "tumor": ["tumor", "spindle cell neoplasm"]},
              "templates": ["an image of CLASSNAME.", "CLASSNAME tissue."]}}


def test_zeus_format_as_is():
    ps = parse_prompts(ZEUS, "zeus.json")
    assert ps.class_names == ["normal", "tumor"] and ps.positive_class == "tumor"
    assert ps.classes[1].texts() == ["an image of tumor.", "an image of spindle cell neoplasm.", "tumor tissue.",
                                     "spindle cell neoplasm tissue."]


def test_bundled_prompt_sets(spindle_prompts):
    ps = load_prompts(spindle_prompts)
    by = {c.name: c for c in ps.classes}
    assert len(by["normal"].classnames) == 7 and len(by["tumor"].classnames) == 12
    assert len(by["tumor"].templates) == 15 and ps.positive_class == "tumor"
    from zeus_qupath.samples import prompt_path

    assert load_prompts(prompt_path("cutaneous_metastasis")).positive_class == "tumor"


def test_per_class_templates_three_classes_and_positive_override():
    data = {"0": {"classnames": {"a": ["x"], "b": ["y"], "c": ["z"]},
                  "templates": {"a": ["CLASSNAME"], "b": ["CLASSNAME!"], "c": ["a CLASSNAME"]}}}
    ps = parse_prompts(data, "f", positive_class="b")
    assert ps.positive_class == "b" and ps.classes[2].texts() == ["a z"]
    assert parse_prompts(data, "f", positive_class="c").sha256 != ps.sha256


@pytest.mark.parametrize(
    "data,message",
    [
        ({"0": {"classnames": {"tumor": ["t"]}, "templates": ["CLASSNAME"]}}, "at least two classes"),
        ({"0": {"classnames": {"normal": ["n"], "tumor": ["t"]}, "templates": []}}, "no templates"),
        ({"0": {"classnames": {"normal": ["n"], "tumor": []}, "templates": ["CLASSNAME"]}}, "non-empty"),
        ({"0": {"classnames": {"normal": ["n"], "tumor": ["t"]}, "templates": ["no placeholder"]}}, "CLASSNAME"),
        ({"0": {"classnames": {"a": ["n"], "b": ["t"]}, "templates": ["CLASSNAME"]}}, "positive class"),
        ({"0": {"templates": ["CLASSNAME"]}}, "classnames"),
        ([], "JSON object"),
    ],
)
def test_broken_prompt_files(data, message):
    with pytest.raises(PromptError, match=message):
        parse_prompts(data, "bad.json")


def test_file_errors(tmp_path):
    with pytest.raises(PromptError, match="not found"):
        load_prompts(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"0": {"classnames": ')
    with pytest.raises(PromptError, match="not valid JSON"):
        load_prompts(bad)
    with pytest.raises(PromptError, match="not one of"):
        good = tmp_path / "good.json"
        good.write_text(json.dumps(ZEUS))
        load_prompts(good, positive_class="stroma")


def test_prototypes_are_unit_means(tiny_encoder, spindle_prompts):
    from zeus_qupath.prompts import class_prototypes

    ps = load_prompts(spindle_prompts)
    protos = class_prototypes(tiny_encoder, ps)
    assert protos.shape == (2, tiny_encoder.embed_dim)
    assert np.allclose(np.linalg.norm(protos, axis=1), 1, atol=1e-5)
    texts = ps.classes[1].texts()
    emb = tiny_encoder.encode_texts(texts)
    expected = emb.mean(0) / np.linalg.norm(emb.mean(0))
    assert np.allclose(protos[1], expected, atol=1e-5)
