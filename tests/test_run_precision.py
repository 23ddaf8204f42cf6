"""run.json states the precision each model computed in (issue 9 item 5)."""

from __future__ import annotations

import types

import torch

from zeus_qupath.runs.run import ran_in


def test_cpu_model_computes_in_its_weights_dtype(tiny_encoder):
    info = ran_in(tiny_encoder)
    assert info == {"requested": "auto", "device": "cpu", "weights": ["fp32"], "autocast": None, "computes": "fp32"}
    half = types.SimpleNamespace(model=torch.nn.Linear(2, 2).to(torch.bfloat16), device=torch.device("cpu"),
                                 precision="fp16")
    assert ran_in(half)["computes"] == "bf16" and ran_in(half)["autocast"] is None  # no autocast on the CPU


def test_cuda_model_computes_in_the_autocast_dtype():
    model = torch.nn.Linear(2, 2)  # stays on the CPU: only the device it would run on matters here
    bf16 = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"  # fp16 without bf16
    for precision, expected in (("bf16", bf16), ("fp16", "fp16"), ("fp32", "fp32"), ("auto", "fp32")):
        enc = types.SimpleNamespace(model=model, device=torch.device("cuda"), precision=precision)
        info = ran_in(enc)
        assert info["computes"] == expected and info["weights"] == ["fp32"]
        assert info["autocast"] == (None if expected == "fp32" else expected)
