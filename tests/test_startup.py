"""Start-up: what a run imports. A plain open_clip config (open_clip's own towers) loads without
transformers and timm; a later model that needs them still gets them in the same process."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
from zeus_qupath.models import load_encoder
enc = load_encoder("open_clip:{config}", "{checkpoint}", "cpu")
assert enc.embed_dim > 0
hidden = [m for m in ("transformers", "timm") if m in sys.modules]
assert not hidden, hidden
from zeus_qupath.models.openclip import import_open_clip
oc = import_open_clip("hf-hub:some/model")  # a model that may need an HF text tower or a timm tower
assert oc.hf_model.transformers is sys.modules["transformers"]
assert oc.timm_model.timm is sys.modules["timm"]
assert load_encoder("open_clip:{config}", "{checkpoint}", "cpu").embed_dim == enc.embed_dim
print("ok")
"""


@pytest.mark.slow
def test_plain_open_clip_config_skips_transformers_and_timm(tiny_model):
    code = CHECK.format(config=tiny_model.config_path, checkpoint=tiny_model.checkpoint_path)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")
