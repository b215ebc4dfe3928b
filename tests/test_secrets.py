"""Secrets never leave the process: a password in the tracking URI and the standard secret environment variables
go through a full run, failing runs and every CLI command, and then appear nowhere: not in the MLflow server's
database or artifact store, the state folder (run folders included), the Prefect database, or any output.

The MLflow server is real (no auth: it ignores the basic-auth credentials it is sent), so the run really uses
the URI with the password; the search below proves none of it was written down.
"""

from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, cls_config, free_ports, stop_process_group, wait_for, write_config

pytestmark = pytest.mark.e2e

MARK = "SENTINEL-7f3a9c"  # in every secret below; no hit of it may survive anywhere
PASSWORD = f"pw-{MARK}"  # in the tracking URI
SECRET_ENV = {
    "MLFLOW_TRACKING_USERNAME": "alice",
    "MLFLOW_TRACKING_PASSWORD": f"env-{MARK}-mlflow",
    "AWS_ACCESS_KEY_ID": "AKIAADAPTERFLOWTEST",
    "AWS_SECRET_ACCESS_KEY": f"env-{MARK}-aws",
    "PGPASSWORD": f"env-{MARK}-pg",
    "PREFECT_API_AUTH_STRING": f"alice:env-{MARK}-prefect",
}
# What an HTTP client makes of them: Basic auth headers, in case one is ever logged.
NEEDLES = [MARK.encode()] + [
    base64.b64encode(pair.encode()) for pair in (f"alice:{PASSWORD}", f"alice:env-{MARK}-mlflow", f"alice:env-{MARK}-prefect")
]
MODEL_NAME = "tiny-cls-adapter"


def _wait_for_health(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    def healthy():
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200

    wait_for(healthy, timeout_s, f"the mlflow server at {url}", interval=0.5)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow server on a free loopback port; its database and artifact store live under `folder`."""
    folder = tmp_path / "mlflow-server"
    folder.mkdir()
    port, dead_port = free_ports(2)
    log = folder / "server.log"
    command = [str(Path(sys.executable).parent / "mlflow"), "server",
               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("w") as sink:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=folder, env=env, start_new_session=True)
    try:
        _wait_for_health(f"http://127.0.0.1:{port}", server, log)
        yield folder, port, dead_port
    finally:
        stop_process_group(server)


class Session:
    """The CLI as a user runs it, with the secrets in its environment; every output kept for the search."""

    def __init__(self, home: Path):
        from prefect.settings import PREFECT_API_URL

        self.home, self.outputs = home, []
        self.env = dict(os.environ, **SECRET_ENV, ADAPTERFLOW_HOME=str(home), PREFECT_API_URL=PREFECT_API_URL.value() or "")

    def run(self, *args: str, expect: int | None = 0, **env) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "adapterflow.flows.cli", *args]
        result = subprocess.run(command, capture_output=True, text=True, env={**self.env, **env}, cwd=ROOT, timeout=600)
        self.keep(args, result.stdout, result.stderr)
        if expect is not None:
            assert result.returncode == expect, f"adapterflow {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
        return result

    def start(self, *args: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "adapterflow.flows.cli", *args]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=ROOT,
                                start_new_session=True)

    def keep(self, args, stdout: str, stderr: str) -> None:
        self.outputs.append((" ".join(map(str, args)), stdout + "\n" + stderr))


def _hits_in_bytes(where: str, data: bytes) -> list[str]:
    hits = []
    for needle in NEEDLES:
        start = data.find(needle)
        if start >= 0:
            context = data[max(0, start - 100): start + len(needle) + 40].decode(errors="replace")
            hits.append(f"{where}: ...{context}...")
    return hits


def _hits_in_tree(root: Path) -> list[str]:
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        hits += _hits_in_bytes(str(path), path.read_bytes())
    return hits


def _prefect_database_folder() -> Path:
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    assert url.startswith("sqlite+aiosqlite:///"), url
    return Path(url.removeprefix("sqlite+aiosqlite:///")).parent


def _prefect_api_logs() -> str:
    """Every log the Prefect server holds (the whole session's: other tests' logs hold no sentinel), page by page."""
    from prefect.client.orchestration import get_client

    messages = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(limit=200, offset=len(messages)):
            messages += [log.message for log in page]
    return "\n".join(messages)


def _first_training_pid(home: Path, name: str) -> int | None:
    pid_file = next(iter(home.glob(f"runs/{name}-*/train.pid")), None)
    return int(pid_file.read_text()) if pid_file and pid_file.read_text().strip() else None


def _secret_setup(mlflow_server, tmp_path):
    """The session, the URIs with the password, and the run config a user wrote (it holds the password)."""
    server_folder, port, dead_port = mlflow_server
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{port}"
    good = {"tracking.mlflow_uri": uri, "train.launch": {"mode": "accelerate"}, "train.threads": 1,
            "tracking.system_metrics_seconds": 1.0}
    return Session(tmp_path / "state"), uri, f"http://alice:{PASSWORD}@127.0.0.1:{dead_port}", good


def _assert_no_secret_anywhere(session: Session, server_folder: Path, *more_trees: Path) -> None:
    time.sleep(3)  # the Prefect server stores the logs its clients sent on exit
    hits = _hits_in_tree(server_folder) + _hits_in_tree(session.home) + _hits_in_tree(_prefect_database_folder())
    for tree in more_trees:
        hits += _hits_in_tree(tree)
    hits += _hits_in_bytes("Prefect API logs", _prefect_api_logs().encode())
    for command, output in session.outputs:
        hits += _hits_in_bytes(f"output of adapterflow {command}", output.encode())
    assert not hits, f"{len(hits)} secret(s) found:\n" + "\n\n".join(hits)


def test_no_secret_survives_a_full_run_and_every_registry_command(prefect_server, mlflow_server, tmp_path, tiny_bert, cls_data):
    from mlflow.tracking import MlflowClient

    server_folder, port, _ = mlflow_server
    session, uri, dead_uri, good = _secret_setup(mlflow_server, tmp_path)
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **good))

    # A full, successful run (training in the accelerate subprocess, step metrics logged from there).
    session.run("check", str(config))
    done = session.run("run", str(config))
    assert f"registered       {MODEL_NAME} version 1  alias @staging" in done.stdout
    assert f"http://127.0.0.1:{port} (the MLflow server's UI)" in done.stdout

    # Every registry command, with the URI given on the command line and through MLFLOW_TRACKING_URI.
    target = ("--tracking-uri", uri)
    session.run("status", MODEL_NAME, *target)
    session.run("status", MODEL_NAME, MLFLOW_TRACKING_URI=uri)
    lineage = session.run("lineage", MODEL_NAME, "1", *target)
    assert "mlflow_uri: http://alice:***@127.0.0.1:" in lineage.stdout
    assert session.run("promote", MODEL_NAME, *target, expect=None).returncode in (0, 1)  # promoted or refused by the gate
    session.run("rollback", MODEL_NAME, *target, expect=5)  # nothing to roll back to: an error message
    session.run("export", f"{MODEL_NAME}@staging", str(tmp_path / "exported"), *target)
    session.run("export", f"{MODEL_NAME}@no-such-alias", str(tmp_path / "exported-2"), *target, expect=5)
    session.run("status", "no-such-model", *target, expect=5)
    session.run("lineage", MODEL_NAME, "99", *target, expect=5)
    session.run("status", MODEL_NAME, "--tracking-uri", dead_uri, expect=5)

    # The run really used the URI with its password: the worker logged step metrics to this server.
    client = MlflowClient(f"http://127.0.0.1:{port}")
    version = client.get_model_version_by_alias(MODEL_NAME, "staging")
    assert client.get_metric_history(version.run_id, "train/loss")
    assert client.get_run(version.run_id).data.params["tracking.mlflow_uri"] == f"http://alice:***@127.0.0.1:{port}"
    jobs = list(session.home.glob("runs/*/train_job.json"))
    assert jobs and all(stat.S_IMODE(job.stat().st_mode) == 0o600 for job in jobs)
    # The search would find a secret (the config the user wrote holds one), and it reads the store that was written.
    assert _hits_in_bytes("config", config.read_bytes())
    assert any(b"alice:***@127.0.0.1" in path.read_bytes() for path in server_folder.glob("mlflow.db*"))
    _assert_no_secret_anywhere(session, server_folder, tmp_path / "exported")


def test_no_secret_survives_failing_runs_or_a_served_schedule(prefect_server, mlflow_server, tmp_path, tiny_bert, cls_data):
    server_folder, _, dead_port = mlflow_server
    session, _, dead_uri, good = _secret_setup(mlflow_server, tmp_path)
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **good))

    # The tracking server is down; training is killed (before any checkpoint); the servers the preflight asks
    # (an S3 endpoint for the DVC remote, the Prefect API) do not answer.
    down = write_config(tmp_path / "down.yaml", cls_config(tiny_bert, cls_data, **{**good, "tracking.mlflow_uri": dead_uri}))
    session.run("run", str(down), expect=5)  # RegistryError: MLflow cannot be reached
    killed_config = write_config(tmp_path / "killed.yaml", cls_config(tiny_bert, cls_data, **{
        **good, "name": "tiny-cls-killed", "train.max_steps": 400, "train.checkpoint_every": 400}))
    flow = session.start("run", str(killed_config))
    try:
        training_group = wait_for(lambda: _first_training_pid(session.home, "tiny-cls-killed"), 300, "the training process")
        time.sleep(2)
        os.killpg(training_group, signal.SIGKILL)
        out, err = flow.communicate(timeout=300)
    finally:
        if flow.poll() is None:
            stop_process_group(flow)
    session.keep(["run (killed)", killed_config], out, err)
    assert flow.returncode == 4 and "the training process was killed by signal 9" in err, err[-3000:]
    assert "a rerun of the same config starts training over" in err
    s3 = write_config(tmp_path / "s3.yaml", cls_config(tiny_bert, cls_data, **{**good, "tracking.dvc_remote": "s3://bucket/data"}))
    session.run("check", str(s3), expect=5, AWS_ENDPOINT_URL=f"http://key:{PASSWORD}@127.0.0.1:{dead_port}")
    session.run("check", str(config), expect=5, PREFECT_API_URL=f"http://alice:{PASSWORD}@127.0.0.1:{dead_port}/api")
    scheduled = write_config(tmp_path / "scheduled.yaml", cls_config(tiny_bert, cls_data, **{**good, "schedule": {"cron": "0 3 1 1 *"}}))
    server = session.start("serve", str(scheduled))
    try:
        wait_for(lambda: server.poll() is not None or _deployment_exists(scheduled), 120, "the served deployment")
    finally:
        stop_process_group(server)
    session.keep(["serve", scheduled], *server.communicate())

    # The search reads the store the failed run wrote: the Prefect database holds its message.
    assert any(b"cannot be reached" in path.read_bytes() for path in _prefect_database_folder().iterdir() if path.is_file())
    _assert_no_secret_anywhere(session, server_folder)


def _deployment_exists(config: Path) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return any(d.parameters.get("config_path") == str(config.resolve()) for d in client.read_deployments())
