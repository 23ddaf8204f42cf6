from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT / "tests" / "data"  # real test files shipped with the repository (tests/data/SOURCES.md)


def shared_file(*parts: str) -> Path:
    """A file from tests/data; a missing one is a broken checkout, so the test fails (it does not skip)."""
    path = TESTDATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"test data missing from the repository: {path} (see tests/data/SOURCES.md)")
    return path


@pytest.fixture(scope="session")
def tiny_model_cache(tmp_path_factory) -> Path:
    """Where the tiny model is cached: ZEUS_TINY_MODEL_CACHE when set (repeated local runs skip training)."""
    cache = os.environ.get("ZEUS_TINY_MODEL_CACHE")
    return Path(cache) if cache else tmp_path_factory.mktemp("tiny-model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_cache):
    """The tiny open_clip model of samples/tiny_model.py, trained once per session."""
    from zeus_qupath.samples import prompt_path
    from zeus_qupath.samples.tiny_model import load_or_train_tiny_model

    return load_or_train_tiny_model(tiny_model_cache, prompt_path("spindle_cell"))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model):
    from zeus_qupath.models import load_encoder

    return load_encoder(f"open_clip:{tiny_model.config_path}", str(tiny_model.checkpoint_path), "cpu")


@pytest.fixture(scope="session")
def spindle_prompts():
    from zeus_qupath.samples import prompt_path

    return prompt_path("spindle_cell")
