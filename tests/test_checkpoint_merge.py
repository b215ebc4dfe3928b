"""Checkpoint merging (Metrics-Weighted Averaging): weights, exact averages, and the choice the flow records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cls_config, write_config

from adapterflow.tasks.checkpoint_merge import CheckpointSnapshots, Snapshot, load_tensors, mwa_weights, weighted_average


def _snapshots(losses, steps=None):
    return [Snapshot(step, loss, {}) for step, loss in zip(steps or range(1, len(losses) + 1), losses)]


def test_lower_loss_and_later_steps_weigh_more_and_penalty_zero_is_uniform():
    by_loss = mwa_weights(_snapshots([0.8, 0.4, 0.2]), penalty=1.0, weight_by="loss")
    assert by_loss == pytest.approx([0.8**-1 / 8.75, 0.4**-1 / 8.75, 0.2**-1 / 8.75])
    assert mwa_weights(_snapshots([0.8, 0.4, 0.2]), penalty=0.0, weight_by="loss") == pytest.approx([1 / 3] * 3)
    sharper = mwa_weights(_snapshots([0.8, 0.4, 0.2]), penalty=4.0, weight_by="loss")
    assert sharper[-1] > by_loss[-1] and sum(sharper) == pytest.approx(1.0)
    by_steps = mwa_weights(_snapshots([1, 1, 1], steps=[10, 20, 30]), penalty=1.0, weight_by="steps")
    assert by_steps == pytest.approx([10 / 60, 20 / 60, 30 / 60])


def test_lora_sb_merge_averages_the_effective_b_and_keeps_it_in_span_of_b0(tiny_bert):
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from adapterflow.adapters.frozen_factors import fold_middle, train_middle_only

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    train_middle_only(model)
    lora_b = next(m for n, m in model.named_modules() if n.endswith("lora_B.default"))
    basis = lora_b.parametrizations.weight[0].basis
    recorder, middles = CheckpointSnapshots(keep=2), []
    for step in (1, 2, 3):
        with torch.no_grad():
            lora_b.parametrizations.weight.original.normal_()
        middles.append(lora_b.parametrizations.weight.original.detach().clone())
        recorder.take(model, SimpleNamespace(global_step=step, log_history=[{"loss": 1.0 / step}]))
    kept = list(recorder.snapshots)
    assert [s.step for s in kept] == [2, 3]  # only the last K
    weights = mwa_weights(kept, 1.0, "loss")
    fold_middle(model)
    load_tensors(model, weighted_average(kept, weights))
    expected = basis @ (weights[0] * middles[1] + weights[1] * middles[2])
    assert torch.allclose(lora_b.weight, expected, atol=1e-5)


@pytest.mark.e2e
def test_flow_registers_the_better_of_merged_and_final_and_records_the_choice(
        prefect_server, tmp_path, tiny_bert, cls_data, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from adapterflow.flows.cli import main

    home = tmp_path / "state"
    monkeypatch.setenv("ADAPTERFLOW_HOME", str(home))
    overrides = {"train.max_steps": 6, "train.checkpoint_every": 2, "train.checkpoint_merge": {"checkpoints": 2, "penalty": 2.0}}
    assert main(["run", str(write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **overrides)))]) == 0
    assert "checkpoint merge " in capsys.readouterr().out

    run_dir = next((home / "runs").iterdir())
    ckpts = [load_file(run_dir / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors") for step in (4, 6)]
    merged = load_file(run_dir / "adapter_merged" / "adapter_model.safetensors")
    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias("tiny-cls-adapter", "staging")
    run = client.get_run(version.run_id)
    report = json.loads(open(client.download_artifacts(run.info.run_id, "merge/checkpoint_merge.json", str(tmp_path))).read())
    assert [c["step"] for c in report["checkpoints"]] == [4, 6]
    weights = [c["weight"] for c in report["checkpoints"]]
    losses = [c["train_loss"] for c in report["checkpoints"]]
    assert weights == pytest.approx([losses[0] ** -2 / sum(x**-2 for x in losses), losses[1] ** -2 / sum(x**-2 for x in losses)])
    for key, value in merged.items():  # plain LoRA: the merge is the weighted average of the saved checkpoints
        assert torch.allclose(value, weights[0] * ckpts[0][key] + weights[1] * ckpts[1][key], atol=1e-6), key

    chosen = version.tags["checkpoint_merge"].split()[0]
    assert chosen in {"merged", "final"} and run.data.metrics["merge/chose_merged"] == float(chosen == "merged")
    final, merged_score = run.data.metrics["merge/final_accuracy"], run.data.metrics["merge/merged_accuracy"]
    assert chosen == ("merged" if merged_score > final else "final")
    import mlflow

    source = client.get_model_version_download_uri("tiny-cls-adapter", version.version)
    registered = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "reg"), tracking_uri=uri))
    registered = registered / "artifacts" / "adapter" / "adapter_model.safetensors"
    expected_dir = "adapter_merged" if chosen == "merged" else "adapter"
    assert load_file(registered).keys() == load_file(run_dir / expected_dir / "adapter_model.safetensors").keys()
    assert all(torch.equal(v, load_file(run_dir / expected_dir / "adapter_model.safetensors")[k]) for k, v in load_file(registered).items())
