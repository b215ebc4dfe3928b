"""Training through `accelerate launch`: a killed process registers nothing and its rerun resumes; DDP matches one process;
the job file holds no credential and the failure message promises a resume only when there is a checkpoint to resume."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cls_config, wait_for, write_config

ACCELERATE = {"mode": "accelerate"}
SENTINEL = "Launch-S3ntinel-pw"
SECRET_URI = f"http://alice:{SENTINEL}@127.0.0.1:5999"


def _first_complete_checkpoint(home: Path):
    from adapterflow.tasks.resume import complete_checkpoints

    return next((c for folder in home.glob("runs/*/checkpoints") for c in complete_checkpoints(folder)), None)


@pytest.mark.e2e
def test_killed_training_registers_nothing_and_the_rerun_resumes_from_the_last_checkpoint(prefect_server, tmp_path, tiny_bert, cls_data):
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from adapterflow.tasks.resume import complete_checkpoints

    home = tmp_path / "state"
    overrides = {"train.launch": ACCELERATE, "train.max_steps": 200, "train.checkpoint_every": 10, "train.threads": 1}
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **overrides))
    env = dict(os.environ, ADAPTERFLOW_HOME=str(home), PREFECT_API_URL=PREFECT_API_URL.value() or "")
    command = [sys.executable, "-m", "adapterflow.flows.cli", "run", str(config)]
    flow = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        checkpoint = wait_for(lambda: _first_complete_checkpoint(home), 240, "the first checkpoint", interval=0.05)
        killed_run = checkpoint.parents[1]
        training_group = int((killed_run / "train.pid").read_text())
        os.killpg(training_group, signal.SIGKILL)
        out, err = flow.communicate(timeout=120)
    finally:
        flow.kill()
    assert flow.returncode == 4, err
    assert "the training process was killed by signal 9" in err and "resumes from the last checkpoint" in err
    assert f"Run folder: {killed_run}  MLflow run: " in err and "Traceback" not in err  # where to look, in the message
    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    assert not client.search_registered_models()
    assert [r.info.status for r in client.search_runs([client.get_experiment_by_name("tiny-cls").experiment_id])] == ["FAILED"]

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    resumed_step = int(rerun.stdout.split("resumed from checkpoint-")[1].split()[0])
    complete = [int(c.name.removeprefix("checkpoint-")) for c in complete_checkpoints(killed_run / "checkpoints")]
    assert resumed_step == max(complete) and "training         200 steps" in rerun.stdout  # the newest complete one
    version = client.get_model_version_by_alias("tiny-cls-adapter", "staging")
    logged_steps = [m.step for m in client.get_metric_history(version.run_id, "train/loss")]
    assert min(logged_steps) == resumed_step + 1 and max(logged_steps) == 200  # only the remaining steps trained


def _trained_adapter(tmp_path, tiny_bert, cls_data, processes: int, init_dir: Path, name: str) -> dict:
    from safetensors.torch import load_file

    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.launch import launch_training
    from adapterflow.tasks.model_io import resolve_base

    overrides = {"train.launch": {**ACCELERATE, "processes": processes}, "train.max_steps": 4, "train.batch_size": 8, "train.threads": 1}
    config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **overrides))
    run_dir = tmp_path / name
    run_dir.mkdir()
    result = launch_training(config, resolve_base(config.model), init_dir, run_dir)
    assert result.processes == processes and result.steps == 4
    _journal_from_one_rank(run_dir)
    return load_file(Path(result.adapter_dir) / "adapter_model.safetensors")


def _journal_from_one_rank(run_dir: Path) -> None:
    """Every rank runs the journal callback; only rank 0 writes, so each event appears once."""
    from adapterflow.tasks.journal import JOURNAL_FILE, read_records

    records, _ = read_records(run_dir / JOURNAL_FILE, 0)
    events = [r["event"] for r in records]
    assert events.count("begin") == 1 and events.count("end") == 1, events
    assert [r["step"] for r in records if r["event"] == "log" and "train/loss" in r["metrics"]] == [1, 2, 3, 4]


def _without_dropout(model_dir: Path, folder: Path) -> Path:
    """The base model's own dropout draws per-process masks: only a dropout-free model can match exactly."""
    import json
    import shutil

    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.e2e
def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path, tiny_bert, cls_data):
    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.model_io import resolve_base

    tiny_bert = _without_dropout(tiny_bert, tmp_path / "no-dropout-bert")

    # EVA is data-driven: computed once here, then read by every rank from the init folder.
    config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "eva"}}))
    init = initialize_adapter(config, resolve_base(config.model), tmp_path / "init-run")
    single = _trained_adapter(tmp_path, tiny_bert, cls_data, 1, Path(init.init_dir), "single")
    ddp = _trained_adapter(tmp_path, tiny_bert, cls_data, 2, Path(init.init_dir), "ddp")
    assert single.keys() == ddp.keys()
    for key in single:
        assert torch.allclose(single[key], ddp[key], rtol=1e-4, atol=1e-5), key
    initial = __import__("safetensors.torch", fromlist=["load_file"]).load_file(Path(init.init_dir) / "adapter_model.safetensors")
    assert any(not torch.allclose(single[k], initial[k]) for k in single if "lora_B" in k)  # it trained


# --- the job file and the failure message (no subprocess) -----------------------------------------------


def _config(tmp_path, **overrides):
    from adapterflow.tasks.config import RunConfig

    data = {split: tmp_path / f"{split}.csv" for split in ("train", "validation", "test")}
    return RunConfig.model_validate(cls_config(tmp_path / "model", data, **overrides))


def _base_ref():
    from adapterflow.tasks.model_io import BaseModelRef

    return BaseModelRef("/models/tiny", None, "local:abc", "path")


def test_the_job_file_is_private_and_holds_no_credential_and_the_workers_get_no_tracking_uri(tmp_path):
    from adapterflow.tasks import launch

    config = _config(tmp_path, **{"tracking.mlflow_uri": SECRET_URI})
    (tmp_path / launch.JOB_FILE).write_text("an older job, world-readable")
    os.chmod(tmp_path / launch.JOB_FILE, 0o644)
    job = launch._write_job(config, _base_ref(), tmp_path / "init", tmp_path, None)

    assert stat.S_IMODE(job.stat().st_mode) == 0o600  # created so, not an older file's mode kept
    text = job.read_text()
    assert SENTINEL not in text and "http://alice:***@127.0.0.1:5999" in text
    loaded = json.loads(text)
    assert "tracking" not in loaded  # the workers write the journal; the flow ships it
    assert loaded["config"]["tracking"]["mlflow_uri"] == "http://alice:***@127.0.0.1:5999"


def _crashed_run(tmp_path: Path, log: str, checkpoint: bool) -> Path:
    from adapterflow.tasks import launch

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / launch.LOG_FILE).write_text(log)
    if checkpoint:
        (run_dir / "checkpoints" / "checkpoint-2").mkdir()
        (run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    return run_dir


def test_a_crash_before_any_checkpoint_says_a_rerun_starts_over_and_masks_credentials_in_the_log_tail(tmp_path, monkeypatch):
    from adapterflow.tasks import launch

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-" + SENTINEL)
    log = f"step 1\nMlflowException: API request to {SECRET_URI}/api/2.0/mlflow/runs/log-batch failed\nauth env-{SENTINEL}\n"
    run_dir = _crashed_run(tmp_path, log, checkpoint=False)
    (run_dir / "checkpoints" / "checkpoint-1").mkdir()  # cut short: no trainer_state.json, nothing to resume
    message = str(launch._failure(1, run_dir))
    assert "the training process exited with code 1" in message and "API request to http://alice:***@127.0.0.1:5999" in message
    assert SENTINEL not in message
    assert "resumes" not in message and "a rerun of the same config starts training over" in message


@pytest.mark.parametrize("state", ["", '{"global_step": 4, "log_hist'], ids=["empty", "cut-off"])
def test_a_kill_while_the_checkpoint_is_written_leaves_nothing_to_resume(tmp_path, state):
    """The flaky CI failure: a kill right after trainer_state.json was opened left it empty, and the rerun resumed
    from it and crashed on the JSON."""
    from adapterflow.tasks import launch
    from adapterflow.tasks.resume import complete_checkpoints

    run_dir = _crashed_run(tmp_path, "step 4\n", checkpoint=True)
    (run_dir / "checkpoints" / "checkpoint-4").mkdir()
    (run_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text(state)
    assert [c.name for c in complete_checkpoints(run_dir / "checkpoints")] == ["checkpoint-2"]
    (run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text(state)
    assert "a rerun of the same config starts training over" in str(launch._failure(-signal.SIGKILL, run_dir))


def test_a_crash_after_a_checkpoint_says_the_rerun_resumes(tmp_path):
    from adapterflow.tasks import launch

    message = str(launch._failure(-signal.SIGKILL, _crashed_run(tmp_path, "step 3\n", checkpoint=True)))
    assert "killed by signal 9" in message and "A rerun of the same config resumes from the last checkpoint." in message


def test_divergence_from_the_workers_error_file_never_promises_a_resume(tmp_path):
    from adapterflow.errors import TrainingError
    from adapterflow.tasks import launch

    run_dir = _crashed_run(tmp_path, "step 3\n", checkpoint=True)  # even with checkpoints: it would diverge again
    diverged = "training diverged: loss became nan at step 3. Nothing was registered. Lower train.learning_rate (now 10) or check the data."
    (run_dir / launch.ERROR_FILE).write_text(json.dumps({"type": "TrainingError", "message": diverged}))
    error = launch._failure(3, run_dir)
    assert isinstance(error, TrainingError) and str(error) == diverged
    assert "resume" not in str(error) and "rerun" not in str(error).lower()
