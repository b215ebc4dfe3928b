"""`adapterflow serve` against a Prefect server started the way users start it (`prefect server start`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, cls_config, free_port, run_cli, stop_process_group, wait_for, write_config

pytestmark = pytest.mark.e2e


def _api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or "null")


def test_scheduled_runs_happen_and_an_unchanged_retrain_skips(tmp_path, tiny_bert, cls_data):
    api = f"http://127.0.0.1:{free_port()}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=api, ADAPTERFLOW_HOME=str(tmp_path / "state"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    port = api.rsplit(":", 1)[1].split("/")[0]
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    serve = None
    try:
        wait_for(lambda: _api(api, "/health"), 180, "the Prefect server", interval=2)
        overrides = {"train.max_steps": 2, "schedule": {"interval_seconds": 10}}
        config = write_config(tmp_path / "served.yaml", cls_config(tiny_bert, cls_data, **overrides))
        serve = subprocess.Popen([sys.executable, "-m", "adapterflow.flows.cli", "serve", str(config)], env=env, cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        finished = wait_for(lambda: _completed(api) if len(_completed(api)) >= 2 else None, 420, "two scheduled runs", interval=2)
        assert all(run["deployment_id"] for run in finished)
    finally:
        for process in (serve, server):
            if process is not None:
                stop_process_group(process)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'state' / 'mlflow' / 'mlflow.db'}"
    versions = MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name='tiny-cls-adapter'")
    assert len(versions) == 1  # the second scheduled run found the same config and data at @staging and skipped


def _completed(api: str) -> list[dict]:
    runs = _api(api, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
    return runs


def test_invalid_cron_is_refused(tmp_path, tiny_bert, cls_data):
    config = write_config(tmp_path / "c.yaml", cls_config(tiny_bert, cls_data, schedule={"cron": "61 * * * *"}))
    result = run_cli("serve", str(config), home=tmp_path / "state")
    assert result.returncode == 2 and "schedule.cron is not a valid schedule" in result.stderr
