"""A failure reaches the terminal once: a user's error as its message, a bug as one message naming its traceback file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cls_config, write_config

BUGGY_RUN = """
import sys
import adapterflow.tasks.evaluate as evaluate

def broken(*args, **kwargs):
    raise RuntimeError("boom in evaluation")

evaluate.evaluate_adapter = broken
from adapterflow.flows.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


def test_a_bug_prints_one_message_and_leaves_its_traceback_in_the_run_folder(prefect_server, tmp_path, tiny_bert, cls_data):
    from prefect.settings import PREFECT_API_URL

    home = tmp_path / "state"
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **{"train.max_steps": 2}))
    env = dict(os.environ, ADAPTERFLOW_HOME=str(home), PREFECT_API_URL=PREFECT_API_URL.value() or "")
    result = subprocess.run([sys.executable, "-c", BUGGY_RUN, str(config)], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)

    assert result.returncode == 70, result.stderr
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr  # not once per Prefect engine
    message = "RuntimeError: boom in evaluation\nerror: unexpected RuntimeError: boom in evaluation\nThis is a bug in adapterflow"
    assert message in result.stderr
    (log,) = home.glob("runs/tiny-cls-*/error.log")
    assert f"traceback in {log}." in result.stderr
    assert "Traceback (most recent call last)" in log.read_text() and "RuntimeError: boom in evaluation" in log.read_text()


def test_a_bug_outside_a_run_keeps_its_traceback_in_the_state_folder(tmp_path, monkeypatch, capsys):
    from adapterflow.flows import cli

    monkeypatch.setenv("ADAPTERFLOW_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(cli, "cmd_check", lambda args: 1 / 0)
    assert cli.main(["check", "any.yaml"]) == 70
    message = capsys.readouterr().err
    log = Path(message.rsplit("traceback in ", 1)[1].rstrip(".\n"))
    assert log.parent == tmp_path / "state" / "logs" and "ZeroDivisionError" in log.read_text()
    assert message.count("Traceback (most recent call last)") == 1
    assert "ZeroDivisionError: division by zero\nerror: unexpected ZeroDivisionError: division by zero\nThis is a bug" in message


SENTINEL = "Console-S3ntinel-pw"
SECRET_URI = f"postgresql://mlflow:{SENTINEL}@db:5432/mlflow"


def test_a_bugs_traceback_file_and_message_hold_no_credential(tmp_path, monkeypatch, capsys):
    from adapterflow.flows import cli

    monkeypatch.setenv("ADAPTERFLOW_HOME", str(tmp_path / "state"))

    def broken(args):
        raise RuntimeError(f"cannot open {SECRET_URI}")

    monkeypatch.setattr(cli, "cmd_check", broken)
    assert cli.main(["check", "any.yaml"]) == 70
    message = capsys.readouterr().err
    log = Path(message.rsplit("traceback in ", 1)[1].rstrip(".\n"))
    for text in (message, log.read_text()):
        assert SENTINEL not in text and "postgresql://mlflow:***@db:5432/mlflow" in text


def test_every_log_handler_masks_messages_and_tracebacks_prefects_api_handler_included(monkeypatch):
    import io
    import logging

    from prefect.logging.handlers import APILogHandler

    from adapterflow.flows.console import quiet_failures_in_prefect_logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("adapterflow.test.secrets")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        quiet_failures_in_prefect_logs()
        try:
            raise ConnectionError(f"API request to http://alice:{SENTINEL}@mlflow:5000/api failed")
        except ConnectionError:
            logger.exception("tracking at %s failed", SECRET_URI)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert SENTINEL not in text and "Traceback" in text
    assert "tracking at postgresql://mlflow:***@db:5432/mlflow failed" in text and "http://alice:***@mlflow:5000/api" in text
    # Prefect's handlers (the Prefect database's logs) carry the same filter.
    api_handlers = [h for name in ("prefect.flow_runs", "prefect.task_runs") for h in logging.getLogger(name).handlers
                    if isinstance(h, APILogHandler)]
    assert api_handlers and all(any("Redact" in type(f).__name__ for f in h.filters) for h in api_handlers)
    record = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "x %s", (SECRET_URI,), None)
    assert all(f.filter(record) for f in api_handlers[0].filters) and SENTINEL not in api_handlers[0].format(record)


def test_prefect_polling_that_fails_while_its_api_is_away_prints_no_traceback(monkeypatch, capsys):
    """A served run's output during a Prefect outage: the cancellation observer's polling loop printed three
    tracebacks to stdout once its API had been away for three polls."""
    import asyncio

    import httpx
    from prefect._internal import _observation_delivery as delivery

    from adapterflow.tasks.state import _quiet_prefect_polling_printouts

    monkeypatch.setattr(delivery, "critical_service_loop", delivery.critical_service_loop)  # restored after the test
    _quiet_prefect_polling_printouts()

    async def api_away():
        raise httpx.ConnectError("All connection attempts failed")

    with pytest.raises(RuntimeError, match="exceeded error threshold"):  # Prefect's own end of the loop, unchanged
        asyncio.run(delivery.critical_service_loop(workload=api_away, interval=0.01))
    assert capsys.readouterr().out == ""
