"""LoRA-GA and LoRA-SB on tiny BERT and Llama: checked against gradients computed here, independently."""

from __future__ import annotations

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
from adapterflow.adapters.invariants import model_outputs
from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.tasks.model_io import load_model, resolve_base


def _settings(arch, method=None, **knobs):
    _, targets, task_type = ARCHS[arch]
    init = get_initializer(method).config(method=method, **knobs) if method else None
    return LoraSettings(r=R, alpha=ALPHA, dropout=0.0, target_modules=targets, task_type=task_type, init=init)


def _batches(arch, count=3):
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(count):
        ids = torch.randint(5, 2000, (8, 16), generator=generator)
        labels = torch.randint(0, 3, (8,), generator=generator) if arch == "bert" else ids.clone()
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def _init(folders, arch, method, **knobs):
    return initialize(_model(folders[arch], arch), _settings(arch, method, **knobs), method,
                      InitContext(probe=_probe(), calibration=_batches(arch)))


def _mean_gradients(model, batches) -> dict[str, torch.Tensor]:
    """∂L/∂W of every target weight, averaged over the batches, by plain autograd."""
    targets = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.endswith(("query", "value", "q_proj", "v_proj"))}
    for param in model.parameters():
        param.requires_grad_(False)
    for module in targets.values():
        module.weight.requires_grad_(True)
    for batch in batches:
        model(**batch).loss.backward()
    return {name: module.weight.grad / len(batches) for name, module in targets.items()}


def _top(matrix: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def _reloads_on_untouched_base(folder, arch, peft_model, method, tmp_path) -> None:
    """Export, apply, move the trainable tensors, save: plain PeftModel.from_pretrained reproduces it."""
    from peft import PeftModel

    init_dir = export_init(peft_model, tmp_path / "init", method)
    trained = apply_init(_model(folder, arch), init_dir)
    assert torch.allclose(model_outputs(trained, _probe()), model_outputs(peft_model, _probe()), atol=1e-5)
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    tuned = model_outputs(trained, _probe())
    save_trained_adapter(trained, tmp_path / "adapter", init_dir)
    reloaded = PeftModel.from_pretrained(_model(folder, arch), str(tmp_path / "adapter"))
    assert torch.allclose(model_outputs(reloaded, _probe()), tuned, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("convention", ["reference", "peft"])
def test_lora_ga_preserves_outputs_and_reloads_on_the_untouched_base(folders, tmp_path, arch, convention):
    peft_model, report = _init(folders, arch, "lora_ga", convention=convention)
    assert report.checks["max_output_change"] <= 1e-5
    assert report.checks["max_singular_vector_residual"] < 0.05
    _reloads_on_untouched_base(folders[arch], arch, peft_model, "lora_ga", tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_ga_first_step_is_the_top_2r_part_of_the_full_gradient(folders, arch):
    """The paper's claim, measured: one SGD step of the adapter moves W along the best rank-2r approximation of G."""
    gradients = _mean_gradients(_model(folders[arch], arch), _batches(arch))
    peft_model, _ = _init(folders, arch, "lora_ga", scale="stable", stable_gamma=4)
    for param in peft_model.parameters():
        param.grad = None
    for batch in _batches(arch):
        peft_model(**batch).loss.backward()
    for name, module in lora_layers(peft_model):
        a, b, scaling = module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
        step = scaling * (b.detach() @ a.grad + b.grad @ a.detach()) / len(_batches(arch))  # -ΔW / lr
        expected = _top(gradients[short_name(name)], 2 * R)
        factor = scaling**2 * (b.shape[0] ** 0.25 / 4**0.5) ** 2  # s²·c², c the stable scale
        error = ((step - factor * expected).norm() / (factor * expected).norm()).item()
        assert error < 1e-3, (name, error)


def test_lora_ga_conventions_differ_only_in_scaling(folders):
    """Reference: B = c·U (equal column norms). peft: B = c·U·S (column norms follow the singular values)."""
    reference, _ = _init(folders, "llama", "lora_ga", convention="reference")
    peft_style, _ = _init(folders, "llama", "lora_ga", convention="peft")
    for (_, ours), (_, theirs) in zip(lora_layers(reference), lora_layers(peft_style)):
        ours_norms = delta_factors(ours)[0].norm(dim=0)
        theirs_norms = delta_factors(theirs)[0].norm(dim=0)
        assert torch.allclose(ours_norms, ours_norms[0].expand_as(ours_norms), rtol=1e-4)
        assert theirs_norms.max() / theirs_norms.min() > 1.01
        ours_a, theirs_a = delta_factors(ours)[1], delta_factors(theirs)[1]
        assert torch.allclose((ours_a @ theirs_a.T).abs().diagonal() / (ours_a.norm(dim=1) * theirs_a.norm(dim=1)),
                              torch.ones(R), atol=1e-2)


def test_lora_ga_check_catches_a_plain_lora_fallback(folders):
    from peft import get_peft_model

    from adapterflow.adapters.methods.gradient import verify_lora_ga

    plain = get_peft_model(_model(folders["bert"], "bert"), _settings("bert").lora_config(True))
    with pytest.raises(InitError, match="no gradient|B is zero"):
        verify_lora_ga(plain, _settings("bert", "lora_ga"))


def test_gradient_init_without_labels_fails_loudly(folders):
    unlabelled = [{"input_ids": batch["input_ids"]} for batch in _batches("bert")]
    with pytest.raises(InitError, match="needs labelled training batches"):
        initialize(_model(folders["bert"], "bert"), _settings("bert"), "lora_ga", InitContext(probe=_probe(), calibration=unlabelled))


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_sb_starts_at_the_top_r_part_of_the_first_adam_update(folders, arch):
    lr = 1e-3
    gradients = _mean_gradients(_model(folders[arch], arch), _batches(arch))
    peft_model, report = _init(folders, arch, "lora_sb", update_lr=lr)
    assert "max_output_change" not in report.checks  # LoRA-SB moves the model by design
    for name, module in lora_layers(peft_model):
        b, a, scaling = delta_factors(module)
        expected = _top(-lr * torch.sign(gradients[short_name(name)]), R)
        assert torch.allclose(scaling * b @ a, expected, atol=1e-5 * max(1.0, expected.abs().max().item())), name


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_sb_trains_only_an_r_by_r_matrix_and_saves_plain_lora(folders, tmp_path, arch):
    peft_model, _ = _init(folders, arch, "lora_sb", update_lr=1e-3)
    init_dir = export_init(peft_model, tmp_path / "init", "lora_sb")
    trained = apply_init(_model(folders[arch], arch), init_dir)
    lora_trainable = {n: p for n, p in trained.named_parameters() if p.requires_grad and "lora_" in n}
    assert lora_trainable and all(tuple(p.shape) == (R, R) for p in lora_trainable.values())
    before = {n: (delta_factors(m)[1].clone(), delta_factors(m)[0].clone()) for n, m in lora_layers(trained)}
    optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.5)
    trained(**_batches(arch)[0]).loss.backward()
    optimizer.step()
    for name, module in lora_layers(trained):
        b, a, _ = delta_factors(module)
        a0, b0 = before[name]
        assert torch.equal(a, a0)  # A frozen
        assert not torch.allclose(b, b0)  # B moved, inside the span of B0:
        assert torch.allclose(b0 @ torch.linalg.lstsq(b0, b).solution, b, atol=1e-5)
    _reloads_on_untouched_base(folders[arch], arch, peft_model, "lora_sb", tmp_path / "again")


@pytest.mark.parametrize("method", ["lora_ga", "lora_sb"])
def test_gradient_inits_train_with_the_trainer_and_save_a_plain_adapter(tiny_bert, cls_data, tmp_path, method):
    """Through the flow's own stages: labelled calibration batches, checkpoints, a plain adapter at the end."""
    import json

    from conftest import cls_config
    from peft import PeftModel

    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.train import train_adapter

    config = RunConfig.model_validate(cls_config(tiny_bert, cls_data,
                                                 **{"adapter.init": {"method": method, "batches": 2}, "train.warmup_ratio": 0.5}))
    base_ref = resolve_base(config.model)
    outcome = initialize_adapter(config, base_ref, tmp_path / "run", tmp_path / "cache")
    report = json.loads((tmp_path / "run" / "init_report.json").read_text())
    assert report["method"] == method and "2 batches" in report["notes"][0]
    if method == "lora_sb":
        assert "-0.005·sign(G)" in report["notes"][0]  # lr 0.01 over 2 warmup steps
    result = train_adapter(config, base_ref, outcome.init_dir, tmp_path / "run")
    assert result.steps == 4
    adapter_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == (8 if method == "lora_ga" else 4)  # base-mutating LoRA-GA is saved as rank 2r
    labels = config.data.labels
    reloaded = PeftModel.from_pretrained(load_model(base_ref, config.task, labels), result.adapter_dir)
    assert all("parametrizations" not in name for name, _ in reloaded.named_parameters())


def test_lora_sb_check_catches_a_plain_lora_fallback(folders):
    from peft import get_peft_model

    from adapterflow.adapters.methods.lora_sb import verify_lora_sb

    plain = get_peft_model(_model(folders["bert"], "bert"), _settings("bert").lora_config(True))
    with pytest.raises(InitError, match="no gradient was estimated"):
        verify_lora_sb(plain, _settings("bert", "lora_sb", update_lr=1e-3))


@pytest.mark.parametrize("method", ["lora_ga", "lora_sb"])
def test_gradient_inits_report_each_calibration_batch_up_to_the_total(folders, method):
    calls = []
    knobs = {"update_lr": 1e-3} if method == "lora_sb" else {}
    context = InitContext(probe=_probe(), calibration=_batches("bert", 5), progress=lambda done, total: calls.append((done, total)))
    initialize(_model(folders["bert"], "bert"), _settings("bert", method, batches=4, **knobs), method, context)
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # the configured batches, not all five offered
