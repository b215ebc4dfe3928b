"""Training never dies for tracking: the MLflow server and the S3 remote go away mid-run, and come back.

Real servers, started as users start them, killed (SIGKILL: a crash, not a polite shutdown) and
started again on the same port and store.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, cls_config, free_ports, stop_process_group, wait_for, write_config

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
MODEL = "tiny-cls-adapter"
DEFERRED = 6  # adapterflow.errors.DEFERRED_EXIT_CODE, as a scheduler sees it


class KillableServer:
    """A server process (its own session) that answers `health_url` once started; killed with SIGKILL."""

    def __init__(self, command: list[str], health_url: str, folder: Path, name: str, any_status: bool = False):
        self.command, self.health_url, self.folder, self.name, self.any_status = command, health_url, folder, name, any_status
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.folder / f"{self.name}.log").open("a")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                                        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), start_new_session=True)
        wait_for(self._answers, 120, f"{self.name} at {self.health_url}", interval=0.5)

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"{self.name} exited:\n{(self.folder / f'{self.name}.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(self.health_url, timeout=2).close()
        except urllib.error.HTTPError:
            return self.any_status
        except OSError:
            return False
        return True

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    folder = tmp_path / "mlflow-server"
    folder.mkdir()
    [port] = free_ports(1)
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = KillableServer(command, f"http://127.0.0.1:{port}/health", folder, "mlflow")
    server.start()
    server.uri = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        server.kill()


class Run:
    """`adapterflow run` as a user starts it, its output kept; the run folder found once it exists."""

    def __init__(self, config: Path, home: Path, *args: str):
        command = [str(Path(sys.executable).parent / "adapterflow"), "run", str(config), *args]
        env = dict(os.environ, ADAPTERFLOW_HOME=str(home), OMP_NUM_THREADS="1")
        env.pop("PREFECT_API_URL", None)
        self.home, self.lines = home, []
        self.earlier = set((home / "runs").glob("*"))
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def run_dir(self) -> Path:
        return wait_for(lambda: next(iter(set((self.home / "runs").glob("tiny-cls-*")) - self.earlier), None), 120, "the run folder")

    def journal_steps(self) -> list[tuple[float, int]]:
        path = self.run_dir() / "progress.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [(r["time"], r["step"]) for r in records if "step" in r]

    def wait_for_step(self, step: int) -> None:
        wait_for(lambda: any(s >= step for _, s in self.journal_steps()), 300, f"training step {step}")

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code, "".join(self.lines)


def _config(tmp_path, tiny_bert, cls_data, uri: str, **overrides) -> Path:
    settings = {"tracking": {"mlflow_uri": uri, "system_metrics_seconds": 1.0}, "train.checkpoint_every": 1000, **overrides}
    return write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **settings))


def _register(run_dir: Path, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, ADAPTERFLOW_HOME=str(home))
    return subprocess.run([str(Path(sys.executable).parent / "adapterflow"), "register", str(run_dir)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _same_points(ours: list[tuple[int, float]], theirs: list[tuple[int, float]]) -> bool:
    return [s for s, _ in ours] == [s for s, _ in theirs] and [v for _, v in ours] == pytest.approx([v for _, v in theirs])


def test_an_outage_mid_training_stalls_nothing_and_loses_nothing(mlflow_server, tmp_path, tiny_bert, cls_data):
    config = _config(tmp_path, tiny_bert, cls_data, mlflow_server.uri, **{"train.max_steps": 400, "train.log_every": 10})
    run = Run(config, tmp_path / "home")
    run.wait_for_step(20)
    mlflow_server.kill()
    down_at = time.time()
    # 20 s, or less where this machine trains faster: the server comes back before training ends.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: any(step >= 300 for _, step in run.journal_steps()), 20, "step 300")
    up_at = time.time()
    mlflow_server.start()
    code, output = run.finish()
    assert code == 0, output[-4000:]

    # Training went on while the server was away: the journal's steps advanced through the outage.
    # The window is the outage itself: where training is fast, step 300 comes ~2 s after the kill.
    steps_during = [step for stamp, step in run.journal_steps() if down_at < stamp < up_at]
    assert len(set(steps_during)) >= 5, steps_during
    # One line when it started, one when it ended; no traceback.
    assert output.count("is not answering") == 1 and output.count("is back after") == 1, output[-4000:]
    assert "Traceback" not in output and "Writing model shards" not in output  # no library bar between the run's lines
    # Every point the training logged reached MLflow, once; the version registered.
    client = _client(mlflow_server.uri)
    version = client.get_model_version_by_alias(MODEL, "staging")
    logged = [r for r in map(json.loads, (run.run_dir() / "progress.jsonl").read_text().splitlines()) if r["event"] == "log"]
    expected = sorted((r["step"], r["metrics"]["train/loss"]) for r in logged if "train/loss" in r["metrics"])
    assert len(expected) == 40 and _same_points(_history(client, version.run_id, "train/loss"), expected)
    assert client.get_run(version.run_id).info.status == "FINISHED"
    assert any(key.startswith("system/") for key in client.get_run(version.run_id).data.metrics)


def test_a_server_down_past_the_wait_defers_registration_to_adapterflow_register(mlflow_server, tmp_path, tiny_bert, cls_data):
    home = tmp_path / "home"
    config = _config(tmp_path, tiny_bert, cls_data, mlflow_server.uri, **{"train.max_steps": 12, "train.log_every": 2,
                                                                            "tracking.wait_for_server_seconds": 3})
    undisturbed = Run(config, home)
    code, output = undisturbed.finish()
    assert code == 0, output[-4000:]

    run = Run(config, home, "--force")  # the same config, data and seed
    run.wait_for_step(1)
    mlflow_server.kill()
    code, output = run.finish()
    assert code == DEFERRED, output[-4000:]
    run_dir = run.run_dir()
    assert f"adapterflow register {run_dir}" in output and "Traceback" not in output
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists() or any(run_dir.rglob("adapter_model.safetensors"))

    refused = _register(run_dir, home)  # still down: says so, registers nothing
    assert refused.returncode == 5 and "still does not answer" in refused.stderr, refused.stderr

    mlflow_server.start()
    registered = _register(run_dir, home)
    assert registered.returncode == 0, registered.stderr[-4000:]
    assert "registered version 2" in registered.stdout
    again = _register(run_dir, home)
    assert again.returncode == 0 and "already registered as version 2" in again.stdout, again.stdout + again.stderr

    client = _client(mlflow_server.uri)
    first, second = (client.get_model_version(MODEL, v) for v in ("1", "2"))
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2
    assert client.get_registered_model(MODEL).aliases == {"staging": "2"}
    assert second.tags == first.tags
    assert second.description == first.description
    for key in ("train/loss", "test/accuracy", "test/macro_f1", "init/seconds"):
        ours, theirs = _history(client, second.run_id, key), _history(client, first.run_id, key)
        assert len(ours) == len(theirs) > 0, key
        if key != "init/seconds":
            assert _same_points(ours, theirs), key
    deferred_run = client.get_run(second.run_id)
    assert deferred_run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(second.run_id, "plots")} == {a.path for a in client.list_artifacts(first.run_id, "plots")}
    assert deferred_run.data.tags["adapterflow.data_md5"] == first.tags["data_md5"]


S3_KEY, S3_SECRET, BUCKET = "adapterflow-test", "adapterflow-test-secret", "outage"


@pytest.fixture
def s3_server(tmp_path):
    """SeaweedFS's S3 gateway (the infra's object store) with one bucket; its unix sockets are removed after."""
    folder = tmp_path / "weed"
    (folder / "data").mkdir(parents=True)
    s3, master, volume, filer, *grpc = free_ports(8)
    identity = {"name": "test", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    (folder / "s3.json").write_text(json.dumps({"identities": [identity]}))
    command = [str(Path(sys.executable).parent / "weed"), "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={master}", f"-master.port.grpc={grpc[0]}", "-master.volumeSizeLimitMB=64", "-master.electionTimeout=1s",
               "-master.telemetry=false", f"-volume.port={volume}", f"-volume.port.grpc={grpc[1]}", "-volume.max=0",
               "-volume.preStopSeconds=0", f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}", "-s3", f"-s3.port={s3}",
               f"-s3.port.grpc={grpc[3]}", f"-s3.config={folder / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    server = KillableServer(command, f"http://127.0.0.1:{s3}/healthz", folder, "weed")
    server.endpoint = f"http://127.0.0.1:{s3}"
    server.start()
    try:
        wait_for(lambda: _s3(server.endpoint).create_bucket(Bucket=BUCKET), 60, "the bucket")
        yield server
    finally:
        server.kill()
        for name in (f"master-grpc-{grpc[0]}", f"volume-grpc-{grpc[1]}", f"filer-{filer}", f"filer-grpc-{grpc[2]}", f"s3-{s3}",
                     f"s3-grpc-{grpc[3]}"):
            Path(f"/tmp/seaweedfs-{name}.sock").unlink(missing_ok=True)


def _s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET, region_name="us-east-1")


def test_an_s3_remote_down_during_versioning_defers_the_push_to_adapterflow_register(s3_server, tmp_path, tiny_bert, cls_data,
                                                                                        monkeypatch):
    for name, value in {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "home"
    tracking = {"dvc_remote": f"s3://{BUCKET}/dvc", "wait_for_server_seconds": 3}
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, tracking=tracking))
    run = Run(config, home)
    wait_for(lambda: any(line.split()[1:3] == ["validate", "done"] for line in run.lines if len(line.split()) > 2), 300,
             "validation to end (the push comes after it)")
    s3_server.kill()
    code, output = run.finish()
    assert code == DEFERRED, output[-4000:]
    run_dir = run.run_dir()
    assert f"the DVC push to s3://{BUCKET}/dvc" in output and f"adapterflow register {run_dir}" in output
    assert "registered       tiny-cls-adapter version 1" in output  # MLflow was up: the version did not wait for the data
    assert "Traceback" not in output

    s3_server.start()
    finished = _register(run_dir, home)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert "data pushed to the DVC remote" in finished.stdout and "already registered as version 1" in finished.stdout

    version = _client(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}").get_model_version(MODEL, "1")
    digest = version.tags["data_md5"]
    listed = _s3(s3_server.endpoint).list_objects_v2(Bucket=BUCKET, Prefix="dvc/")
    keys = {item["Key"] for item in listed.get("Contents", [])}
    assert f"dvc/files/md5/{digest[:2]}/{digest[2:]}.dir" in keys
    for split in ("train", "validation", "test"):  # each file the version trained on, by the md5 its tags give
        split_md5 = version.tags[f"data.{split}_md5"]
        assert f"dvc/files/md5/{split_md5[:2]}/{split_md5[2:]}" in keys, split
    assert not (run_dir / "dvc_push.json").exists()


@pytest.fixture
def prefect_api(tmp_path):
    """`prefect server start` on its own SQLite database, as a team starts it for the UI."""
    folder = tmp_path / "prefect-server"
    folder.mkdir()
    [port] = free_ports(1)
    api = f"http://127.0.0.1:{port}/api"
    command = ["env", "-u", "PREFECT_API_URL", f"PREFECT_HOME={folder}", "PREFECT_SERVER_ANALYTICS_ENABLED=false",
               str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = KillableServer(command, f"{api}/health", folder, "prefect")
    server.api = api
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _prefect(api: str, path: str, body: dict | None = None):
    request = urllib.request.Request(api + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or "null")


def _flow_runs(api: str) -> list[dict]:
    return _prefect(api, "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"})


def test_a_served_deployment_survives_prefect_server_restarts_during_a_run_and_between_runs(prefect_api, tmp_path, tiny_bert,
                                                                                           cls_data):
    home = tmp_path / "home"
    env = dict(os.environ, ADAPTERFLOW_HOME=str(home), PREFECT_API_URL=prefect_api.api, OMP_NUM_THREADS="1")
    overrides = {"train.max_steps": 300, "train.log_every": 10, "schedule": {"interval_seconds": 5}}
    config = write_config(tmp_path / "served.yaml", cls_config(tiny_bert, cls_data, **overrides))
    serve = subprocess.Popen([str(Path(sys.executable).parent / "adapterflow"), "serve", str(config)], env=env, cwd=ROOT,
                             stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        journal = wait_for(lambda: next((home / "runs").glob("tiny-cls-*/progress.jsonl"), None), 300, "the first run's training")
        wait_for(lambda: '"step"' in journal.read_text(), 120, "a training step")
        prefect_api.kill()  # during the run: training goes on without the API
        time.sleep(5)
        prefect_api.start()
        first = wait_for(lambda: next((r for r in _flow_runs(prefect_api.api) if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")),
                                      None), 600, "the first run to end")
        assert first["state_type"] == "COMPLETED", first["state"]
        assert first["deployment_id"], first  # the served schedule started it, not a direct call
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]

        prefect_api.kill()  # between runs
        time.sleep(3)
        prefect_api.start()
        second = wait_for(lambda: next((r for r in _flow_runs(prefect_api.api) if r["id"] != first["id"] and
                                        r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")), None), 300, "a second run to end")
        assert second["state_type"] == "COMPLETED", second["state"]  # it found the same config and data: a skip
        assert second["deployment_id"] == first["deployment_id"], second
        assert serve.poll() is None
    finally:
        stop_process_group(serve)
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and "websocket failed" not in log, log[-6000:]
    # Each outage a flow saw: one line when it went away, one when it was back. Between runs no flow watches, but on
    # a loaded machine Prefect listed the first run COMPLETED while its process still watched (a second pair then).
    down, back = log.count("is not answering"), log.count("is back after")
    assert 1 <= down == back <= 2 and log.count("the Prefect API at") == down + back, log[-6000:]
    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    assert [str(v.version) for v in _client(uri).search_model_versions(f"name = '{MODEL}'")] == ["1"]
