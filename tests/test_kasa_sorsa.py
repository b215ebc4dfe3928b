"""KaSA (peft's) and SORSA (ours) on tiny BERT and Llama: init checked against an SVD computed here, their
regularizers in the training loss, and the trained adapter converted to plain LoRA for the untouched base."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_inits import ALPHA, ARCHS, R, tiny_model
from tiny_inits import probe as _probe

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
from adapterflow.adapters.invariants import model_outputs
from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.errors import ConfigError
from adapterflow.tasks.config import ModelSpec
from adapterflow.tasks.model_io import load_model, resolve_base

METHODS = ("kasa", "sorsa")


def _model(folder, arch):
    return tiny_model(folder, arch, dropout=True)  # as the flow loads it; outputs are compared in eval mode


def _settings(arch, method, r=R, **adapter):
    _, targets, task_type = ARCHS[arch]
    return LoraSettings(
        r=r, alpha=ALPHA, dropout=0.0, target_modules=targets, task_type=task_type, init=get_initializer(method).default_config(), **adapter
    )


def _batch(arch):
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 2000, (8, 16), generator=generator)
    return {"input_ids": ids, "labels": torch.randint(0, 3, (8,), generator=generator) if arch == "bert" else ids.clone()}


def _init(folders, arch, method, **adapter):
    return initialize(_model(folders[arch], arch), _settings(arch, method, **adapter), method, InitContext(probe=_probe()))


def _targets(model, arch) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach().clone() for name, module in model.named_modules() if name.endswith(ARCHS[arch][1])}


def _svd(weight):
    return torch.linalg.svd(weight.float(), full_matrices=False)


def _effective_weights(model) -> dict[str, torch.Tensor]:
    """What each adapted layer computes, base + s·B·(diag)·A: the tiny models' outputs barely feel their minor components."""
    weights = {}
    for name, module in lora_layers(model):
        b, a, scaling = delta_factors(module)
        if "default" in getattr(module, "lora_diag", {}):
            b = b * module.lora_diag["default"].detach().float()
        weights[short_name(name)] = module.base_layer.weight.detach().float() + scaling * b @ a
    return weights


@pytest.mark.parametrize("arch", ARCHS)
def test_kasa_removes_exactly_the_r_minor_components_and_starts_with_a_zero_update(folders, arch):
    base = _model(folders[arch], arch)
    original = _targets(base, arch)
    peft_model, report = _init(folders, arch, "kasa")
    assert report.checks["max_initial_delta"] == 0 and report.checks["max_removed_energy_share"] <= 1.0
    layers = dict(lora_layers(peft_model))
    assert len(layers) == len(original)
    for name, module in layers.items():
        u, s, vh = _svd(original[short_name(name)])
        kept = len(s) - R
        assert torch.allclose(module.base_layer.weight, (u[:, :kept] * s[:kept]) @ vh[:kept], atol=1e-5)
        assert report.spectra[short_name(name)] == pytest.approx(s[kept:].tolist(), rel=1e-3)
        assert module.lora_diag["default"].requires_grad
    with torch.no_grad():  # the same truncation, done here: KaSA's model computes exactly that
        for name, module in base.named_modules():
            if name in original:
                u, s, vh = _svd(original[name])
                module.weight.copy_((u[:, :-R] * s[:-R]) @ vh[:-R])
    assert torch.allclose(model_outputs(peft_model, _probe()), model_outputs(base, _probe()), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sorsa_holds_the_top_r_svd_as_vectors_and_values_and_preserves_outputs(folders, arch):
    original = _targets(_model(folders[arch], arch), arch)
    peft_model, report = _init(folders, arch, "sorsa")
    assert report.checks["max_output_change"] <= 1e-5 and report.checks["max_orthonormality_error"] <= 1e-4
    for name, module in lora_layers(peft_model):
        u, s, vh = _svd(original[short_name(name)])
        a, b, scaling = module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
        signs = torch.sign((a * vh[:R]).sum(dim=1))  # singular vectors are unique up to sign
        assert torch.allclose(a, signs[:, None] * vh[:R], atol=1e-4)
        assert torch.allclose(scaling * b, u[:, :R] * (s[:R] * signs), atol=1e-4)
        assert torch.allclose(module.base_layer.weight, (u[:, R:] * s[R:]) @ vh[R:], atol=1e-5)


@pytest.mark.parametrize(
    "arch, adapter",
    [
        ("bert", {}),
        ("llama", {}),
        ("bert", {"variant": "rslora", "rank_pattern": {"value": 2}}),
    ],
    ids=["bert", "llama", "bert-rslora-pattern"],
)
@pytest.mark.parametrize("method", METHODS)
def test_the_trained_adapter_is_a_plain_rank_2r_lora_that_reloads_on_the_untouched_base(folders, tmp_path, method, arch, adapter):
    """Scaling kept through the conversion: r and alpha double (alpha ×√2 under rsLoRA), each pattern entry alike."""
    from peft import PeftModel
    from safetensors.torch import load_file

    peft_model, _ = _init(folders, arch, method, **adapter)
    init_dir = export_init(peft_model, tmp_path / "init", method)
    trained = apply_init(_model(folders[arch], arch), init_dir)
    assert torch.allclose(model_outputs(trained, _probe()), model_outputs(peft_model, _probe()), atol=1e-5)
    with torch.no_grad():  # stands in for training: move every trainable tensor (KaSA's singular values, SORSA's U and S)
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    tuned = model_outputs(trained, _probe())
    save_trained_adapter(trained, tmp_path / "adapter", init_dir)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["rank_pattern"], config.get("kasa_config")) == (2 * R, {"value": 4} if adapter else {}, None)
    assert not [key for key in load_file(tmp_path / "adapter" / "adapter_model.safetensors") if "lora_diag" in key or "parametriz" in key]
    reloaded = PeftModel.from_pretrained(_model(folders[arch], arch), str(tmp_path / "adapter"))
    assert torch.allclose(model_outputs(reloaded, _probe()), tuned, atol=1e-5)
    expected = _effective_weights(trained)
    assert all(torch.allclose(weight, expected[name], atol=1e-5) for name, weight in _effective_weights(reloaded).items())


def _regularized_trainer(model, tmp_path, regularizer):
    from transformers import TrainingArguments

    from adapterflow.tasks.regularized_trainer import RegularizedTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, per_device_train_batch_size=8)
    return RegularizedTrainer(model=model, args=args, regularizer=regularizer)


def _kasa_loss_here(model, beta=1e-4, gamma=1e-3) -> torch.Tensor:
    """KaSA's regularizer written out from the paper's terms, to check peft's."""
    total = 0.0
    for _, module in lora_layers(model):
        a, b, d = module.lora_A["default"].weight, module.lora_B["default"].weight, module.lora_diag["default"]
        eye = torch.eye(R)
        total = total + beta * (d**2).sum() + gamma * (torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye))
    return total


@pytest.mark.parametrize("method", METHODS)
def test_the_loss_adds_weight_times_the_regularizer_and_its_gradient(folders, tmp_path, method):
    from adapterflow.tasks.regularized_trainer import BoundRegularizer, init_regularizer

    peft_model, _ = _init(folders, "bert", method)
    model = apply_init(_model(folders["bert"], "bert"), export_init(peft_model, tmp_path / "init", method))
    with torch.no_grad():  # away from init, where SORSA's regularizer is zero
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    regularizer = init_regularizer(tmp_path / "init", learning_rate=2e-3)
    assert regularizer.weight == pytest.approx(1.0 if method == "kasa" else 4e-4 / 2e-3)  # peft's loss as is; the reference's γ/lr
    if method == "kasa":
        assert regularizer.value(model).item() == pytest.approx(_kasa_loss_here(model).item(), rel=1e-5)
    model.train()
    losses, grads = {}, {}
    for weight in (0.0, 3.0):
        trainer = _regularized_trainer(model, tmp_path, BoundRegularizer(regularizer.value, weight))
        model.zero_grad()
        losses[weight] = trainer.compute_loss(model, _batch("bert"))
        losses[weight].backward()
        grads[weight] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    value = regularizer.value(model)
    assert value.item() > 1e-3
    assert (losses[3.0] - losses[0.0]).item() == pytest.approx(3.0 * value.item(), rel=1e-4)
    model.zero_grad()
    (3.0 * value).backward()
    moved = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0]
    assert moved  # the regularizer reaches the adapter's factors
    for name in moved:
        assert torch.allclose(grads[3.0][name] - grads[0.0][name], model.get_parameter(name).grad, atol=1e-5)


@pytest.mark.parametrize("scaled_by_the_model", [False, True])
def test_the_regularizer_counts_once_per_optimizer_step_under_gradient_accumulation(folders, tmp_path, scaled_by_the_model):
    """Two micro-batches of one step: the regularizer's share of the accumulated gradient is weight × ∇R, whether the
    Trainer divides each micro-batch's loss by the accumulation steps or leaves that to the model."""
    from adapterflow.tasks.regularized_trainer import BoundRegularizer, init_regularizer

    peft_model, _ = _init(folders, "bert", "sorsa")
    model = apply_init(_model(folders["bert"], "bert"), export_init(peft_model, tmp_path / "init", "sorsa"))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    value = init_regularizer(tmp_path / "init", learning_rate=1e-3).value
    accumulated = {}
    for weight in (0.0, 2.0):
        trainer = _regularized_trainer(model, tmp_path, BoundRegularizer(value, weight))
        trainer.loss_is_scaled_for_ga, trainer.current_gradient_accumulation_steps = scaled_by_the_model, 2
        model.zero_grad()
        for _ in range(2):
            trainer.training_step(model, _batch("bert"), num_items_in_batch=8)
        accumulated[weight] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    (2.0 * value(model)).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            expected = param.grad if param.grad is not None else torch.zeros_like(param)
            assert torch.allclose(accumulated[2.0][name] - accumulated[0.0][name], expected, atol=1e-5), name


@pytest.mark.parametrize("method", METHODS)
def test_training_puts_the_regularizer_in_the_loss_logs_it_and_saves_a_plain_adapter(tiny_bert, cls_data, tmp_path, method):
    """Through the flow's own stages: the configured weight reaches training, train/regularizer reaches the journal."""
    from conftest import cls_config
    from peft import PeftModel

    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.journal import JOURNAL_FILE
    from adapterflow.tasks.regularized_trainer import init_regularizer
    from adapterflow.tasks.train import train_adapter

    overrides = {"adapter.init": {"method": method, "regularizer_weight": 0.5}, "train.max_steps": 2, "train.eval_every": 2}
    config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **overrides))
    base_ref = resolve_base(config.model)
    outcome = initialize_adapter(config, base_ref, tmp_path / "run", tmp_path / "cache")
    assert init_regularizer(outcome.init_dir, config.train.learning_rate).weight == 0.5  # the configured weight, not the default
    result = train_adapter(config, base_ref, outcome.init_dir, tmp_path / "run")

    logged = [r["metrics"] for r in map(json.loads, (tmp_path / "run" / JOURNAL_FILE).read_text().splitlines()) if r["event"] == "log"]
    steps, evaluations = [m for m in logged if "train/loss" in m], [m for m in logged if "eval/loss" in m]
    assert len(steps) == result.steps == 2 and len(evaluations) == 1
    assert steps[-1]["train/regularizer"] > 1e-4 and all(m["train/regularizer_weight"] == 0.5 for m in steps)
    assert not any(key.startswith("eval/regular") for key in evaluations[0])
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 2 * 4
    PeftModel.from_pretrained(load_model(base_ref, config.task, config.data.labels), result.adapter_dir)


def test_a_method_without_a_regularizer_trains_with_the_plain_trainer(tiny_bert, tmp_path):
    from transformers import Trainer

    from adapterflow.tasks.regularized_trainer import trainer_class

    peft_model, _ = initialize(_model(tiny_bert, "bert"), _settings("bert", "pissa"), "pissa", InitContext(probe=_probe()))
    assert trainer_class(export_init(peft_model, tmp_path / "init", "pissa"), 1e-3) is Trainer


def test_the_checks_refuse_a_plain_lora_fallback(folders):
    """Plain LoRA where KaSA or SORSA was asked for: the init checks, training's setup and the regularizers refuse it."""
    from peft import get_peft_model

    from adapterflow.adapters.methods.kasa import kasa_loss, require_kasa_layers, verify_kasa
    from adapterflow.adapters.methods.sorsa import orthonormality, verify_sorsa

    plain = get_peft_model(_model(folders["bert"], "bert"), _settings("bert", "kasa").lora_config(True))
    for check in (lambda: verify_kasa(plain, None), lambda: require_kasa_layers(plain), lambda: kasa_loss(plain, None)):
        with pytest.raises(InitError, match="plain LoRA|no KaSA layer"):
            check()
    for check in (lambda: verify_sorsa(plain, None), lambda: orthonormality(plain, None)):
        with pytest.raises(InitError, match="plain LoRA"):
            check()


def test_kasa_on_a_4bit_base_is_refused_when_training_starts_instead_of_training_plain_lora(tiny_bert, tmp_path):
    """peft's bitsandbytes layers ignore kasa_config: the initial adapter would load as plain LoRA without a word."""
    peft_model, _ = _init({"bert": tiny_bert}, "bert", "kasa")
    init_dir = export_init(peft_model, tmp_path / "init", "kasa")
    ref = resolve_base(ModelSpec(path=str(tiny_bert)))
    full = {name: module.weight for name, module in _model(tiny_bert, "bert").named_modules() if isinstance(module, torch.nn.Linear)}
    quantized = load_model(ref, "sequence_classification", ["a", "b", "c"], quantization="nf4", training=True)
    with pytest.raises(InitError, match="not KaSA: peft's 4-bit and 8-bit layers ignore KaSA.*model.quantization: null"):
        apply_init(quantized, init_dir, lambda name: full[name])


def test_the_kasa_check_refuses_a_base_that_lost_its_principal_components(folders):
    """As if peft had dropped the r largest components: same split structure, wrong end of the spectrum."""
    from adapterflow.adapters.methods.kasa import verify_kasa

    original = _targets(_model(folders["bert"], "bert"), "bert")
    peft_model, _ = _init(folders, "bert", "kasa")
    with torch.no_grad():
        for name, module in lora_layers(peft_model):
            u, s, vh = _svd(original[short_name(name)])
            module.base_layer.weight.copy_((u[:, R:] * s[R:]) @ vh[R:])
            module.kasa_removed_b.copy_(u[:, :R] * s[:R] / module.scaling["default"])
            module.kasa_removed_a.copy_(vh[:R])
    with pytest.raises(InitError, match="KaSA did not truncate layer .* to its principal components"):
        verify_kasa(peft_model, None)


def test_kasa_needs_a_rank_below_the_layer_width(tiny_bert):
    """Tiny BERT's layers are 64 wide: KaSA at r = 64 would leave the base nothing, so peft's refusal becomes an InitError."""
    with pytest.raises(InitError, match="init method 'kasa' failed: KaSA requires `r` \\(64\\) to be smaller"):
        initialize(_model(tiny_bert, "bert"), _settings("bert", "kasa", r=64), "kasa", InitContext(probe=_probe()))


@pytest.mark.parametrize(
    "init, problem",
    [
        ({"method": "kasa", "beta": -1}, "beta"),
        ({"method": "kasa", "gamma": 2}, "gamma"),
        ({"method": "kasa", "regularizer_weight": -0.1}, "regularizer_weight"),
        ({"method": "sorsa", "regularizer_weight": -1}, "regularizer_weight"),
        ({"method": "sorsa", "gamma": 4e-4}, "gamma"),  # not a SORSA knob: its weight is regularizer_weight
    ],
)
def test_a_bad_knob_is_one_config_error_naming_it(tiny_bert, cls_data, tmp_path, init, problem):
    from conftest import cls_config, write_config

    from adapterflow.tasks.config import load_config

    path = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **{"adapter.init": init}))
    with pytest.raises(ConfigError, match=problem):
        load_config(path)


@pytest.mark.parametrize("method", METHODS)
def test_dora_is_refused_for_both(tiny_bert, cls_data, tmp_path, method):
    from conftest import cls_config, write_config

    from adapterflow.tasks.config import load_config

    config = cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": method}, "adapter.variant": "dora"})
    with pytest.raises(ConfigError, match=f"variant dora cannot be combined with init method {method}"):
        load_config(write_config(tmp_path / "run.yaml", config))
