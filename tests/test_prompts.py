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


# ZEUS's inference/local_data/prompts/Templates/example_template.json (github.com/cvblab/ZEUS), sha256 of the file
ZEUS_TEMPLATE_SHA256 = "bd6151138e9f98d445a90b50386f2707f7d6f385a20e6a29c0d2ca95c89e3c27"


def test_default_prompt_set_is_zeus_published_file_unchanged():
    import hashlib

    from zeus_qupath.prompts import DEFAULT_PROMPT_SET, prompt_file

    path = prompt_file(None)
    assert path.stem == DEFAULT_PROMPT_SET == "zeus_spindle_cell"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ZEUS_TEMPLATE_SHA256  # byte for byte
    ps = load_prompts(path)
    by = {c.name: c for c in ps.classes}
    assert ps.positive_class == "tumor"  # the file names none: the class called tumor
    assert len(by["normal"].classnames) == 7 and len(by["tumor"].classnames) == 12
    assert len(by["tumor"].templates) == 15 and by["tumor"].templates[1] == "A histopathological image of CLASSNAME."
    assert "cutaneous spindle cell neoplasm" in by["tumor"].classnames
    notice = (path.parent / "README.md").read_text(encoding="utf-8")
    assert "Copyright (c) 2025 Santiago Moreno" in notice and "MIT License" in notice


def test_prompt_file_resolution(tmp_path, monkeypatch):
    from zeus_qupath.prompts import bundled_prompt_names, prompt_file

    assert {"zeus_spindle_cell", "spindle_cell", "cutaneous_metastasis"} <= set(bundled_prompt_names())
    assert prompt_file("spindle_cell").name == "spindle_cell.json"
    assert prompt_file("cutaneous_metastasis.json").name == "cutaneous_metastasis.json"
    own = tmp_path / "spindle_cell"  # a file of that name in the working folder wins over the bundled set
    own.write_text(json.dumps(ZEUS))
    monkeypatch.chdir(tmp_path)
    assert prompt_file("spindle_cell").resolve() == own.resolve()
    for bad in ("no_such_set", str(tmp_path / "missing.json"), "../spindle_cell"):
        with pytest.raises(PromptError, match="bundled sets: .*zeus_spindle_cell") as exc:
            prompt_file(bad)
        assert "\n" not in str(exc.value)


def test_cli_defaults_to_zeus_prompts():
    from zeus_qupath.cli import build_parser

    parser = build_parser()
    for argv in (["segment", "slide.svs"], ["score", "f.h5", "--model", "conch"], ["serve", "--root", "."]):
        assert parser.parse_args(argv).prompts is None  # resolved to zeus_spindle_cell by prompt_file(None)
