"""The whole flow on embedded defaults (ephemeral-style Prefect harness, SQLite MLflow, local DVC remote)."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import cls_config, run_cli, write_config, write_jsonl

from adapterflow.flows.cli import main

pytestmark = pytest.mark.e2e
MODEL_NAME = "tiny-cls-adapter"


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "state"
    monkeypatch.setenv("ADAPTERFLOW_HOME", str(home))
    return home


def _client(state: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{state / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _outputs(model, probe):
    with torch.no_grad():
        return model.eval()(**probe).logits


def test_flow_registers_an_adapter_that_reproduces_the_trained_model(prefect_server, state, tmp_path, tiny_bert, cls_data, capsys):
    import mlflow
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    from adapterflow.adapters import apply_init
    from adapterflow.tasks.config import ModelSpec
    from adapterflow.tasks.model_io import load_model, resolve_base

    overrides = {"adapter.init": {"method": "pissa"}, "tracking.system_metrics_seconds": 0.2, "train.launch": {"mode": "accelerate"}}
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **overrides))
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "registered       tiny-cls-adapter version 1  alias @staging" in out and "ui --backend-store-uri" in out

    client, uri = _client(state)
    version = client.get_model_version_by_alias(MODEL_NAME, "staging")
    tags = version.tags
    assert tags["init_method"] == "pissa" and tags["base_model"].startswith("local:")
    assert {"data_md5", "git_commit", "config_hash", "metric.accuracy", "metric.macro_f1", "metric.eval_loss"} <= set(tags)
    assert tags["adapterflow.registration"] == "complete" and tags["lora_r"] == "4" and tags["train_steps"] == "4"
    assert version.description.startswith("pissa init, r=4; 4 steps") and "On the test split: eval_loss" in version.description
    registered_model = client.get_registered_model(MODEL_NAME)
    assert "games, science, sound" in registered_model.description and "PeftModel.from_pretrained" in registered_model.description
    assert registered_model.tags["gate_metric"] == "accuracy" and registered_model.tags["task"] == "sequence_classification"
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["adapter.r"] == "4" and run.data.params["adapter.init.method"] == "pissa"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    assert {"test/accuracy", "test/macro_f1", "test/eval_loss", "init/seconds", "init/cache_hit"} <= set(run.data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "init")}
    assert {"init/init_report.json", "init/init_spectrum.png"} <= logged
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/confusion_matrix.png", "plots/loss_curves.png"}
    spectral = {a.path for a in client.list_artifacts(run.info.run_id, "spectral")}
    assert spectral == {"spectral/intruder_dimensions.md", "spectral/intruder_dimensions.png"}
    assert tags["intruder_dimensions"] == f"{run.data.metrics['spectral/intruders_total']:.0f}"
    train_md5 = hashlib.md5(cls_data["train"].read_bytes()).hexdigest()
    assert run.inputs.dataset_inputs[0].dataset.digest == train_md5

    source = client.get_model_version_download_uri(MODEL_NAME, version.version)
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "dl"), tracking_uri=uri))
    ref = resolve_base(ModelSpec(path=str(tiny_bert)))
    probe = {"input_ids": torch.randint(5, 2000, (3, 12), generator=torch.Generator().manual_seed(0))}
    labels = ["games", "science", "sound"]
    registered = PeftModel.from_pretrained(load_model(ref, "sequence_classification", labels), str(downloaded / "artifacts" / "adapter"))

    run_dir = next((state / "runs").iterdir())
    trained = apply_init(load_model(ref, "sequence_classification", labels), run_dir / "init")
    set_peft_model_state_dict(trained, load_file(run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))
    assert not torch.allclose(_outputs(trained, probe), _outputs(load_model(ref, "sequence_classification", labels), probe), atol=1e-4)
    assert torch.allclose(_outputs(registered, probe), _outputs(trained, probe), atol=1e-5)

    import pandas as pd
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):  # as a serving process would set it; models:/ resolves through it
        served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@staging")
    predictions = list(served.predict(pd.DataFrame({"text": ["audio mixer volume", "puzzle board game"]})))
    assert len(predictions) == 2 and set(predictions) <= {"games", "science", "sound"}

    from prefect import get_client

    with get_client(sync_client=True) as prefect:  # every stage is a task run the Prefect UI shows
        stages = {t.name.rsplit("-", 1)[0] for t in prefect.read_task_runs()}
    assert {"validate-data", "open-tracking-run", "version-data", "initialize-adapter", "train", "evaluate", "spectral-report",
            "register", "close-tracking-run"} <= stages


def test_failed_data_validation_trains_nothing_and_leaves_the_registry(prefect_server, state, tmp_path, tiny_bert, cls_data):
    import pandas as pd

    frame = pd.read_csv(cls_data["validation"])
    frame.loc[0, "label"] = "cooking"
    frame.to_csv(cls_data["validation"], index=False)
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data))
    result = run_cli("run", str(config), home=state)
    assert result.returncode == 3
    err = result.stderr
    assert "data validation failed" in err and "validation: column_values_to_be_in_set on 'label'" in err
    assert "Traceback" not in err
    assert not (state / "mlflow").exists() or not _client(state)[0].search_registered_models()
    assert not list((state / "runs").glob("*/init"))


def test_diverged_training_registers_nothing(prefect_server, state, tmp_path, tiny_bert, cls_data, monkeypatch, capsys):
    from adapterflow.tasks.train import NonFiniteLossGuard

    real_guard = NonFiniteLossGuard.on_log

    def poisoned(self, args, state_, control, logs=None, **kwargs):
        return real_guard(self, args, state_, control, logs=dict(logs or {}, loss=float("nan")), **kwargs)

    monkeypatch.setattr(NonFiniteLossGuard, "on_log", poisoned)
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data))
    assert main(["run", str(config)]) == 4
    assert "training diverged: loss became nan" in capsys.readouterr().err
    client, _ = _client(state)
    assert not client.search_registered_models()
    runs = client.search_runs([client.get_experiment_by_name("tiny-cls").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_causal_lm_smoke_run_with_response_only_loss(prefect_server, state, tmp_path, tiny_llama, capsys):
    pairs = [{"prompt": f"Section of package number {i}?", "response": ["games", "science", "sound"][i % 3]} for i in range(30)]
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", pairs) for s in ("train", "validation")}
    generation = write_jsonl(tmp_path / "gen.jsonl", pairs[:4])
    config = {
        "name": "tiny-sft", "task": "causal_lm", "model": {"path": str(tiny_llama)},
        "data": {"train": str(files["train"]), "validation": str(files["validation"]), "max_length": 32,
                 "checks": {"min_rows": 5, "max_duplicate_rate": 0.5}},
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        # In the flow's process: the causal path through the launcher runs in tests/test_bench.py.
        "train": {"max_steps": 3, "batch_size": 8, "checkpoint_every": 3, "log_every": 1, "launch": {"mode": "in_process"}},
        "evaluate": {"split": "validation", "generation": {"file": str(generation), "max_new_tokens": 4}},
        "registry": {"model_name": "tiny-sft-adapter"},
    }
    assert main(["run", str(write_config(tmp_path / "sft.yaml", config))]) == 0
    client, _ = _client(state)
    version = client.get_model_version_by_alias("tiny-sft-adapter", "staging")
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["validation/perplexity"] == pytest.approx(math.exp(metrics["validation/eval_loss"]))
    assert metrics["validation/exact_match"] * 4 == round(metrics["validation/exact_match"] * 4)  # a share of the 4 prompts
    assert version.tags["metric.perplexity"] == f"{metrics['validation/perplexity']:.6g}" and version.tags["eval_split"] == "validation"


def test_auto_race_trains_its_winner_at_the_winning_learning_rate(prefect_server, state, tmp_path, tiny_bert, cls_data, capsys):
    init = {"method": "auto", "candidates": ["lora", "pissa"], "lr_multipliers": [0.1, 1.0], "budget": 0.1}
    overrides = {"adapter.init": init, "train.max_steps": 40, "train.log_every": 5}
    config = write_config(tmp_path / "auto.yaml", cls_config(tiny_bert, cls_data, **overrides))
    assert main(["run", str(config)]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "init race  round 1 (step 1): 4 of 4 contenders still in" in out
    assert "warning: adapter.init auto: its budget gives each of the 3 losing contenders about 1 step(s)" in out
    assert "init race (cut only on a validation-loss gap beyond its noise):" in out
    # The init's seconds are the race's, said as such: not the winner's init alone.
    raced = r"(lora|pissa) at lr [\d.e-]+ won a race of 4 contenders in [\d.]+ s \(\d extra steps\)"
    assert re.search(r"initialize done in [\d.]+ s: " + raced, out) and re.search(r"\ninit +" + raced + "; table: ", out)
    client, _ = _client(state)
    version = client.get_model_version_by_alias(MODEL_NAME, "staging")
    run = client.get_run(version.run_id)
    chosen = run.data.metrics["init/chosen_learning_rate"]
    assert chosen in (0.001, 0.01) and version.tags["init_method"] in ("lora", "pissa")
    assert version.tags["learning_rate"] == f"{chosen:g}"
    history = sorted(client.get_metric_history(run.info.run_id, "train/learning_rate"), key=lambda m: m.step)
    assert len(history) == 8 and history[0].value <= chosen
    for earlier, later in zip(history, history[1:]):  # linear decay to 0 over 40 steps, from the winner's LR
        assert earlier.value - later.value == pytest.approx(chosen * (later.step - earlier.step) / 40)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "init")}
    assert artifacts >= {"init/init_race.md", "init/init_race.json", "init/init_report.json"}
    assert 0 < run.data.metrics["init/race_extra_steps"] <= 4  # the losers' steps: at most 10% of max_steps
