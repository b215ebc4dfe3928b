"""Initializer invariants on tiny BERT and Llama: outputs preserved, PiSSA principal, adapters load on the untouched base."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_inits import ARCHS
from tiny_inits import probe as _probe

from adapterflow.adapters import (
    InitContext,
    InitError,
    LoraSettings,
    apply_init,
    export_init,
    get_initializer,
    initialize,
    registered_names,
)
from adapterflow.adapters.invariants import check_principal, model_outputs
from adapterflow.adapters.layers import delta_factors, lora_layers
from adapterflow.adapters.registry import InitConfig, Initializer, register, registered
from adapterflow.tasks.config import ModelSpec
from adapterflow.tasks.model_io import load_model, resolve_base

METHODS = ["lora", "gaussian", "orthogonal", "pissa", "milora", "olora", "eva", "corda"]


def _model(folder, task):
    torch.manual_seed(0)
    return load_model(resolve_base(ModelSpec(path=str(folder))), task, ["a", "b", "c"])


def _settings(arch, method=None, **knobs):
    _, targets, task_type = ARCHS[arch]
    init = get_initializer(method).config(method=method, **knobs) if method else None
    return LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=targets, task_type=task_type, init=init)


def _calibration(batches: int = 12, batch_size: int = 8):
    generator = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(5, 2000, (batch_size, 16), generator=generator)} for _ in range(batches)]


def _calibration_for(method: str):
    """CorDA's hooks take one sample per forward."""
    return _calibration(64, 1) if method == "corda" else _calibration()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_init_preserves_outputs_and_adapter_reloads_on_untouched_base(folders, tmp_path, arch, method):
    from peft import PeftModel

    from adapterflow.adapters import save_trained_adapter

    task = ARCHS[arch][0]
    base_out = model_outputs(_model(folders[arch], task), _probe())
    peft_model, report = initialize(_model(folders[arch], task), _settings(arch), method,
                                    InitContext(probe=_probe(), calibration=_calibration_for(method)))
    assert report.checks["max_output_change"] <= 1e-5
    assert (model_outputs(peft_model, _probe()) - base_out).abs().max() <= 1e-5 * max(1, base_out.abs().max())
    init_dir = export_init(peft_model, tmp_path / "init", method)

    trained = apply_init(_model(folders[arch], task), init_dir)
    assert (model_outputs(trained, _probe()) - base_out).abs().max() <= 1e-5 * max(1, base_out.abs().max())
    with torch.no_grad():  # stands in for training: move every trainable tensor
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    tuned_out = model_outputs(trained, _probe())
    assert (tuned_out - base_out).abs().max() > 1e-3
    save_trained_adapter(trained, tmp_path / "adapter", init_dir)

    reloaded = PeftModel.from_pretrained(_model(folders[arch], task), str(tmp_path / "adapter"))
    assert torch.allclose(model_outputs(reloaded, _probe()), tuned_out, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_pissa_adapter_is_the_top_r_svd_of_w(folders, arch):
    task = ARCHS[arch][0]
    original = {n: m.weight.detach().clone() for n, m in _model(folders[arch], task).named_modules() if n.endswith(ARCHS[arch][1])}
    peft_model, report = initialize(_model(folders[arch], task), _settings(arch), "pissa", InitContext(probe=_probe()))
    assert report.checks["max_residual_to_adapter_sv_ratio"] <= 1.0
    layers = dict(lora_layers(peft_model))
    assert len(layers) == len(original)
    for name, module in layers.items():
        b, a, scaling = delta_factors(module)
        weight = original[name.removeprefix("base_model.model.")]
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        top_r = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        assert torch.allclose(scaling * b @ a, top_r, atol=1e-5)
        assert torch.allclose(module.base_layer.weight + scaling * b @ a, weight, atol=1e-5)


def test_principal_check_catches_a_plain_lora_fallback(tiny_llama):
    from peft import get_peft_model

    plain = get_peft_model(_model(tiny_llama, "causal_lm"), _settings("llama").lora_config(True))
    with pytest.raises(InitError, match="does not hold the principal components"):
        check_principal("pissa", plain, 1e-3, 1e-3)


def test_an_initializer_that_changes_outputs_is_refused(tiny_bert):
    from peft import get_peft_model

    def broken(model, settings, context):
        peft_model = get_peft_model(model, settings.lora_config("gaussian"))
        for _, module in lora_layers(peft_model):
            torch.nn.init.normal_(module.lora_B["default"].weight)
        from adapterflow.adapters import InitReport

        return peft_model, InitReport(method="broken")

    with registered(_throwaway("broken-test", apply=broken)), pytest.raises(InitError, match="changed the model's outputs"):
        initialize(_model(tiny_bert, "sequence_classification"), _settings("bert"), "broken-test", InitContext(probe=_probe()))
    assert "broken-test" not in registered_names()


def _throwaway(name: str, **flags) -> Initializer:
    """An initializer for one test, with a config class whose tag is its name."""
    from typing import Literal

    from pydantic import create_model

    config = create_model(f"Throwaway_{name}", __base__=InitConfig, method=(Literal[name], ...))
    defaults = dict(family="random", config=config, apply=lambda *a: None, mutates_base=False, needs_data=False,
                    needs_grad=False, supports_quantized=True, preserves_outputs=True)
    return Initializer(name=name, **{**defaults, **flags})


def test_initializer_fields_are_keyword_only():
    with pytest.raises(TypeError):
        Initializer("positional", "random", InitConfig, None)  # the point is that this fails


def test_registration_checks_the_config_tag_and_apply():
    with pytest.raises(ValueError, match=r"needs `method: Literal\['other'\]`"):
        register(dataclasses.replace(_throwaway("tagged-wrong"), name="other"))
    with pytest.raises(ValueError, match="a race has no apply"):
        register(_throwaway("race-with-apply", is_race=True))
    with pytest.raises(ValueError, match="family must be one of"):
        register(_throwaway("no-family", family="magic"))
    assert not {"other", "race-with-apply", "no-family"} & set(registered_names())


def test_registered_removes_the_initializer_even_when_the_block_fails():
    with pytest.raises(RuntimeError), registered(_throwaway("short-lived")):
        assert get_initializer("short-lived").name == "short-lived"
        raise RuntimeError
    with pytest.raises(InitError, match="unknown init method 'short-lived'"):
        get_initializer("short-lived")


def test_every_method_module_registers_on_import():
    import pkgutil

    import adapterflow.adapters.methods as methods

    modules = {m.name for m in pkgutil.iter_modules(methods.__path__)}
    assert {"orthogonal", "race", "basic", "pissa"} <= modules
    assert {"orthogonal", "auto", "lora", "pissa", "milora", "olora", "loftq"} <= set(registered_names())
    assert get_initializer("orthogonal").config.__module__ == "adapterflow.adapters.methods.orthogonal"


def test_a_method_given_another_methods_config_is_refused(tiny_bert):
    with pytest.raises(InitError, match="init method 'pissa' was given the config of 'eva'"):
        initialize(_model(tiny_bert, "sequence_classification"), _settings("bert", "eva"), "pissa", InitContext(probe=_probe()))


@pytest.mark.parametrize("arch", ARCHS)
def test_orthogonal_starts_with_nonzero_factors_whose_product_is_zero(folders, arch):
    peft_model, report = initialize(_model(folders[arch], ARCHS[arch][0]), _settings(arch), "orthogonal", InitContext(probe=_probe()))
    assert report.checks["max_output_change"] <= 1e-5
    for _, module in lora_layers(peft_model):
        b, a, _ = delta_factors(module)
        assert b.norm() > 1e-2 and a.norm() > 1e-2  # not peft's B = 0 (plain LoRA)
        assert (b @ a).abs().max() < 1e-6 * b.norm() * a.norm()


def test_orthogonal_refuses_an_odd_rank(tiny_bert):
    settings = LoraSettings(r=3, alpha=8, dropout=0.0, target_modules=("query",), task_type="SEQ_CLS")
    with pytest.raises(InitError, match="init method 'orthogonal' failed: .*rank to be even"):
        initialize(_model(tiny_bert, "sequence_classification"), settings, "orthogonal", InitContext(probe=_probe()))


def test_readme_shows_the_orthogonal_initializer_verbatim():
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Adding an initializer", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert block == (ROOT / "adapters" / "methods" / "orthogonal.py").read_text()


def test_registry_refuses_duplicates_and_unknown_names():
    assert {"lora", "gaussian", "pissa"} <= set(registered_names())
    with pytest.raises(ValueError, match="already registered"):
        register(get_initializer("lora"))
    with pytest.raises(InitError, match="unknown init method 'nope'"):
        get_initializer("nope")


def test_data_hungry_method_without_data_fails_loudly(tiny_bert):
    with registered(_throwaway("needs-data-test", needs_data=True)), pytest.raises(InitError, match="needs calibration data and got none"):
        initialize(_model(tiny_bert, "sequence_classification"), _settings("bert"), "needs-data-test", InitContext(probe=_probe()))


def test_target_modules_matching_nothing_is_a_clear_error(tiny_bert):
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("q_proj",), task_type="SEQ_CLS")
    with pytest.raises(InitError, match=r"\['q_proj'\] match no linear layer of the model.*query"):
        initialize(_model(tiny_bert, "sequence_classification"), settings, "lora", InitContext(probe=_probe()))


@pytest.mark.parametrize("arch", ARCHS)
def test_milora_adapter_is_the_bottom_r_svd_of_w(folders, arch):
    task = ARCHS[arch][0]
    original = {n: m.weight.detach().clone() for n, m in _model(folders[arch], task).named_modules() if n.endswith(ARCHS[arch][1])}
    peft_model, report = initialize(_model(folders[arch], task), _settings(arch), "milora", InitContext(probe=_probe()))
    assert report.checks["max_subspace_leak"] < 1e-4
    for name, module in lora_layers(peft_model):
        b, a, scaling = delta_factors(module)
        u, s, vh = torch.linalg.svd(original[name.removeprefix("base_model.model.")].float(), full_matrices=False)
        bottom_r = u[:, -4:] @ torch.diag(s[-4:]) @ vh[-4:]
        assert torch.allclose(scaling * b @ a, bottom_r, atol=1e-5)


def _slow_spectrum_model(tiny_llama):
    """Weights whose singular values decay slowly, where randomized SVD without oversampling struggles."""
    model = _model(tiny_llama, "causal_lm")
    generator = torch.Generator().manual_seed(3)
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            out_f, in_f = module.weight.shape
            u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=generator))
            v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=generator))
            k = min(out_f, in_f)
            sigma = torch.exp(-torch.arange(k, dtype=torch.float32) / 20)
            module.weight.data = u[:, :k] @ torch.diag(sigma) @ v[:, :k].T
    return model


def _principal_error(peft_model, reference) -> float:
    worst = 0.0
    for name, module in lora_layers(peft_model):
        b, a, scaling = delta_factors(module)
        u, s, vh = torch.linalg.svd(reference[name.removeprefix("base_model.model.")], full_matrices=False)
        exact = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        worst = max(worst, ((scaling * b @ a - exact).norm() / exact.norm()).item())
    return worst


def test_oversampling_makes_randomized_pissa_accurate(tiny_llama):
    from peft import get_peft_model

    reference = {n: m.weight.detach().clone() for n, m in _slow_spectrum_model(tiny_llama).named_modules()
                 if n.endswith(("q_proj", "v_proj"))}
    ours, report = initialize(_slow_spectrum_model(tiny_llama), _settings("llama", "pissa", niter=4, oversampling=16), "pissa",
                              InitContext(probe=_probe()))
    torch.manual_seed(0)
    peft_q_equals_r = get_peft_model(_slow_spectrum_model(tiny_llama), _settings("llama").lora_config("pissa_niter_4"))
    assert "oversampling=16" in report.notes[0]
    ours_error, peft_error = _principal_error(ours, reference), _principal_error(peft_q_equals_r, reference)
    assert ours_error < 0.02 and ours_error * 5 < peft_error


def test_rank_larger_than_a_layer_allows_is_refused(tiny_bert):
    settings = LoraSettings(r=128, alpha=8, dropout=0.0, target_modules=("query",), task_type="SEQ_CLS")
    with pytest.raises(InitError, match=r"adapter.r = 128 is larger than layer .*query .*use r <= 64"):
        initialize(_model(tiny_bert, "sequence_classification"), settings, "pissa", InitContext(probe=_probe()))


def _layer_inputs(model, layer: str) -> list[torch.Tensor]:
    """The token-level inputs `layer` sees over the calibration batches."""
    captured = []
    hook = dict(model.named_modules())[layer].register_forward_hook(
        lambda mod, args, out: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in _calibration():
            model(**batch)
    hook.remove()
    return captured


def test_eva_a_rows_span_the_top_activation_directions(tiny_bert):
    model = _model(tiny_bert, "sequence_classification")
    layer = "bert.encoder.layer.1.attention.self.value"
    captured = _layer_inputs(model, layer)
    peft_model, report = initialize(model, _settings("bert", "eva", rho=1.0), "eva",
                                    InitContext(probe=_probe(), calibration=_calibration()))
    assert sum(report.ranks.values()) == 4 * len(report.ranks) and report.checks["max_a_orthonormality_error"] < 1e-3
    centered = torch.cat(captured) - torch.cat(captured).mean(0)
    a = dict(lora_layers(peft_model))[f"base_model.model.{layer}"].lora_A["default"].weight.detach()
    # Variance the A rows capture over that of the top directions: the spectrum of a random 64-wide model is
    # flat past the 3rd direction (singular values 1, .89, .84, .80, .77), so angles to it are ill-defined.
    # A random 4-dim subspace captures ~0.22.
    top = torch.linalg.svdvals(centered)[: a.shape[0]].pow(2).sum()
    assert (centered @ torch.linalg.qr(a.T)[0]).pow(2).sum() / top > 0.95


def test_eva_check_catches_a_plain_lora_fallback(tiny_bert):
    from peft import get_peft_model

    from adapterflow.adapters.methods.eva import verify_eva

    plain = get_peft_model(_model(tiny_bert, "sequence_classification"), _settings("bert").lora_config(True))
    with pytest.raises(InitError, match="A rows are not orthonormal"):
        verify_eva(plain, _settings("bert", "eva"))


def test_eva_on_a_target_with_2d_inputs_is_a_clear_error(tiny_bert):
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("dense",), task_type="SEQ_CLS")
    with pytest.raises(InitError, match="EVA needs token-level inputs .* pooler.dense"):
        initialize(_model(tiny_bert, "sequence_classification"), settings, "eva", InitContext(probe=_probe(), calibration=_calibration()))


@pytest.mark.parametrize("arch", ARCHS)
def test_corda_depends_on_the_calibration_data_and_is_not_pissa(folders, arch):
    task = ARCHS[arch][0]

    def deltas(method, calibration):
        model, _ = initialize(_model(folders[arch], task), _settings(arch), method, InitContext(probe=_probe(), calibration=calibration))
        return [s * b @ a for b, a, s in (delta_factors(m) for _, m in lora_layers(model))]

    first, other, pissa = deltas("corda", _calibration(64, 1)), deltas("corda", _calibration(64, 1)[::-1][:16]), deltas("pissa", None)
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(first, deltas("corda", _calibration(64, 1))))
    assert any(not torch.allclose(x, y, atol=1e-3) for x, y in zip(first, other))
    assert any(not torch.allclose(x, y, atol=1e-3) for x, y in zip(first, pissa))


def test_corda_check_catches_a_plain_lora_fallback(tiny_bert):
    from peft import get_peft_model

    from adapterflow.adapters.methods.corda import verify_corda

    plain = get_peft_model(_model(tiny_bert, "sequence_classification"), _settings("bert").lora_config(True))
    with pytest.raises(InitError, match="B·A is zero"):
        verify_corda(plain, _settings("bert", "corda"))


def test_eva_reports_the_explained_variance_of_the_kept_components(tiny_bert):
    model = _model(tiny_bert, "sequence_classification").eval()
    layer = "bert.encoder.layer.1.attention.self.value"  # shares its input (and peft's PCA) with query
    captured = _layer_inputs(model, layer)
    peft_model, report = initialize(model, _settings("bert"), "eva", InitContext(probe=_probe(), calibration=_calibration()))
    assert report.ranks and set(report.spectra) == set(report.ranks)
    for name, ratios in report.spectra.items():
        assert len(ratios) == report.ranks[name]
        assert all(0 < v <= 1 for v in ratios) and 0 < sum(ratios) <= 1
        assert all(first >= second for first, second in zip(ratios, ratios[1:]))
    assert report.checks["min_explained_variance"] == pytest.approx(min(sum(v) for v in report.spectra.values()))
    # The recorded ratios are the activations' variance along A's rows (peft's PCA saw most of these batches).
    centered = torch.cat(captured) - torch.cat(captured).mean(0)
    a = dict(lora_layers(peft_model))[f"base_model.model.{layer}"].lora_A["default"].weight.detach()
    along_a = (centered @ a.T).square().sum(0) / centered.square().sum()
    assert torch.allclose(torch.tensor(report.spectra[layer]), along_a, rtol=0.05)


def test_eva_reports_each_calibration_batch_and_ends_at_the_total(tiny_bert):
    """EVA cycles its batches until convergence: open-ended counts (total None), then one call (n, n)."""
    calls = []
    context = InitContext(probe=_probe(), calibration=_calibration(), progress=lambda done, total: calls.append((done, total)))
    initialize(_model(tiny_bert, "sequence_classification"), _settings("bert", "eva"), "eva", context)
    passes = calls[-1][0]
    assert passes >= 2 and calls == [(done, None) for done in range(1, passes + 1)] + [(passes, passes)]


def test_corda_reports_each_calibration_sample_with_its_total(tiny_bert):
    calls = []
    context = InitContext(probe=_probe(), calibration=_calibration(20, 1), progress=lambda done, total: calls.append((done, total)))
    initialize(_model(tiny_bert, "sequence_classification"), _settings("bert", "corda"), "corda", context)
    assert calls == [(done, 20) for done in range(1, 21)]


def test_the_progress_hook_is_a_no_op_by_default():
    from adapterflow.adapters.context import no_progress, reported

    assert InitContext(probe={}).progress is no_progress
    calls = []
    assert list(reported(iter("abc"), lambda done, total: calls.append((done, total)))) == ["a", "b", "c"]
    assert calls == [(1, None), (2, None), (3, None), (3, 3)]  # an iterable without a length: open-ended, then closed
