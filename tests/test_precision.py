"""Precision `auto` picks what the device can do; the GPU branch is exercised on CPU by faking the device's answer."""

from __future__ import annotations

import pytest

from adapterflow.tasks.train import resolve_precision


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu_is_bf16_where_supported_else_fp16(monkeypatch, bf16, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert resolve_precision("auto", "cuda") == expected


def test_auto_on_cpu_is_fp32_and_an_explicit_choice_is_kept():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
