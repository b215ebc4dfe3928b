"""EVA from input covariances: the moments, the rank rule, and agreement with peft's incremental EVA."""

from __future__ import annotations

import pytest
import torch

from adapterflow.adapters import LoraSettings, get_initializer
from adapterflow.adapters.context import no_progress
from adapterflow.adapters.covariance import Moments, attention_token_mask, collect_covariances, principal_components
from adapterflow.adapters.layers import lora_layers
from adapterflow.adapters.methods.eva import distribute_ranks, eva_components
from adapterflow.tasks.config import ModelSpec
from adapterflow.tasks.model_io import load_model, resolve_base

ARCHS = {"bert": ("sequence_classification", ("query", "value"), "SEQ_CLS"), "llama": ("causal_lm", ("q_proj", "v_proj"), "CAUSAL_LM")}


def _peft_model(folder, arch, **knobs):
    from peft import EvaConfig, get_peft_model

    task, targets, task_type = ARCHS[arch]
    torch.manual_seed(0)
    model = load_model(resolve_base(ModelSpec(path=str(folder))), task, ["a", "b", "c"])
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=targets, task_type=task_type,
                            init=get_initializer("eva").config(method="eva", **knobs))
    eva = EvaConfig(rho=settings.init.rho, tau=settings.init.tau, whiten=settings.init.whiten)
    return get_peft_model(model, settings.lora_config("eva", eva_config=eva)), eva


def _calibration(batches: int = 12, batch_size: int = 8, tokens: int = 16):
    generator = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(5, 2000, (batch_size, tokens), generator=generator)} for _ in range(batches)]


def _principal_cosines(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    a, b = torch.linalg.qr(ours.double().T)[0], torch.linalg.qr(theirs.double().T)[0]
    return torch.linalg.svdvals(a.T @ b)


def test_moments_give_the_centered_scatter_in_any_batching():
    rows = torch.randn(300, 6, generator=torch.Generator().manual_seed(0)) * 3 + 50  # a large mean
    moments = Moments()
    for chunk in rows.split(70):
        moments.add(chunk)
    centered = rows.double() - rows.double().mean(0)
    assert moments.count == 300
    assert torch.allclose(moments.scatter(), centered.T @ centered, rtol=1e-9, atol=1e-8)


def test_principal_components_are_the_pca_of_the_rows():
    rows = torch.randn(500, 8, generator=torch.Generator().manual_seed(1)) @ torch.diag(torch.arange(8.0, 0, -1))
    moments = Moments()
    moments.add(rows)
    vectors, ratios, singular = principal_components(moments.scatter())
    centered = rows.double() - rows.double().mean(0)
    _, s, vh = torch.linalg.svd(centered, full_matrices=False)
    assert torch.allclose(singular.double(), s, rtol=1e-4)
    assert torch.allclose(ratios.double(), s.square() / s.square().sum(), atol=1e-6)
    assert torch.allclose((vectors.double() * vh).sum(1).abs(), torch.ones(8, dtype=torch.float64), atol=1e-4)


def test_padding_is_left_out_and_layers_sharing_an_input_share_one_moment(tiny_bert):
    model, _ = _peft_model(tiny_bert, "bert")
    layers = dict(lora_layers(model))
    ids = torch.randint(5, 2000, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    captured = {}
    name = "base_model.model.bert.encoder.layer.0.attention.self.query"
    handle = layers[name].register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    with model.disable_adapter():
        covariances = collect_covariances(model.eval(), layers, [{"input_ids": ids, "attention_mask": mask}], attention_token_mask())
    handle.remove()
    assert covariances.owner[name.replace("query", "value")] == name and set(covariances.moments) == {name, name.replace("0.", "1.", 1)}
    kept = captured["x"][mask.bool()]
    assert covariances.moments[name].count == int(mask.sum()) == kept.shape[0]
    assert torch.allclose(covariances.moments[name].total, kept.double().sum(0), atol=1e-5)


def test_batches_after_the_first_stop_at_the_last_target_layer_with_the_same_moments(tiny_bert):
    model, _ = _peft_model(tiny_bert, "bert")
    layers = dict(lora_layers(model))
    last = "base_model.model.bert.encoder.layer.1"
    calls = []
    handle = model.get_submodule(f"{last}.output").register_forward_pre_hook(lambda module, args: calls.append(1))
    batches = _calibration(batches=3)
    with model.disable_adapter():
        covariances = collect_covariances(model.eval(), layers, batches, attention_token_mask())
        handle.remove()
        one_by_one = [collect_covariances(model, layers, [batch], attention_token_mask()) for batch in batches]
    assert len(calls) == 1  # the first batch ran whole; the others stopped at layer 1's value projection
    for name, moments in covariances.moments.items():  # each single batch ran whole: it was a first batch
        assert moments.count == sum(single.moments[name].count for single in one_by_one)
        assert torch.allclose(moments.outer, sum(single.moments[name].outer for single in one_by_one), rtol=1e-9)


def test_label_mask_drops_ignored_tokens_as_peft_does():
    ids = torch.ones(2, 4, dtype=torch.long)
    labels = torch.tensor([[-100, 5, 6, -100], [1, 2, 3, 4]])
    keep = attention_token_mask(-100)({"input_ids": ids, "labels": labels, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])})
    assert keep.tolist() == [[False, True, True, False], [True, True, False, False]]
    assert attention_token_mask(None)({"input_ids": ids, "labels": labels}) is None  # use_label_mask off, no attention mask


def test_ranks_go_to_the_largest_ratios_and_a_shared_input_favours_its_first_layer():
    ratios = {"q0": torch.tensor([0.5, 0.3, 0.1]), "x1": torch.tensor([0.4, 0.35, 0.2])}
    owner = {"q0": "q0", "v0": "q0", "x1": "x1"}
    # Ranked: .5 .5 .4 .35 .3 .3 | .2 .1 .1 — budget 5 takes q0:2, v0:1 (ties in model order), x1:2
    assert distribute_ranks(ratios, owner, 5) == {"q0": 2, "v0": 1, "x1": 2}
    assert sum(distribute_ranks(ratios, owner, 7).values()) == 7


def _peft_components(folder, arch, batches):
    from peft.tuners.lora.eva import get_eva_state_dict

    model, _ = _peft_model(folder, arch)
    return get_eva_state_dict(model, dataloader=batches, show_progress_bar=False)


def _ours(folder, arch, batches):
    model, eva = _peft_model(folder, arch)
    components, passes, _ = eva_components(model, batches, no_progress, 4, eva)
    return {name: parts.rows for name, parts in components.items()}, passes


def test_components_and_ranks_match_peft_incremental_eva_on_tiny_bert(tiny_bert):
    """Identical ranks; each layer's leading component (27% more variance than the next) within cosine
    0.99 of peft's, and the span of all 4 as close to peft's as peft's is to its own run on the same
    batches reversed (~0.96 to 0.98: past the first, the variances are within 8 to 13% of each other,
    so the directions are loosely determined by 12 batches, for both methods)."""
    theirs, reordered = _peft_components(tiny_bert, "bert", _calibration()), _peft_components(tiny_bert, "bert", _calibration()[::-1])
    ours, passes = _ours(tiny_bert, "bert", _calibration())
    assert 2 <= passes <= 12
    assert {name: rows.shape[0] for name, rows in ours.items()} == {name: rows.shape[0] for name, rows in theirs.items()}
    assert sum(rows.shape[0] for rows in ours.values()) == 4 * len(ours)
    for name, rows in ours.items():
        assert _principal_cosines(rows[:1], theirs[name][:1]).min() >= 0.99, name
        assert _principal_cosines(rows, theirs[name]).min() >= _principal_cosines(reordered[name], theirs[name]).min(), name


def test_on_tiny_llama_ours_are_the_exact_pca_and_agree_with_peft_better_than_peft_with_itself(tiny_llama):
    """Tiny Llama's activations are near-isotropic (explained-variance ratios 0.024 to 0.042, no gaps), so
    peft's truncated incremental PCA depends on the batch order: peft on the same batches reversed agrees
    with itself only to principal cosines ~0.89 over the top 4. Ours are the exact PCA of the tokens seen,
    and agree with peft at least as well as peft agrees with itself. The rank budget is the same; one rank
    per layer may cross the layer boundary, where peft's ratios move by more than the gap (0.0006).
    """
    theirs, reordered = _peft_components(tiny_llama, "llama", _calibration()), _peft_components(tiny_llama, "llama", _calibration()[::-1])
    ours, passes = _ours(tiny_llama, "llama", _calibration())
    assert sum(rows.shape[0] for rows in ours.values()) == sum(rows.shape[0] for rows in theirs.values()) == 4 * len(ours)
    assert all(abs(rows.shape[0] - theirs[name].shape[0]) <= 1 for name, rows in ours.items())
    name = "base_model.model.model.layers.1.self_attn.q_proj"
    model, _ = _peft_model(tiny_llama, "llama")
    seen = []
    layer = dict(lora_layers(model))[name]
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad(), model.disable_adapter():
        for batch in _calibration()[:passes]:
            model.eval()(**batch)
    handle.remove()
    tokens = torch.cat(seen).double()
    exact = torch.linalg.svd(tokens - tokens.mean(0), full_matrices=False).Vh[:4]
    assert _principal_cosines(ours[name][:4], exact).min() >= 0.999
    assert _principal_cosines(ours[name][:4], theirs[name][:4]).min() >= _principal_cosines(reordered[name][:4], theirs[name][:4]).min()


def test_whitened_rows_are_divided_by_the_root_of_their_singular_values(tiny_bert):
    model, eva = _peft_model(tiny_bert, "bert", whiten=True)
    plain_model, plain_eva = _peft_model(tiny_bert, "bert")
    whitened, _, _ = eva_components(model, _calibration(), no_progress, 4, eva)
    plain, _, _ = eva_components(plain_model, _calibration(), no_progress, 4, plain_eva)
    for name, parts in whitened.items():
        norms = parts.rows.norm(dim=1)
        assert torch.allclose(parts.rows / norms[:, None], plain[name].rows, atol=1e-4)
        assert (norms < 1).all()  # singular values of hundreds of token rows exceed 1


def test_no_calibration_input_is_an_error_not_plain_lora(tiny_bert):
    from adapterflow.errors import InitError

    model, eva = _peft_model(tiny_bert, "bert")
    with pytest.raises(InitError, match="no calibration batches"):
        eva_components(model, [], no_progress, 4, eva)


def test_corda_with_the_shared_collector_equals_peft_own_hooks(tiny_bert):
    """Same covariances as peft's calib_cov_distribution, and the same adapter after its preprocessing."""
    from peft import get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    from adapterflow.adapters import InitContext, initialize
    from adapterflow.adapters.layers import delta_factors
    from adapterflow.adapters.methods.corda import input_covariances

    def base():
        torch.manual_seed(0)
        return load_model(resolve_base(ModelSpec(path=str(tiny_bert))), "sequence_classification", ["a", "b", "c"])

    samples = _calibration(24, 1)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"), task_type="SEQ_CLS",
                            init=get_initializer("corda").config(method="corda"))
    config = settings.lora_config("corda", corda_config=CordaConfig(corda_method="ipm", prune_temporary_fields=False))
    theirs = base()

    def run_model():
        for sample in samples:
            theirs(**sample)

    with torch.no_grad():
        preprocess_corda(theirs, config, run_model=run_model)
    ours = input_covariances(base(), config, samples)
    assert set(ours) == {name for name, module in theirs.named_modules() if hasattr(module, "covariance_matrix")}
    for name, matrix in ours.items():
        assert torch.allclose(matrix, theirs.get_submodule(name).covariance_matrix, rtol=1e-5, atol=1e-6), name
    theirs_model = get_peft_model(theirs, config)
    ours_model, _ = initialize(base(), settings, "corda", InitContext(probe={"input_ids": samples[0]["input_ids"]}, calibration=samples))
    for (name, mine), (_, reference) in zip(lora_layers(ours_model), lora_layers(theirs_model), strict=True):
        (b, a, s), (rb, ra, rs) = delta_factors(mine), delta_factors(reference)
        assert torch.allclose(s * b @ a, rs * rb @ ra, atol=1e-5), name
