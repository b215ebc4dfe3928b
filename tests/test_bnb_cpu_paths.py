"""A 4-bit base on CPU takes one of two bitsandbytes paths: packed (the fused AVX512-BF16 kernel) or unpacked.

bitsandbytes 0.50.2 repacks a Linear4bit in eval mode when the CPU has AVX512-BF16, and cannot train the
packed layer afterwards (tasks/bnb_cpu.py). The repacking is plain torch, so the packed path is forced on any
CPU by patching the check Linear4bit makes; the kernel that computes with a packed weight is native
AVX512-BF16 code, so only the tests that run it need such a CPU.
"""

from __future__ import annotations

import json
import math

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.nn import modules as bnb_modules
from conftest import cls_config

from adapterflow.tasks.bnb_cpu import SWITCH, configure_cpu_packing, cpu_path
from adapterflow.tasks.config import ModelSpec, RunConfig
from adapterflow.tasks.model_io import load_model, resolve_base

HAS_PACKED_KERNEL = bool(bnb_modules.has_avx512bf16())  # read before any test patches it
needs_packed_kernel = pytest.mark.skipif(
    not HAS_PACKED_KERNEL,
    reason="computing with a packed 4-bit weight runs bitsandbytes' native AVX512-BF16 kernel, which this CPU lacks; "
           "the repacking and the training-path tests force the packed path and run here",
)


class PackSpy:
    """Forces bitsandbytes' choice of path; counts the layers it packs and the training steps through a packed layer."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.packed_layers, self.packed_training_calls = monkeypatch, 0, 0
        real_pack, real_forward = bnb_modules._convert_weight_packed_for_cpu, bnb.nn.Linear4bit.forward

        def counting(*args, **kwargs):
            self.packed_layers += 1
            return real_pack(*args, **kwargs)

        def forward(layer, x):
            if layer.training and getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
                self.packed_training_calls += 1
            return real_forward(layer, x)

        monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", counting)
        monkeypatch.setattr(bnb.nn.Linear4bit, "forward", forward)

    def force(self, packed: bool) -> PackSpy:
        self.monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: packed)
        self.packed_layers = 0
        return self


@pytest.fixture
def spy(monkeypatch) -> PackSpy:
    return PackSpy(monkeypatch)


def _config(tiny_bert, cls_data, **overrides) -> RunConfig:
    settings = {"model.quantization": "nf4", "train.max_steps": 6, "train.eval_every": 2, "train.checkpoint_every": 6, **overrides}
    return RunConfig.model_validate(cls_config(tiny_bert, cls_data, **settings))


def _train(config, run_dir, spy: PackSpy, packed: bool):
    """The init stage on this CPU's own path (its invariant check computes with the init model), then training on `packed`."""
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.train import train_adapter

    base_ref = resolve_base(config.model)
    outcome = initialize_adapter(config, base_ref, run_dir, None)
    spy.force(packed)
    result = train_adapter(config, base_ref, outcome.init_dir, run_dir)
    assert spy.packed_training_calls == 0
    log = json.loads((run_dir / "train_log.json").read_text())
    return result, {row["step"]: row["eval_loss"] for row in log if "eval_loss" in row}


def test_training_resumes_after_periodic_evaluations_and_the_curve_is_the_same_on_both_paths(tiny_bert, cls_data, tmp_path, spy):
    """train → evaluate → train again, three times; the packed path (forced) leaves the training model unpacked."""
    config = _config(tiny_bert, cls_data)
    curves = {}
    for packed in (True, False):
        result, curves[packed] = _train(config, tmp_path / str(packed), spy, packed)
        assert result.steps == 6 and math.isfinite(result.train_loss)
        assert spy.packed_layers == 0  # the training model, periodic evaluations included, was never packed
    assert sorted(curves[True]) == [2, 4, 6]
    for step, loss in curves[False].items():
        assert math.isfinite(loss) and abs(curves[True][step] - loss) <= 0.01 * loss, (step, curves)


@pytest.mark.slow
def test_the_race_on_a_4bit_base_runs_through_its_rounds(tiny_bert, cls_data, tmp_path, spy):
    """On this CPU's own path: the race's init stages compute with packed layers where the CPU can."""
    from adapterflow.tasks.init_adapter import initialize_adapter

    spy.force(HAS_PACKED_KERNEL)
    init = {"method": "auto", "candidates": ["lora", "pissa"], "lr_multipliers": [0.5, 1.0], "budget": 0.1}
    config = _config(tiny_bert, cls_data, **{"adapter.init": init, "train.max_steps": 80, "train.eval_every": None})
    outcome = initialize_adapter(config, resolve_base(config.model), tmp_path / "run", None)
    race = json.loads(open(outcome.report_path).read())["race"]["contenders"]
    assert len(race) == 4 and max(len(row["rounds"]) for row in race) >= 2
    assert all(math.isfinite(r["eval_loss"]) for row in race for r in row["rounds"])
    assert spy.packed_training_calls == 0  # each round evaluates, and the next one trains the contender on


@needs_packed_kernel
def test_the_final_evaluation_uses_the_packed_kernel_and_agrees_with_the_unpacked_path(tiny_bert, cls_data, tmp_path, spy):
    from adapterflow.tasks.evaluate import evaluate_adapter

    config = _config(tiny_bert, cls_data, **{"train.eval_every": None})
    result, _ = _train(config, tmp_path / "run", spy, True)
    base_ref = resolve_base(config.model)
    for adapter in (None, result.adapter_dir):  # the bare base (step 0) and the trained adapter
        unpacked = evaluate_adapter(config, base_ref, adapter, "validation")
        assert spy.force(False).packed_layers == 0
        spy.force(True)
        packed = evaluate_adapter(config, base_ref, adapter, "validation")
        assert spy.packed_layers > 0
        assert abs(packed["eval_loss"] - unpacked["eval_loss"]) <= 0.01 * unpacked["eval_loss"], (packed, unpacked)
        assert packed["accuracy"] == pytest.approx(unpacked["accuracy"], abs=1 / 18 + 1e-9)  # one of 18 rows may flip


def _narrow_bert(tmp_path):
    from adapterflow.tasks.tiny_models import make_tiny_bert

    folder = make_tiny_bert(tmp_path / "narrow", hidden=32)
    return load_model(resolve_base(ModelSpec(path=str(folder))), "sequence_classification", ["a", "b", "c"], "float32", "nf4")


def test_layers_narrower_than_the_block_size_are_never_packed(tmp_path, spy):
    spy.force(True)
    model = _narrow_bert(tmp_path)
    flags = {name: layer.support_avx512bf16_for_cpu for name, layer in model.named_modules() if isinstance(layer, bnb.nn.Linear4bit)}
    assert not flags["bert.encoder.layer.0.attention.self.query"]  # 32 wide: bitsandbytes' packing would fail
    assert flags["bert.encoder.layer.0.output.dense"]  # 64 in, 32 out: packable
    reasons = configure_cpu_packing(model, training=False)
    assert reasons["bert.encoder.layer.0.attention.self.query"] == "input width 32 is not a multiple of the 4-bit block size 64"
    assert "bert.encoder.layer.0.output.dense" not in reasons
    if HAS_PACKED_KERNEL:  # the packed kernel runs on the layers that can take it, the rest stay unpacked
        ids = torch.randint(5, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.isfinite(model.eval()(input_ids=ids).logits).all()
        assert spy.packed_layers == 2  # output.dense of each of the two layers


def test_the_switch_and_the_training_flag_keep_every_layer_unpacked(tiny_bert, monkeypatch, spy):
    spy.force(True)
    ref = resolve_base(ModelSpec(path=str(tiny_bert)))

    def flags(**kwargs):
        model = load_model(ref, "sequence_classification", ["a", "b", "c"], "float32", "nf4", **kwargs)
        return {layer.support_avx512bf16_for_cpu for layer in model.modules() if isinstance(layer, bnb.nn.Linear4bit)}

    assert flags() == {True}  # tiny BERT's widths are multiples of 64, as a real model's are
    assert flags(training=True) == {False}
    monkeypatch.setenv(SWITCH, "0")
    assert flags() == {False}


def test_cpu_path_says_which_path_and_why(monkeypatch, spy):
    assert cpu_path(None) is None and cpu_path("int8") is None and cpu_path("nf4", device="cuda") is None
    spy.force(True)
    assert str(cpu_path("nf4")).startswith("bitsandbytes CPU path: packed (AVX512-BF16")
    assert cpu_path("fp4").packed
    spy.force(False)
    assert str(cpu_path("nf4")) == "bitsandbytes CPU path: unpacked (this CPU has no AVX512-BF16)"
    spy.force(True)
    monkeypatch.setenv(SWITCH, "0")
    assert str(cpu_path("nf4")) == f"bitsandbytes CPU path: unpacked (turned off by {SWITCH}=0)"


@needs_packed_kernel
def test_bitsandbytes_still_cannot_train_a_layer_it_packed():
    """Why tasks/bnb_cpu.py exists (bitsandbytes 0.50.2). If this fails, bitsandbytes unpacks by itself now
    and the workaround may go."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(64, 32).state_dict())
    layer = layer.to("cpu").eval()
    with torch.no_grad():
        layer(torch.randn(3, 64))
    assert layer.weight.quant_state.packing_format_for_cpu
    x = torch.randn(3, 64, requires_grad=True)
    with pytest.raises(RuntimeError):
        layer.train()(x).sum().backward()


@pytest.mark.slow  # starts a fresh interpreter
def test_the_missing_kernels_notice_is_dropped_and_nothing_else():
    """bitsandbytes logs at import, on AVX512-BF16 CPUs, that the optional `kernels` package is absent."""
    import subprocess
    import sys

    script = (
        "import logging, adapterflow.tasks.state, bitsandbytes\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning("
        "'Failed to load CPU gemm_4bit_forward from kernels-community: %s.', RuntimeError('kernels 0.9 is too old'))\n"
    )
    stderr = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stderr
    assert "No module named 'kernels'" not in stderr
    assert "kernels 0.9 is too old" in stderr
