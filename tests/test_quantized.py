"""A 4-bit base on CPU (bitsandbytes' CPU backend): QPiSSA residuals, EVA on the quantized model, gradients from a full-precision copy."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cls_config, run_cli, write_config

from adapterflow.adapters import InitContext, LoraSettings, apply_init, export_init, initialize
from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.adapters.quantized import dequantized_weight
from adapterflow.tasks.config import ModelSpec, RunConfig
from adapterflow.tasks.model_io import full_precision_lookup, load_model, resolve_base

TARGETS = ("q_proj", "v_proj")


def _llama(folder, quantization=None):
    torch.manual_seed(0)
    return load_model(resolve_base(ModelSpec(path=str(folder))), "causal_lm", None, "float32", quantization)


def test_qpissa_quantizes_the_residual_with_less_error_than_the_weight(tiny_llama, tmp_path):
    settings = LoraSettings(r=8, alpha=8, dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    probe = {"input_ids": torch.randint(5, 2000, (2, 10), generator=torch.Generator().manual_seed(1))}
    peft_model, _ = initialize(_llama(tiny_llama), settings, "pissa", InitContext(probe=probe))
    init_dir = export_init(peft_model, tmp_path / "init", "pissa")
    lookup = full_precision_lookup(resolve_base(ModelSpec(path=str(tiny_llama))), "causal_lm", None, "float32")
    qpissa = apply_init(_llama(tiny_llama, "nf4"), init_dir, lookup)
    plain_4bit = dict(_llama(tiny_llama, "nf4").named_modules())
    for name, module in lora_layers(qpissa):
        b, a, scaling = delta_factors(module)
        weight = lookup(short_name(name))
        qpissa_error = (dequantized_weight(module.base_layer) + scaling * b @ a - weight).norm()
        plain_error = (dequantized_weight(plain_4bit[short_name(name)]) - weight).norm()
        assert qpissa_error < 0.97 * plain_error, name


def _run_config(tiny_bert, cls_data, method, **extra):
    init = {"method": method, **extra}
    return RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": init, "model.quantization": "nf4"}))


@pytest.mark.parametrize("method", ["pissa", "eva", "lora_sb"])
def test_quantized_base_trains_and_registers_a_plain_adapter(tiny_bert, cls_data, tmp_path, method):
    from peft import PeftModel

    from adapterflow.tasks.evaluate import evaluate_adapter
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.train import train_adapter

    config = _run_config(tiny_bert, cls_data, method, **({"batches": 2} if method == "lora_sb" else {}))
    base_ref = resolve_base(config.model)
    outcome = initialize_adapter(config, base_ref, tmp_path / "run", None)
    notes = " ".join(json.loads(open(outcome.report_path).read())["notes"])
    assert ("full-precision base" in notes) == (method != "eva")  # EVA looks at the quantized model's activations
    result = train_adapter(config, base_ref, outcome.init_dir, tmp_path / "run")
    assert result.steps == 4
    metrics = evaluate_adapter(config, base_ref, result.adapter_dir, "test")
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] < 2 * math.log(len(config.data.labels))
    untouched = load_model(base_ref, config.task, config.data.labels)  # full precision, unmodified
    reloaded = PeftModel.from_pretrained(untouched, result.adapter_dir)
    assert {short_name(name).rsplit(".", 1)[-1] for name, _ in lora_layers(reloaded)} == {"query", "value"}


@pytest.mark.slow  # starts a fresh interpreter
def test_loftq_without_cuda_is_refused_before_any_compute(tiny_bert, cls_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: LoftQ is allowed")
    config = cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "loftq"}, "model.quantization": "nf4"})
    result = run_cli("check", str(write_config(tmp_path / "c.yaml", config)), home=tmp_path / "state")
    assert result.returncode == 2
    assert "loftq runs only on CUDA" in result.stderr and "pissa with model.quantization: nf4" in result.stderr


@pytest.mark.slow  # starts a fresh interpreter
def test_loftq_without_a_4bit_base_is_refused(tiny_bert, cls_data, tmp_path):
    config = cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "loftq"}})
    result = run_cli("check", str(write_config(tmp_path / "c.yaml", config)), home=tmp_path / "state")
    assert result.returncode == 2 and "set model.quantization: nf4" in result.stderr


def test_only_methods_that_support_a_quantized_base_run_on_it():
    """supports_quantized=False: computed on the full-precision base (the residual or adapter is quantized later)."""
    from test_config import _throwaway_method

    from adapterflow.tasks.init_adapter import runs_in_full_precision

    methods = ("lora", "gaussian", "orthogonal", "pissa", "milora", "olora", "eva", "corda", "lora_ga", "lora_sb", "loftq")
    full = {m: runs_in_full_precision(m) for m in methods}
    assert [m for m, yes in full.items() if not yes] == ["lora", "gaussian", "eva"]
    with _throwaway_method(supports_quantized=False):
        assert runs_in_full_precision("throwaway")
