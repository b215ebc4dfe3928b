"""Intruder dimensions: synthetic weights with a known answer, then a LoRA-wrapped tiny BERT."""

from __future__ import annotations

import math

import pytest
import torch

from adapterflow.adapters.spectral import (
    LayerIntruders,
    count_intruders,
    intruder_markdown,
    intruder_report,
    plot_intruders,
    summarize,
)

THRESHOLD = 0.5
TOP_K = 10


def decaying_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """W = U diag(s) V^T with s_i = 10·0.9^i: distinct, well-separated singular values."""
    generator = torch.Generator().manual_seed(seed)
    rank = min(out_features, in_features)
    u, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=generator))
    s = 10.0 * 0.9 ** torch.arange(rank, dtype=torch.float32)
    return (u * s) @ v.T


def outside_column_space(weight: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A unit vector orthogonal to every left singular vector of a tall `weight`."""
    u = torch.linalg.svd(weight, full_matrices=False).U
    vector = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(seed))
    vector = vector - u @ (u.T @ vector)
    return vector / vector.norm()


def test_a_tiny_perturbation_has_no_intruders():
    weight = decaying_weight(64, 48)
    noise = 1e-4 * torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    intruders, min_similarity = count_intruders(weight, weight + noise, TOP_K, THRESHOLD)
    assert intruders == 0
    assert min_similarity > 0.99


def test_a_new_dominant_direction_outside_the_base_is_exactly_one_intruder():
    weight = decaying_weight(64, 48)
    _, s, vh = torch.linalg.svd(weight, full_matrices=False)
    new_direction = outside_column_space(weight)
    # Along W's weakest input direction v_min: W'v_j = σ_j u_j for every other j, so only that one
    # singular vector moves, to (σ_min u_min + 20 n)/norm, which becomes the top one (norm > σ_max = 10).
    strength = 20.0
    adapted = weight + strength * torch.outer(new_direction, vh[-1])
    expected_similarity = (s[-1] / torch.hypot(s[-1], torch.tensor(strength))).item()

    intruders, min_similarity = count_intruders(weight, adapted, TOP_K, THRESHOLD)

    assert intruders == 1
    assert min_similarity == pytest.approx(expected_similarity, abs=1e-3)
    assert min_similarity < THRESHOLD
    # The same direction passes once the threshold sits below its similarity: the test is "<", not ">".
    assert count_intruders(weight, adapted, TOP_K, expected_similarity / 2)[0] == 0


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)])
def test_an_unchanged_weight_has_no_intruders(shape):
    weight = decaying_weight(*shape)
    intruders, min_similarity = count_intruders(weight, weight.clone(), TOP_K, THRESHOLD)
    assert intruders == 0
    assert min_similarity == pytest.approx(1.0, abs=1e-4)


def test_left_singular_vectors_ignore_a_rotation_of_the_input_but_not_of_the_output():
    weight = decaying_weight(48, 48)
    rotation, _ = torch.linalg.qr(torch.randn(48, 48, generator=torch.Generator().manual_seed(3)))
    assert count_intruders(weight, weight @ rotation, TOP_K, THRESHOLD) == (0, pytest.approx(1.0, abs=1e-4))
    # A random rotation of the output space moves every top direction off the base ones.
    intruders, _ = count_intruders(weight, rotation @ weight, TOP_K, THRESHOLD)
    assert intruders >= TOP_K // 2


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)])
def test_counts_follow_the_definition_on_tall_and_wide_weights(shape):
    weight = decaying_weight(*shape)
    adapted = weight + 0.8 * torch.randn(shape, generator=torch.Generator().manual_seed(4))
    base_u = torch.linalg.svd(weight, full_matrices=False).U
    adapted_u = torch.linalg.svd(adapted, full_matrices=False).U[:, :TOP_K]
    best_match = (base_u.T @ adapted_u).abs().amax(dim=0)
    # Threshold in the widest gap between similarities, so rounding cannot move one across it.
    ranked = best_match.sort().values
    widest = int((ranked[1:] - ranked[:-1]).argmax())
    threshold = ((ranked[widest] + ranked[widest + 1]) / 2).item()

    intruders, min_similarity = count_intruders(weight, adapted, TOP_K, threshold)

    assert intruders == widest + 1
    assert min_similarity == pytest.approx(best_match.min().item(), abs=1e-4)


def test_top_k_beyond_the_rank_uses_every_direction_and_bad_arguments_are_refused():
    weight = decaying_weight(12, 8)
    assert count_intruders(weight, weight, 100, THRESHOLD)[0] == 0
    with pytest.raises(ValueError, match="threshold"):
        count_intruders(weight, weight, TOP_K, 1.5)
    with pytest.raises(ValueError, match="shape"):
        count_intruders(weight, weight.T, TOP_K, THRESHOLD)


def lora_bert(folder):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=3)
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    return get_peft_model(base, config)


@torch.no_grad()
def randomize_lora(model, scale: float, seed: int = 0) -> None:
    from adapterflow.adapters.layers import lora_layers

    generator = torch.Generator().manual_seed(seed)
    for _, module in lora_layers(model):
        for factor in (module.lora_A["default"], module.lora_B["default"]):
            factor.weight.copy_(scale * torch.randn(factor.weight.shape, generator=generator))


def test_tiny_bert_report_table_plot_and_metrics(tiny_bert, tmp_path):
    from adapterflow.adapters.layers import lora_layers, short_name

    model = lora_bert(tiny_bert)
    layer_names = [short_name(name) for name, _ in lora_layers(model)]
    assert len(layer_names) == 4  # query and value in each of 2 layers

    at_init = intruder_report(model, top_k=TOP_K, threshold=THRESHOLD)  # B = 0: W' = W
    assert [row.layer for row in at_init] == layer_names
    assert all(row.intruders == 0 and row.min_similarity == pytest.approx(1.0, abs=1e-4) for row in at_init)

    randomize_lora(model, scale=3.0)
    rows = intruder_report(model, top_k=TOP_K, threshold=THRESHOLD)
    assert [row.layer for row in rows] == layer_names
    assert all(row.top_k == TOP_K and row.threshold == THRESHOLD for row in rows)
    assert sum(row.intruders for row in rows) >= 1
    assert all((row.intruders > 0) == (row.intruder_energy > 0) for row in rows)
    assert all((row.intruders > 0) == (row.min_similarity < THRESHOLD) for row in rows)

    markdown = intruder_markdown(rows)
    for row in rows:
        assert f"| {row.layer} | {row.intruders} / {TOP_K} |" in markdown
    assert f"**{sum(row.intruders for row in rows)}**" in markdown.splitlines()[-1]

    png = plot_intruders(rows, tmp_path / "intruders.png")
    assert png.read_bytes().startswith(b"\x89PNG")

    metrics = summarize(rows)
    assert metrics["intruders_total"] == sum(row.intruders for row in rows)
    assert metrics["layers_with_intruders"] == sum(row.intruders > 0 for row in rows)
    assert metrics["intruders_mean_per_layer"] == pytest.approx(metrics["intruders_total"] / len(rows))
    assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())


def test_a_4bit_base_is_read_dequantized(tiny_bert):
    from peft import LoraConfig, get_peft_model

    from adapterflow.adapters.layers import delta_factors, lora_layers
    from adapterflow.adapters.quantized import dequantized_weight, is_quantized
    from adapterflow.tasks.config import ModelSpec
    from adapterflow.tasks.model_io import load_model, resolve_base

    base = load_model(resolve_base(ModelSpec(path=str(tiny_bert))), "sequence_classification", ["a", "b", "c"], "float32", "nf4")
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]))
    assert all(is_quantized(module.base_layer) for _, module in lora_layers(model))
    assert all(row.intruders == 0 and row.min_similarity == pytest.approx(1.0, abs=1e-4) for row in intruder_report(model))

    randomize_lora(model, scale=3.0)
    rows = intruder_report(model)
    for row, (_, module) in zip(rows, lora_layers(model), strict=True):
        weight = dequantized_weight(module.base_layer)
        b, a, scaling = delta_factors(module)
        intruders, min_similarity = count_intruders(weight, weight + scaling * b @ a, TOP_K, THRESHOLD)
        assert (row.intruders, row.min_similarity) == (intruders, pytest.approx(min_similarity, abs=1e-5))


def test_summary_of_no_layers_is_zero():
    assert summarize([])["intruders_total"] == 0.0
    assert "total (0 layers)" in intruder_markdown([])
    assert LayerIntruders("x", 0, 10, 1.0).threshold == THRESHOLD


@pytest.mark.parametrize("shape", [(96, 64), (64, 160)])
def test_randomized_top_k_spans_the_exact_top_k_and_leaves_the_random_stream_alone(shape):
    from adapterflow.tasks.spectral_report import top_left_singular

    generator = torch.Generator().manual_seed(4)
    # A slowly decaying spectrum (s_i = 0.97^i) plus noise: the hard case for a sketch.
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=generator))
    weight = (u * 0.97 ** torch.arange(min(shape), dtype=torch.float32)) @ v.T + 1e-3 * torch.randn(shape, generator=generator)
    exact_u, exact_s, _ = torch.linalg.svd(weight, full_matrices=False)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    top_u, top_s = top_left_singular(weight, TOP_K)
    assert torch.equal(torch.rand(1), expected_next)
    assert top_u.shape == (shape[0], TOP_K)
    assert torch.linalg.svdvals(exact_u[:, :TOP_K].T @ top_u).min() >= 0.9999
    assert torch.allclose(top_s, exact_s[:TOP_K], rtol=1e-4)


def test_the_run_report_gives_the_exact_intruder_counts_on_tiny_bert(tiny_bert):
    from adapterflow.tasks.spectral_report import fast_intruder_report

    model = lora_bert(tiny_bert)
    torch.set_num_threads(2)
    totals = []
    for scale in (0.0, 0.5, 3.0):  # no delta, a small one, a large one
        randomize_lora(model, scale=scale)
        exact, fast = intruder_report(model, TOP_K, THRESHOLD), fast_intruder_report(model, TOP_K, THRESHOLD)
        assert [(row.layer, row.intruders, row.top_k) for row in fast] == [(row.layer, row.intruders, row.top_k) for row in exact]
        for ours, reference in zip(fast, exact, strict=True):
            assert ours.min_similarity == pytest.approx(reference.min_similarity, abs=1e-4)
            assert ours.intruder_energy == pytest.approx(reference.intruder_energy, abs=1e-4)
        totals.append(sum(row.intruders for row in exact))
    assert totals[0] == 0 and totals[-1] >= 1, totals
    assert torch.get_num_threads() == 2  # restored after the single-threaded decompositions
