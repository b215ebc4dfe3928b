"""Promotion staging → production: re-evaluated gate, refusals, rollback, history, one winner under concurrency."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, cls_config, run_cli, write_config

from adapterflow.flows.cli import main

pytestmark = pytest.mark.e2e
NAME = "tiny-cls-adapter"
GOOD = {"train.max_steps": 20, "train.learning_rate": 0.02, "adapter.target_modules": ["query", "value", "dense"],
        "train.checkpoint_every": 100, "promotion": {"metric": "accuracy"}}
BAD = {**GOOD, "train.max_steps": 1, "train.learning_rate": 1e-6}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERFLOW_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


def _client(home):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _retrain(tmp_path, tiny_bert, cls_data, overrides, *flags) -> None:
    assert main(["run", str(write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **overrides))), *flags]) == 0


def _aliases(home) -> dict:
    return {alias: str(v) for alias, v in _client(home).get_registered_model(NAME).aliases.items()}


def test_promotion_lifecycle(prefect_server, home, tmp_path, tiny_bert, cls_data, capsys, monkeypatch):
    import mlflow.tracking._model_registry.utils as registry_utils

    # Another registry set process-wide (as mlflow.set_registry_uri does) must not be consulted.
    monkeypatch.setattr(registry_utils, "_registry_uri", f"sqlite:///{tmp_path / 'another-registry.db'}")
    _retrain(tmp_path, tiny_bert, cls_data, GOOD)
    assert main(["promote", NAME]) == 0  # a first version must beat the bare base model
    assert "promoted version 1 to @production" in capsys.readouterr().out
    assert _aliases(home) == {"staging": "1", "production": "1"}
    assert main(["rollback", NAME]) == 5
    assert "no previous production version" in capsys.readouterr().err

    _retrain(tmp_path, tiny_bert, cls_data, BAD)
    assert main(["promote", NAME]) == 1
    assert "version 2 refused" in capsys.readouterr().out
    assert _aliases(home) == {"staging": "2", "production": "1"}

    _retrain(tmp_path, tiny_bert, cls_data, GOOD, "--force")  # production's own run again: ties it, min_improvement 0 passes
    codes = _concurrent_promotions(home, 2)
    assert sorted(codes) == [0, 5]  # one wins; the other is refused with a clear message
    assert _aliases(home) == {"staging": "3", "production": "3"}

    assert main(["rollback", NAME]) == 0
    assert "rolled back from version 3 to version 1" in capsys.readouterr().out
    assert _aliases(home)["production"] == "1"

    assert main(["status", NAME]) == 0
    out = capsys.readouterr().out
    assert "@production → v1" in out and "@staging → v3" in out
    actions = [line.split()[1] for line in out.split("history\n")[1].splitlines()]
    assert actions == ["promoted", "refused", "promoted", "rollback"]
    refusal = {k: v for k, v in _client(home).get_model_version(NAME, "2").tags.items() if k.startswith("adapterflow.event.")}
    assert len(refusal) == 1 and '"action": "refused"' in next(iter(refusal.values()))
    import getpass
    import json

    # Who: the OS user on a store without authentication (on a server with auth, the MLflow user: test_infra.py).
    assert json.loads(next(iter(refusal.values())))["by"] == getpass.getuser()

    assert main(["lineage", NAME, "3"]) == 0
    out = capsys.readouterr().out
    import hashlib

    assert f"md5 {hashlib.md5(cls_data['test'].read_bytes()).hexdigest()}" in out and str(cls_data["test"]) in out
    assert "promoted against production v1 (accuracy" in out and "init method     lora" in out and "git commit" in out


def _concurrent_promotions(home, count: int) -> list[int]:
    env = dict(os.environ, ADAPTERFLOW_HOME=str(home))
    processes = [subprocess.Popen([sys.executable, "-m", "adapterflow.flows.cli", "promote", NAME], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]
    results = [p.communicate(timeout=300) for p in processes]
    losers = [err for p, (_, err) in zip(processes, results) if p.returncode == 5]
    assert all("in progress" in err or "already @production" in err for err in losers), losers
    return [p.returncode for p in processes]


def test_changed_evaluation_split_is_refused(prefect_server, home, tmp_path, tiny_bert, cls_data, capsys):
    _retrain(tmp_path, tiny_bert, cls_data, BAD)
    cls_data["test"].write_text(cls_data["test"].read_text() + "extra row about games,games\n")
    assert main(["promote", NAME]) == 5
    assert "changed since version 1 was registered" in capsys.readouterr().err
    assert "production" not in _aliases(home)


def test_registry_commands_name_the_problem(tmp_path):
    home = tmp_path / "state"
    result = _cli_import_times("promote", "no-such-model", home=home)
    assert result.returncode == 5 and "no registered model named 'no-such-model'" in result.stderr
    assert "prefect" not in _imported(result)  # a registry command has no use for Prefect (1.2 s of imports)
    result = run_cli("status", "x", "--tracking-uri", "http://127.0.0.1:9", home=home)
    assert result.returncode == 5 and "cannot be reached" in result.stderr
    _client(home).create_registered_model("never-trained")
    result = run_cli("promote", "never-trained", home=home)
    assert result.returncode == 5 and "has no version with alias @staging; run a retrain first" in result.stderr
    assert _client(home).get_registered_model("never-trained").aliases == {}


def test_promote_auto_runs_the_gate_at_the_end_of_the_flow(prefect_server, home, tmp_path, tiny_bert, cls_data, capsys):
    _retrain(tmp_path, tiny_bert, cls_data, {**BAD, "promotion": {"promote": "auto", "metric": "accuracy"}})
    assert "promotion gate   not promoted: accuracy" in capsys.readouterr().out
    assert "production" not in _aliases(home)


def test_unchanged_config_and_data_skip_training_unless_forced(prefect_server, home, tmp_path, tiny_bert, cls_data, capsys):
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **BAD))
    assert main(["run", str(config)]) == 0
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    assert "skipped: tiny-cls-adapter version 1 (@staging) was trained on this exact config and data" in capsys.readouterr().out
    # A cron job's unchanged retrain against a Prefect server (the harness here) decides to skip before the heavy imports.
    skipped = _cli_import_times("run", str(config), home=home)
    assert "skipped: tiny-cls-adapter version 1" in skipped.stdout, skipped.stderr[-3000:]
    imported = _imported(skipped)
    assert "mlflow" in imported and not {"torch", "peft", "great_expectations"} & imported
    assert main(["run", str(config), "--force"]) == 0
    assert "registered       tiny-cls-adapter version 2" in capsys.readouterr().out
    cls_data["train"].write_text(cls_data["train"].read_text() + "a new row about sound mixers,sound\n")
    assert main(["run", str(config)]) == 0  # new data: a full run
    assert "registered       tiny-cls-adapter version 3" in capsys.readouterr().out


def _cli_import_times(*args: str, home) -> subprocess.CompletedProcess:
    """The CLI in a process of its own under `python -X importtime`: stderr lists every module it imported."""
    from prefect.settings import PREFECT_API_URL

    api = {"PREFECT_API_URL": PREFECT_API_URL.value()} if PREFECT_API_URL.value() else {}  # the harness's, in a flow test
    env = dict(os.environ, ADAPTERFLOW_HOME=str(home), **api)
    command = [sys.executable, "-X", "importtime", "-m", "adapterflow.flows.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _imported(result: subprocess.CompletedProcess) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


def test_a_crash_during_registration_leaves_no_alias_on_the_half_registered_version(
        prefect_server, home, tmp_path, tiny_bert, cls_data, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    _retrain(tmp_path, tiny_bert, cls_data, BAD)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash: the process died while registering")

    # Two crash points after the version exists: before it is marked complete, and at the alias move.
    for step in ("set_model_version_tag", "set_registered_model_alias"):
        with monkeypatch.context() as patch:
            patch.setattr(MlflowClient, step, crash)
            # Not the user's mistake: the CLI reports it as a bug (exit 70) with its traceback kept in the run folder.
            assert main(["run", str(write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **GOOD))), "--force"]) == 70
            assert "error: unexpected RuntimeError: simulated crash: the process died while registering" in capsys.readouterr().err
    client = _client(home)
    half, unaliased = client.get_model_version(NAME, "2"), client.get_model_version(NAME, "3")
    assert half.tags["adapterflow.registration"] == "incomplete" and unaliased.tags["adapterflow.registration"] == "complete"
    assert not half.aliases and not unaliased.aliases and _aliases(home) == {"staging": "1"}
    assert {client.get_run(v.run_id).info.status for v in (half, unaliased)} == {"FAILED"}
    capsys.readouterr()
    assert main(["status", NAME]) == 0
    assert "v2    init lora" in (out := capsys.readouterr().out) and "(registration incomplete: never staged)" in out

    client.set_registered_model_alias(NAME, "staging", "2")  # a hand-moved alias still cannot promote it
    assert main(["promote", NAME]) == 5
    assert "version 2 (@staging) never finished registering" in capsys.readouterr().err
    assert "production" not in _aliases(home)
