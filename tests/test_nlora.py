"""NLoRA and IntTune on tiny BERT and Llama: the Nyström approximation, recomputed here by another route, moves into
the adapter; training touches the right factors; the saved adapter is plain LoRA for the untouched base."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_inits import ALPHA, ARCHS, R
from tiny_inits import probe as _probe
from tiny_inits import tiny_model as _model

from adapterflow.adapters import (
    InitContext,
    InitError,
    LoraSettings,
    apply_init,
    export_init,
    get_initializer,
    initialize,
    save_trained_adapter,
)
from adapterflow.adapters.frozen_factors import structure_of
from adapterflow.adapters.invariants import model_outputs
from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.adapters.methods.nlora import sketch, verify_nlora
from adapterflow.tasks.model_io import load_model, resolve_base


def _settings(arch, method="nlora", **knobs):
    _, targets, task_type = ARCHS[arch]
    init = get_initializer(method).config(method=method, **knobs)
    return LoraSettings(r=R, alpha=ALPHA, dropout=0.0, target_modules=targets, task_type=task_type, init=init)


def _batch(arch):
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 2000, (8, 16), generator=generator)
    return {"input_ids": ids, "labels": torch.randint(0, 3, (8,), generator=generator) if arch == "bert" else ids.clone()}


def _nystrom_by_pinv(weight: torch.Tensor, omega: torch.Tensor, psi: torch.Tensor, r: int) -> torch.Tensor:
    """W·Ω·[Ψᵀ·W·Ω]_r⁺·Ψᵀ·W in float64 with torch's pinv of the rank-r truncated core: not the module's route."""
    w, omega, psi = weight.double(), omega.double(), psi.double()
    u, s, vh = torch.linalg.svd(psi.T @ w @ omega, full_matrices=False)
    truncated = (u[:, :r] * s[:r]) @ vh[:r]
    return (w @ omega @ torch.linalg.pinv(truncated, rtol=1e-10) @ psi.T @ w).float()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("knobs", [{}, {"niter": 1, "oversampling": 4, "seed": 7}], ids=["defaults", "niter1-p4-seed7"])
def test_adapter_holds_the_nystrom_approximation_and_outputs_are_preserved(folders, arch, knobs):
    original = {n: m.weight.detach().clone() for n, m in _model(folders[arch], arch).named_modules() if n.endswith(ARCHS[arch][1])}
    settings = _settings(arch, **knobs)
    peft_model, report = initialize(_model(folders[arch], arch), settings, "nlora", InitContext(probe=_probe()))
    assert report.checks["max_output_change"] <= 1e-5 and report.checks["max_sketch_residual"] < 1e-4
    layers = dict(lora_layers(peft_model))
    assert len(layers) == len(original)
    for name, module in layers.items():
        b, a, scaling = delta_factors(module)
        weight = original[short_name(name)]
        sk = sketch(weight.float(), R, settings.init, short_name(name))  # the random draws only
        expected = _nystrom_by_pinv(weight, sk.omega, sk.psi, R)
        assert torch.allclose(scaling * b @ a, expected, atol=1e-4 * expected.abs().max()), name
        assert torch.allclose(module.base_layer.weight + scaling * b @ a, weight, atol=1e-5)
        assert torch.linalg.matrix_rank(b @ a) == R  # not plain LoRA's B = 0
    assert structure_of(peft_model) == "all"


def test_different_seeds_draw_different_sketches(folders):
    deltas = []
    for seed in (0, 1):
        peft_model, _ = initialize(_model(folders["bert"], "bert"), _settings("bert", seed=seed), "nlora", InitContext(probe=_probe()))
        b, a, s = delta_factors(next(module for _, module in lora_layers(peft_model)))
        deltas.append(s * b @ a)
    assert (deltas[0] - deltas[1]).norm() > 1e-3 * deltas[0].norm()


def test_verify_refuses_plain_lora_and_another_rank_r_approximation(folders):
    from peft import get_peft_model

    plain = get_peft_model(_model(folders["bert"], "bert"), _settings("bert").lora_config(True))
    with pytest.raises(InitError, match="did not move the Nyström approximation .* keeps 1.0e\\+00"):
        verify_nlora(plain, _settings("bert"))
    pissa, _ = initialize(_model(folders["bert"], "bert"), _settings("bert", "pissa"), "pissa", InitContext(probe=_probe()))
    with pytest.raises(InitError, match="did not move the Nyström approximation"):  # the top-r SVD is not W_nys
        verify_nlora(pissa, _settings("bert"))


def test_verify_refuses_an_adapter_not_in_its_training_form(folders):
    from adapterflow.adapters.frozen_factors import fold_middle

    peft_model, _ = initialize(_model(folders["bert"], "bert"), _settings("bert"), "nlora", InitContext(probe=_probe()))
    fold_middle(peft_model)
    with pytest.raises(InitError, match="trains as plain LoRA, not in the B·M·A form"):
        verify_nlora(peft_model, _settings("bert"))


def _factors(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, M, A) of a structured layer, whichever factors train."""
    lora_b = module.lora_B["default"]
    form, held = lora_b.parametrizations.weight[0], lora_b.parametrizations.weight.original.detach().clone()
    left, middle = (form.basis.clone(), held) if hasattr(form, "basis") else (held[:-R], held[-R:])
    return left, middle, module.lora_A["default"].weight.detach().clone()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("trainable", ["all", "intermediate"])
def test_trains_the_chosen_factors_and_saves_plain_lora_for_the_untouched_base(folders, tmp_path, arch, trainable):
    from peft import PeftModel

    peft_model, _ = initialize(_model(folders[arch], arch), _settings(arch, trainable=trainable), "nlora", InitContext(probe=_probe()))
    init_dir = export_init(peft_model, tmp_path / "init", "nlora")
    assert structure_of(peft_model) == trainable  # exporting keeps the caller's model in its form
    assert json.loads((init_dir / "adapterflow_init.json").read_text())["structure"] == trainable
    trained = apply_init(_model(folders[arch], arch), init_dir)
    base_out = model_outputs(_model(folders[arch], arch), _probe())
    assert (model_outputs(trained, _probe()) - base_out).abs().max() <= 1e-5 * max(1.0, base_out.abs().max())
    lora_trainable = [p for n, p in trained.named_parameters() if p.requires_grad and "lora_" in n]
    layer_count = len(list(lora_layers(trained)))
    if trainable == "intermediate":  # IntTune: one r×r M per layer, nothing else of the adapter
        assert len(lora_trainable) == layer_count and all(tuple(p.shape) == (R, R) for p in lora_trainable)
    else:  # A, and B stacked on M
        assert len(lora_trainable) == 2 * layer_count
    before = {name: _factors(module) for name, module in lora_layers(trained)}
    optimizer = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        trained(**_batch(arch)).loss.backward()
        optimizer.step()
    for name, module in lora_layers(trained):
        (b0, m0, a0), (b, m, a) = before[name], _factors(module)
        assert not torch.allclose(m, m0)  # M trains in both forms
        assert torch.equal(b, b0) == (trainable == "intermediate"), name
        assert torch.equal(a, a0) == (trainable == "intermediate"), name
        assert torch.allclose(b @ m, module.lora_B["default"].weight)  # lora_B is B·M
    tuned = model_outputs(trained, _probe())
    assert (tuned - base_out).abs().max() > 1e-4
    trained.save_pretrained(tmp_path / "checkpoint")  # as the Trainer checkpoints, and resumes (a race's survivors)
    resumed = apply_init(_model(folders[arch], arch), init_dir)
    resumed.load_adapter(str(tmp_path / "checkpoint"), "default", is_trainable=True)
    assert torch.allclose(model_outputs(resumed, _probe()), tuned, atol=1e-6)
    save_trained_adapter(trained, tmp_path / "adapter", init_dir)

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 2 * R  # the tuned delta minus the Nyström part taken out of the base
    reloaded = PeftModel.from_pretrained(_model(folders[arch], arch), str(tmp_path / "adapter"))
    assert all("parametrizations" not in name for name, _ in reloaded.named_parameters())
    assert torch.allclose(model_outputs(reloaded, _probe()), tuned, atol=1e-5)


@pytest.mark.parametrize("trainable, quantization", [("all", None), ("intermediate", None), ("all", "nf4")])
def test_trains_through_the_flow_stages_and_registers_plain_lora(tiny_bert, cls_data, tmp_path, trainable, quantization):
    """With the Trainer and its checkpoints; on a 4-bit base the sketch is of the full-precision W, the residual quantized."""
    from conftest import cls_config
    from peft import PeftModel

    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.train import train_adapter

    overrides = {"adapter.init": {"method": "nlora", "trainable": trainable}, "model.quantization": quantization}
    config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **overrides))
    base_ref = resolve_base(config.model)
    outcome = initialize_adapter(config, base_ref, tmp_path / "run", tmp_path / "cache")
    assert outcome.checks["max_sketch_residual"] < 1e-4
    result = train_adapter(config, base_ref, outcome.init_dir, tmp_path / "run")
    assert result.steps == 4 and (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 2 * R
    untouched = load_model(base_ref, config.task, config.data.labels)  # full precision
    reloaded = PeftModel.from_pretrained(untouched, result.adapter_dir)
    assert all("parametrizations" not in name for name, _ in reloaded.named_parameters())


@pytest.mark.parametrize(
    "adapter, expected",
    [
        ({"init": {"method": "nlora", "trainable": "freeze"}}, "adapter.init.nlora.trainable"),
        ({"init": {"method": "nlora", "oversampling": -1}}, "adapter.init.nlora.oversampling"),
        ({"init": {"method": "nlora", "niter": 99}}, "adapter.init.nlora.niter"),
        ({"init": {"method": "nlora", "sketch": "gaussian"}}, "adapter.init.nlora.sketch: unknown key"),
        ({"init": {"method": "nlora"}, "loraplus_lr_ratio": 16}, "trains an r×r matrix between B and A"),
        ({"init": {"method": "nlora", "trainable": "intermediate"}, "variant": "dora"}, "it rewrites the base"),
    ],
    ids=["trainable", "oversampling", "niter", "unknown-key", "loraplus", "dora"],
)
def test_bad_nlora_knobs_get_one_clear_error(tiny_bert, cls_data, tmp_path, adapter, expected):
    from conftest import cls_config, write_config

    from adapterflow.errors import ConfigError
    from adapterflow.tasks.config import load_config

    config = cls_config(tiny_bert, cls_data)
    config["adapter"].update(adapter)
    with pytest.raises(ConfigError, match=expected):
        load_config(write_config(tmp_path / "c.yaml", config))
