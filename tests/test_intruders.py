"""Intruder mitigation (peft's reduce_intruder_dimension) as a candidate beside the trained adapter: what it writes,
what it lowers, which one is registered, and the config that turns it on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import LABELS, cls_config, write_config

from adapterflow.errors import ConfigError
from adapterflow.tasks.config import RunConfig, load_config
from adapterflow.tasks.intruders import LORA_FACTOR, WEIGHTS, IntruderCount, _verdict, intruder_count, mitigate_adapter
from adapterflow.tasks.model_io import resolve_base


def _config(tiny_bert, cls_data, **overrides) -> RunConfig:
    return RunConfig.model_validate(cls_config(tiny_bert, cls_data, **overrides))


def _adapter_with_intruders(config, folder: Path, **lora) -> Path:
    """A LoRA whose B·A writes new dominant directions (B ~ N(0, 0.05²): 4-5 of each layer's top 10 intrude),
    with a classifier head unlike the base's, as a trained one is. `lora`: more LoraConfig settings."""
    from peft import LoraConfig, get_peft_model

    from adapterflow.tasks.model_io import load_model

    torch.manual_seed(0)
    base = load_model(resolve_base(config.model), config.task, config.data.labels)
    model = get_peft_model(
        base, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS", **lora})
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
            elif "modules_to_save" in name:
                param.add_(0.5)
    model.save_pretrained(folder)
    return folder


def _deltas(config, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """s·B·A per layer, as plain peft loads the adapter on the untouched base."""
    from peft import PeftModel

    from adapterflow.adapters.layers import delta_factors, lora_layers
    from adapterflow.tasks.model_io import load_model

    model = PeftModel.from_pretrained(load_model(resolve_base(config.model), config.task, config.data.labels), str(adapter_dir))
    return {name: scaling * b @ a for name, (b, a, scaling) in ((n, delta_factors(m)) for n, m in lora_layers(model))}


def _exact_mitigation(base_weight: torch.Tensor, delta: torch.Tensor, top_k: int, threshold: float, scale: float) -> torch.Tensor:
    """The paper's mitigated ΔW without a rank limit: the intruders' singular values in W + ΔW multiplied by `scale`."""
    base_u = torch.linalg.svd(base_weight, full_matrices=False)[0]
    u, s, vh = torch.linalg.svd(base_weight + delta, full_matrices=False)
    intruding = torch.where((u[:, :top_k].T @ base_u).abs().amax(dim=1) < threshold)[0]
    shrink = (u[:, intruding] * s[intruding]) @ vh[intruding]
    return delta - (1 - scale) * shrink


def test_mitigation_rewrites_a_and_b_only_and_lowers_the_intruders_it_targets(tiny_bert, cls_data, tmp_path):
    from safetensors.torch import load_file

    from adapterflow.tasks.model_io import load_model

    config = _config(tiny_bert, cls_data, **{"evaluate.intruders": {"mitigate": {"scale": 0.5}}})
    trained = _adapter_with_intruders(config, tmp_path / "trained")
    mitigated = mitigate_adapter(config, resolve_base(config.model), trained, tmp_path / "mitigated")

    before, after = load_file(trained / WEIGHTS), load_file(mitigated / WEIGHTS)
    assert before.keys() == after.keys()
    trained_config, mitigated_config = (json.loads((d / "adapter_config.json").read_text()) for d in (trained, mitigated))
    assert {k: v for k, v in mitigated_config.items() if k != "r"} == {k: v for k, v in trained_config.items() if k != "r"}
    for key in before:  # the trained head stays (peft's second adapter would carry an untrained copy of it)
        changed = not torch.equal(before[key], after[key])
        assert changed == bool(LORA_FACTOR.search(key)), key

    base_ref = resolve_base(config.model)
    unmitigated, lowered = intruder_count(config, base_ref, trained), intruder_count(config, base_ref, mitigated)
    print(f"intruders {unmitigated.total} -> {lowered.total}, energy share {unmitigated.energy:.3f} -> {lowered.energy:.3f}")
    assert lowered.total < unmitigated.total and lowered.energy < unmitigated.energy

    # peft refits at the adapter's rank; padded, its refit is the paper's mitigated ΔW exactly, at r + (most intruders).
    saved_rank = mitigated_config["r"]
    assert 4 < saved_rank <= 4 + 10
    weights = {n: m.weight.detach() for n, m in load_model(base_ref, config.task, LABELS).named_modules() if isinstance(m, torch.nn.Linear)}
    fitted = _deltas(config, mitigated)
    for name, delta in _deltas(config, trained).items():
        exact = _exact_mitigation(weights[name.removeprefix("base_model.model.")].double(), delta.double(), 10, 0.5, 0.5).float()
        # peft's refit is float32 SVDs: ~1e-5 of the largest entry off the float64 answer, by CPU (1.4e-5 seen).
        assert torch.allclose(fitted[name], exact, atol=1e-4 * exact.abs().max().item()), name
        dropped_at_r = torch.linalg.svdvals(exact)[4:].norm() / exact.norm()  # what a rank-4 fit (peft's own) loses
        print(f"{name}: rank {saved_rank}; a rank-4 refit would drop {dropped_at_r.item():.1%} of the mitigated ΔW")


@pytest.mark.parametrize("lora", [{"use_rslora": True, "rank_pattern": {"value": 6}, "alpha_pattern": {"query": 3.0}}])
def test_the_padded_rank_keeps_each_layers_scaling_under_rslora_and_patterns(tiny_bert, cls_data, tmp_path, lora):
    from adapterflow.tasks.model_io import load_model

    config = _config(tiny_bert, cls_data, **{"evaluate.intruders": {"mitigate": {"scale": 0.25}}})
    base_ref = resolve_base(config.model)
    trained = _adapter_with_intruders(config, tmp_path / "trained", **lora)
    mitigated = mitigate_adapter(config, base_ref, trained, tmp_path / "mitigated")
    saved = json.loads((mitigated / "adapter_config.json").read_text())
    extra = saved["r"] - 4
    assert extra > 0 and saved["rank_pattern"] == {"value": 6 + extra} and saved["alpha_pattern"] == {"query": 3.0}
    weights = {n: m.weight.detach() for n, m in load_model(base_ref, config.task, LABELS).named_modules() if isinstance(m, torch.nn.Linear)}
    fitted = _deltas(config, mitigated)
    for name, delta in _deltas(config, trained).items():
        exact = _exact_mitigation(weights[name.removeprefix("base_model.model.")], delta, 10, 0.5, 0.25)
        assert torch.allclose(fitted[name], exact, atol=1e-5 * exact.abs().max().item()), name


def test_an_embedding_layer_is_refused_with_the_fix(tiny_bert, cls_data, tmp_path):
    from adapterflow.errors import ModelError

    config = _config(tiny_bert, cls_data, **{"evaluate.intruders": {"mitigate": True}})
    trained = _adapter_with_intruders(config, tmp_path / "trained", target_modules=["query", "word_embeddings"])
    with pytest.raises(ModelError, match="word_embeddings is not one .*remove it from adapter.target_modules"):
        mitigate_adapter(config, resolve_base(config.model), trained, tmp_path / "mitigated")


def test_scale_zero_removes_the_intruders_and_a_layer_without_any_is_left_alone(tiny_bert, cls_data, tmp_path):
    config = _config(tiny_bert, cls_data, **{"evaluate.intruders": {"mitigate": {"scale": 0.0}}})
    base_ref = resolve_base(config.model)
    trained = _adapter_with_intruders(config, tmp_path / "trained")
    mitigated = mitigate_adapter(config, base_ref, trained, tmp_path / "mitigated")
    assert intruder_count(config, base_ref, trained).total >= 16 and intruder_count(config, base_ref, mitigated).total <= 1

    strict = _config(tiny_bert, cls_data, **{"evaluate.intruders": {"threshold": 0.01, "mitigate": True}})
    untouched = mitigate_adapter(strict, base_ref, trained, tmp_path / "untouched")  # nothing is that unlike W
    from safetensors.torch import load_file

    assert all(torch.equal(v, load_file(untouched / WEIGHTS)[k]) for k, v in load_file(trained / WEIGHTS).items())


def _count(total, energy=0.5):
    return IntruderCount(total, energy)


def test_the_better_on_validation_is_chosen_and_forgetting_decides_within_the_tolerance():
    counts = {"unmitigated": _count(5), "mitigated": _count(3)}
    assert _verdict("accuracy", 0.0, {"unmitigated": 0.80, "mitigated": 0.82}, counts, None)[0] == "mitigated"
    assert _verdict("eval_loss", 0.0, {"unmitigated": 0.50, "mitigated": 0.52}, counts, None)[0] == "unmitigated"
    assert _verdict("eval_loss", 0.05, {"unmitigated": 0.50, "mitigated": 0.52}, counts, None)[0] == "mitigated"
    # A tie goes to the one that forgets less: on the probe when there is one, else by intruder dimensions.
    tie = {"unmitigated": 0.80, "mitigated": 0.80}
    assert _verdict("accuracy", 0.0, tie, counts, None)[0] == "mitigated"
    assert _verdict("accuracy", 0.0, tie, {"unmitigated": _count(5, 0.6), "mitigated": _count(5, 0.4)}, None)[0] == "mitigated"
    assert _verdict("accuracy", 0.0, tie, {"unmitigated": _count(5), "mitigated": _count(5)}, None)[0] == "unmitigated"
    probe = {"file": "f.csv", "unmitigated": 0.70, "mitigated": 0.69}
    chosen, reason = _verdict("accuracy", 0.0, tie, counts, probe)
    assert chosen == "unmitigated" and "accuracy on the forgetting file 0.6900 vs 0.7000" in reason
    assert _verdict("accuracy", 0.05, {"unmitigated": 0.80, "mitigated": 0.78}, counts, {**probe, "mitigated": 0.75})[0] == "mitigated"


def test_off_by_default_and_out_of_the_digest_until_set(tiny_bert, cls_data):
    plain = _config(tiny_bert, cls_data)
    assert plain.evaluate.intruders.mitigate is None
    assert _config(tiny_bert, cls_data, **{"evaluate.intruders": {"mitigate": False}}).digest() == plain.digest()
    on = _config(tiny_bert, cls_data, **{"evaluate.intruders": {"mitigate": True}})
    assert on.evaluate.intruders.mitigate.scale == 0.75 and on.digest() != plain.digest()
    assert _config(tiny_bert, cls_data, **{"evaluate.intruders": {"mitigate": {"scale": 0.5}}}).digest() != on.digest()
    assert _config(tiny_bert, cls_data, **{"evaluate.intruders": None}).digest() != plain.digest()


def test_a_fixed_config_keeps_the_digest_it_had_before_the_key_existed():
    """Computed by adapterflow before evaluate.intruders.mitigate existed (commit 46796fd): registered versions carry it."""
    fixed = {
        "name": "digest-pin",
        "task": "sequence_classification",
        "model": {"path": "/models/base"},
        "data": {"train": "/data/train.csv", "validation": "/data/validation.csv", "test": "/data/test.csv", "labels": ["a", "b"]},
        "train": {"max_steps": 10},
        "registry": {"model_name": "pin"},
    }
    assert RunConfig.model_validate(fixed).digest() == "0ae5760b0917d898"
    assert RunConfig.model_validate({**fixed, "evaluate": {"intruders": None}}).digest() == "866f2cd0de7574a2"


@pytest.mark.parametrize(
    ("intruders", "message"),
    [
        ({"mitigate": {"scale": 1.0}}, "evaluate.intruders.mitigate.scale: 1 keeps every intruder dimension as it is"),
        ({"mitigate": {"scale": -0.1}}, "evaluate.intruders.mitigate.scale: Input should be greater than or equal to 0"),
        ({"mitigate": {"tolerance": -1}}, "evaluate.intruders.mitigate.tolerance: Input should be greater than or equal to 0"),
        ({"mitigate": {"lambda": 0.5}}, "evaluate.intruders.mitigate.lambda: unknown key"),
        ({"mitigate": "yes"}, "evaluate.intruders.mitigate"),
    ],
)
def test_bad_values_are_one_config_error(tiny_bert, cls_data, tmp_path, intruders, message):
    path = write_config(tmp_path / "bad.yaml", cls_config(tiny_bert, cls_data, **{"evaluate.intruders": intruders}))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(path)


def test_dora_is_refused_at_check_time(tiny_bert, cls_data, tmp_path, capsys):
    from adapterflow.flows.cli import main

    config = cls_config(tiny_bert, cls_data, **{"adapter.variant": "dora", "evaluate.intruders": {"mitigate": True}})
    assert main(["check", str(write_config(tmp_path / "dora.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert "evaluate.intruders.mitigate rewrites B·A only" in err and "set adapter.variant: lora" in err and "Traceback" not in err


@pytest.mark.e2e
def test_flow_registers_the_better_of_mitigated_and_unmitigated_and_records_the_choice(
    prefect_server, tmp_path, tiny_bert, cls_data, monkeypatch
):
    import mlflow
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    import adapterflow.flows.retrain as flow_module
    from adapterflow.flows.cli import main
    from adapterflow.tasks.evaluate import evaluate_adapter

    home = tmp_path / "state"
    monkeypatch.setenv("ADAPTERFLOW_HOME", str(home))
    summaries, retrain = [], flow_module.retrain
    monkeypatch.setattr(flow_module, "retrain", lambda *args, **kwargs: summaries.append(retrain(*args, **kwargs)) or summaries[-1])
    overrides = {"train.learning_rate": 0.05, "evaluate.intruders": {"mitigate": {"scale": 0.0}}}
    assert main(["run", str(write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **overrides)))]) == 0

    run_dir, choice = Path(summaries[0]["run_dir"]), summaries[0]["intruder_mitigation"]
    print(json.dumps({k: v for k, v in choice.items() if k != "adapter_dir"}))
    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias("tiny-cls-adapter", "staging")
    run = client.get_run(version.run_id)
    metrics, chosen = run.data.metrics, choice["chosen"]
    assert run.data.tags["adapterflow.intruder_mitigation"].startswith(chosen)
    assert run.data.params["evaluate.intruders.mitigate.scale"] == "0.0"
    assert metrics["mitigation/chose_mitigated"] == float(chosen == "mitigated")
    gain = metrics["mitigation/mitigated_accuracy"] - metrics["mitigation/unmitigated_accuracy"]
    fewer = metrics["mitigation/intruders_mitigated"] < metrics["mitigation/intruders_unmitigated"]
    assert chosen == ("mitigated" if gain > 0 or (gain == 0 and fewer) else "unmitigated")
    assert metrics["mitigation/intruders_mitigated"] < metrics["mitigation/intruders_unmitigated"]  # scale 0 removes them
    report = client.download_artifacts(run.info.run_id, "mitigation/intruder_mitigation.json", str(tmp_path))
    assert json.loads(Path(report).read_text())["chosen"] == chosen

    # What is registered is the chosen folder, and plain peft loads it on the untouched base with the score it was chosen by.
    source = client.get_model_version_download_uri("tiny-cls-adapter", version.version)
    registered = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "reg"), tracking_uri=uri))
    registered = next((registered / "artifacts").rglob(WEIGHTS)).parent  # the folder keeps its run-folder name
    expected = load_file(run_dir / ("adapter_mitigated" if chosen == "mitigated" else "adapter") / WEIGHTS)
    assert all(torch.equal(value, expected[key]) for key, value in load_file(registered / WEIGHTS).items())
    config = load_config(tmp_path / "run.yaml")
    score = evaluate_adapter(config, resolve_base(config.model), registered, "validation")["accuracy"]
    assert score == metrics[f"mitigation/{chosen}_accuracy"]


def test_both_candidates_are_scored_on_the_forgetting_file_when_one_is_set(tiny_bert, cls_data, tmp_path):
    from adapterflow.tasks.evaluate import evaluate_adapter
    from adapterflow.tasks.intruders import choose_adapter

    probe_file = cls_data["test"]
    overrides = {"evaluate.intruders": {"mitigate": {"scale": 0.0}}, "promotion.forgetting": {"file": str(probe_file)}}
    config = _config(tiny_bert, cls_data, **overrides)
    base_ref = resolve_base(config.model)
    trained = _adapter_with_intruders(config, tmp_path / "trained")
    mitigated = mitigate_adapter(config, base_ref, trained, tmp_path / "mitigated")
    choice = choose_adapter(config, base_ref, str(trained), str(mitigated))

    as_test = config.model_copy(update={"data": config.data.model_copy(update={"test": str(probe_file)})})
    for name, folder in (("unmitigated", trained), ("mitigated", mitigated)):
        assert choice.forgetting[name] == evaluate_adapter(as_test, base_ref, folder, "test")["accuracy"]
        assert getattr(choice, name) == evaluate_adapter(config, base_ref, folder, "validation")["accuracy"]
    assert choice.adapter_dir == str(mitigated if choice.chosen == "mitigated" else trained)
    assert {"forgetting_mitigated_accuracy", "forgetting_unmitigated_accuracy"} <= set(choice.metrics())
    if choice.mitigated <= choice.unmitigated:  # not better on validation: the forgetting file decided
        assert "on the forgetting file" in choice.reason
