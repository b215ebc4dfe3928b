"""CLI output: the plain lines scripts read when piped, a rich table on a terminal."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from types import SimpleNamespace

import pytest

from adapterflow.flows import render
from adapterflow.tasks.registry_queries import ModelStatus, VersionRecord
from adapterflow.tasks.registry_tags import VersionTags


@pytest.fixture
def summary(tmp_path) -> dict:
    report = tmp_path / "init_report.json"
    report.write_text(json.dumps({"ranks": {"a": 8, "b": 8}, "checks": {}}))
    return {
        "name": "demo", "data_md5": "73a8", "run_id": "r1", "tracking_uri": "sqlite:///m.db", "eval_split": "test",
        "validation": {"checks": 18, "row_counts": {"train": 2696, "test": 544}},
        "init": {"method": "lora", "seconds": 0.55, "cache": "miss", "report_path": str(report), "learning_rate": None},
        "train": {"steps": 100, "seconds": 141.2, "device": "cpu", "processes": 1},
        "metrics": {"accuracy": 0.80882, "macro_f1": 0.8034}, "model_name": "demo-model", "version": "1", "alias": "staging",
        "promotion": {"promoted": False, "reason": "accuracy 0.8088 does not beat the base"}, "merge": None, "spectral": None,
        "timings": {"validate": 0.51, "train": 160.44},
    }


def _printed(monkeypatch, tty: bool, show) -> str:
    out = io.StringIO()
    out.isatty = lambda: tty
    monkeypatch.setattr(sys, "stdout", out)
    show()
    return out.getvalue()


def test_piped_summary_is_the_plain_lines(summary, monkeypatch):
    dirs = SimpleNamespace(prefect_home="/state/prefect")
    text = _printed(monkeypatch, False, lambda: render.show(render.summary_rows(summary, dirs, 200.4)))
    lines = text.splitlines()
    assert lines[1] == "== adapterflow: demo done in 200 s =="
    assert lines[2:7] == [
        "data validation  passed (18 checks; rows: train 2696, test 544)",
        "data md5 (DVC)   73a8",
        "init             lora in 0.55 s (cache miss)",
        "init ranks       8–8 per layer over 2 layers (sum 16)",
        "training         100 steps in 141 s on cpu",
    ]
    assert lines[7:12] == [
        "metrics (test)  accuracy=0.8088  macro_f1=0.8034",
        "registered       demo-model version 1  alias @staging",
        "promotion gate   not promoted: accuracy 0.8088 does not beat the base",
        "mlflow run       r1",
        "stage seconds    validate 0.5  train 160.4",
    ]
    assert lines[13] == "Open the dashboards on this data:" and lines[-1].startswith("  PREFECT_HOME=/state/prefect ")


def test_a_4bit_cpu_run_says_its_bitsandbytes_path_once_after_training(summary, monkeypatch):
    dirs = SimpleNamespace(prefect_home="/state/prefect")
    summary["bnb_cpu_path"] = "unpacked (this CPU has no AVX512-BF16)"
    lines = _printed(monkeypatch, False, lambda: render.show(render.summary_rows(summary, dirs, 1.0))).splitlines()
    assert lines[6:8] == ["training         100 steps in 141 s on cpu", "bnb cpu path     unpacked (this CPU has no AVX512-BF16)"]
    assert sum(line.startswith("bnb cpu path") for line in lines) == 1


def test_remote_code_is_said_only_when_it_ran(summary, monkeypatch):
    dirs = SimpleNamespace(prefect_home="/state/prefect")
    assert "remote code" not in _printed(monkeypatch, False, lambda: render.show(render.summary_rows(summary, dirs, 1.0)))
    summary["trust_remote_code"] = True
    printed = _printed(monkeypatch, False, lambda: render.show(render.summary_rows(summary, dirs, 1.0)))
    assert "remote code      model.trust_remote_code is on" in printed


def test_on_a_terminal_the_summary_is_a_rich_grid(summary, monkeypatch):
    dirs = SimpleNamespace(prefect_home="/state/prefect")
    text = _printed(monkeypatch, True, lambda: render.show(render.summary_rows(summary, dirs, 200.4)))
    assert "\x1b[" in text  # colour
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip() for line in text.splitlines()]
    assert re.fullmatch(r"─+ adapterflow: demo done in 200 s ─+", lines[1])  # the heading is a rule, not "== ... =="
    registered = next(line for line in lines if line.startswith("registered"))
    assert registered == "registered".ljust(17) + "demo-model version 1  alias @staging"  # widest label + 2 spaces


def _status() -> ModelStatus:
    tags = VersionTags.from_tags({"init_method": "lora", "data_md5": "0123456789ab", "metric.accuracy": "0.5", "metric.eval_loss": "1.25"})
    event = {"when": "20250101T000000.1Z", "action": "promoted", "from": None, "to": "1", "reason": "better"}
    return ModelStatus({"staging": "2", "production": "1"}, (VersionRecord("1", tags, "complete"), VersionRecord("2", tags, "incomplete")),
                       (event,))


def test_piped_status_is_the_plain_lines(monkeypatch):
    text = _printed(monkeypatch, False, lambda: render.show_status("m", _status()))
    assert text.splitlines() == [
        "m",
        "aliases   @production → v1, @staging → v2",
        "versions",
        "  v1    init lora     data 01234567  accuracy=0.5  eval_loss=1.25",
        "  v2    init lora     data 01234567  accuracy=0.5  eval_loss=1.25  (registration incomplete: never staged)",
        "history",
        "  20250101T000000.1Z         promoted  vNone → v1  better",
    ]


def test_on_a_terminal_status_is_a_table(monkeypatch):
    text = _printed(monkeypatch, True, lambda: render.show_status("m", _status()))
    rows = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in text.splitlines() if "│" in line or "┃" in line]
    assert any("version" in r and "metrics" in r for r in rows)  # the header row
    assert any("v2" in r and "accuracy=0.5" in r and "incomplete" in r for r in rows)
    assert not any("v1" in r and "incomplete" in r for r in rows)
    assert any("promoted" in r and "base → v1" in r and "better" in r for r in rows)


@pytest.mark.slow  # starts a fresh interpreter
def test_output_piped_into_a_reader_that_stops_early_ends_quietly():
    """`adapterflow lineage ... | head`: no BrokenPipeError traceback, the exit status a shell expects."""
    import subprocess

    from conftest import ROOT

    chatty = ("import adapterflow.flows.cli as cli\n"
              "cli.cmd_check = lambda args: [print('line', i) for i in range(200000)] and 0\n"
              "raise SystemExit(cli.main(['check', 'any.yaml']))\n")
    script = f"set -o pipefail; {sys.executable} -c \"$CHATTY\" | head -n 2"
    env = {**os.environ, "CHATTY": chatty}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.stdout == "line 0\nline 1\n"
    assert result.stderr == "" and result.returncode == 141


# --- credentials never printed ----------------------------------------------------------------------

SENTINEL = "Render-S3ntinel-pw"


def test_the_summary_names_a_tracking_server_without_its_credentials(summary, monkeypatch):
    dirs = SimpleNamespace(prefect_home="/state/prefect")
    summary["tracking_uri"] = f"http://alice:{SENTINEL}@mlflow.internal:5000"
    for tty in (False, True):
        text = _printed(monkeypatch, tty, lambda: render.show(render.summary_rows(summary, dirs, 1.0)))
        assert SENTINEL not in text and "alice" not in text
        assert "http://mlflow.internal:5000 (the MLflow server's UI)" in text and "--backend-store-uri" not in text


def test_a_database_store_in_the_summary_has_its_password_masked(summary, monkeypatch):
    dirs = SimpleNamespace(prefect_home="/state/prefect")
    summary["tracking_uri"] = f"postgresql://mlflow:{SENTINEL}@db:5432/mlflow"
    text = _printed(monkeypatch, False, lambda: render.show(render.summary_rows(summary, dirs, 1.0)))
    assert SENTINEL not in text and "--backend-store-uri postgresql://mlflow:***@db:5432/mlflow --port 5000" in text
    assert "PGPASSWORD" in text  # how to pass the password instead


def _lineage(config: dict, reason: str):
    from adapterflow.tasks.registry_queries import Lineage

    event = {"when": "20250101T000000.1Z", "action": "refused", "from": None, "to": "1", "reason": reason}
    return Lineage("1", "run1", "0", VersionTags.from_tags({"data_md5": "73a8", "data.train_md5": "aa"}), {"train": "/d/train.csv"},
                   config, (event,))


def test_lineage_masks_a_config_logged_before_redaction(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-" + SENTINEL)
    config = {"name": "demo", "tracking": {"mlflow_uri": f"postgresql://u:{SENTINEL}@db/mlflow",
                                           "dvc_remote": f"https://dvc.example/store?token={SENTINEL}"},
              "note": f"key aws-{SENTINEL}"}
    text = _printed(monkeypatch, False, lambda: render.show(render.lineage_rows("m", _lineage(config, "ok"))))
    assert SENTINEL not in text
    assert "mlflow_uri: postgresql://u:***@db/mlflow" in text and "dvc_remote: https://dvc.example/store?token=***" in text
    assert "data md5 (DVC)  73a8" in text and "train      /d/train.csv  md5 aa" in text


def test_status_and_promotion_lines_mask_a_reason_that_names_a_url(monkeypatch):
    from adapterflow.tasks.gate import Decision

    reason = f"its adapter cannot be read (API request to http://a:{SENTINEL}@h:5000/api failed)"
    event = {"when": "20250101T000000.1Z", "action": "refused", "from": None, "to": "1", "reason": reason}
    state = ModelStatus({}, (), (event,))
    for tty in (False, True):
        text = _printed(monkeypatch, tty, lambda: render.show_status("m", state))
        assert SENTINEL not in text and "http://a:***@h:5000" in text.replace("\n", "")
    decision = Decision(False, "1", None, "accuracy", 0.5, 0.6, reason)
    assert SENTINEL not in "\n".join(render.promotion_lines("m", decision, "production"))


def test_the_mlflow_run_link_names_a_server_page_without_its_login_or_the_mlflow_ui_command():
    url, how = render.mlflow_run_link("https://bob:s3cret@mlflow.example.com/", "7", "abc123")
    assert url == how == "https://mlflow.example.com/#/experiments/7/runs/abc123"
    url, how = render.mlflow_run_link("sqlite:////state/mlflow/mlflow.db", "1", "abc123")
    assert url == "http://127.0.0.1:5000/#/experiments/1/runs/abc123"
    assert how.startswith(url + " once `") and "ui --backend-store-uri sqlite:////state/mlflow/mlflow.db --port 5000`" in how


def test_stage_end_lines_carry_each_stage_s_key_result():
    validation = SimpleNamespace(row_counts={"train": 48, "test": 18}, checks=9)
    registration = SimpleNamespace(model_name="m", version="3", alias="staging", held=False)
    assert render.stage_end_line("validate", 0.31, validation) == "validate   done in 0.3 s: 66 rows passed 9 checks (train 48, test 18)"
    assert render.stage_end_line("register", 1.0, registration) == "register   done in 1.0 s: m version 3 @staging"
    held = SimpleNamespace(model_name="m", version=None, alias="staging", held=True)  # a sweep's trial
    assert render.stage_end_line("register", 1.0, held) == "register   done in 1.0 s: held: the sweep registers its best trial"
    assert render.stage_start_line("train") == "train      started"
