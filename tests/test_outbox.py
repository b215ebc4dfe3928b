"""What a run cannot tell MLflow while its server is down waits in the run folder, in order, and arrives once."""

from __future__ import annotations

import json

import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient

from adapterflow.errors import ConfigError, RegistryError
from adapterflow.tasks.outages import Outages
from adapterflow.tasks.outbox import Outbox, artifact_op, metrics_op, tag_op, terminate_op
from adapterflow.tasks.tracking import RunRef, deliver, log_metrics


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    return uri, client, run_id


def test_writes_to_a_dead_server_wait_in_the_outbox_and_the_outage_is_said_once(tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr("adapterflow.tasks.tracking.OUTAGES", Outages(said.append))
    run = RunRef(f"http://user:pw-never-shown@127.0.0.1:{free_port()}", "r1", str(tmp_path))
    log_metrics(run, {"accuracy": 0.5}, prefix="test/")
    deliver(run, [tag_op("k", "v")])
    ops = Outbox(tmp_path).pending()
    assert [op["op"] for op in ops] == ["metrics", "tag"] and ops[0]["metrics"] == {"test/accuracy": 0.5}
    assert len(said) == 1 and "is not answering" in said[0] and "pw-never-shown" not in said[0]


def test_a_replay_applies_every_kind_in_order_and_empties_the_outbox(tmp_path, store):
    uri, client, run_id = store
    report = tmp_path / "report.md"
    report.write_text("# report")
    outbox = Outbox(tmp_path)
    outbox.add([metrics_op({"loss": 1.0}, 1_700_000_000_000, 3), tag_op("data_md5", "abc"), artifact_op(report, "init"),
                terminate_op("FINISHED")])
    assert outbox.replay(client, run_id) == 4 and not outbox.pending() and not outbox.path.exists()
    run = client.get_run(run_id)
    assert run.data.metrics == {"loss": 1.0} and run.data.tags["data_md5"] == "abc" and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id, "init")] == ["init/report.md"]
    assert [(m.step, m.timestamp) for m in client.get_metric_history(run_id, "loss")] == [(3, 1_700_000_000_000)]


def test_a_replay_that_fails_midway_keeps_the_rest_and_a_second_replay_sends_each_point_once(tmp_path, store):
    uri, client, run_id = store
    outbox = Outbox(tmp_path)
    outbox.add([metrics_op({"loss": 1.0}, 1000, 1), artifact_op(tmp_path / "missing.png", "plots"), metrics_op({"loss": 0.5}, 2000, 2)])
    with pytest.raises(OSError):  # the file is gone: the artifact cannot be sent
        outbox.replay(client, run_id)
    assert [op["op"] for op in outbox.pending()] == ["artifact", "metrics"]
    (tmp_path / "missing.png").write_bytes(b"png")
    outbox.add([metrics_op({"loss": 1.0}, 1000, 1)])  # applied before: MLflow keeps one copy
    assert outbox.replay(client, run_id) == 3
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == [(1, 1.0), (2, 0.5)]


def test_a_local_store_is_written_at_once_and_leaves_no_outbox(tmp_path, store):
    uri, client, run_id = store
    log_metrics(RunRef(uri, run_id, str(tmp_path)), {"seconds": 2.0}, prefix="init/")
    assert client.get_run(run_id).data.metrics == {"init/seconds": 2.0} and not Outbox(tmp_path).path.exists()


def test_register_refuses_a_folder_that_is_no_run_a_masked_password_and_a_server_still_down(tmp_path):
    from adapterflow.tasks.deferred import RUN_FILE, finish_deferred

    with pytest.raises(ConfigError, match="is not the folder of a run"):
        finish_deferred(tmp_path)
    (tmp_path / RUN_FILE).write_text(json.dumps({"uri": "http://alice:***@mlflow.internal:5000", "run_id": "r", "started_ms": 0}))
    with pytest.raises(ConfigError, match="--mlflow-uri"):
        finish_deferred(tmp_path)
    with pytest.raises(RegistryError, match="still does not answer; nothing was registered"):
        finish_deferred(tmp_path, f"http://127.0.0.1:{free_port()}")


def test_pending_work_names_what_register_will_do(tmp_path):
    from adapterflow.tasks.deferred import PUSH_FILE, pending_work
    from adapterflow.tasks.registration import REGISTERED_FILE, REQUEST_FILE

    assert pending_work(tmp_path) == []
    (tmp_path / PUSH_FILE).write_text(json.dumps({"remote": "s3://bucket/dvc"}))
    (tmp_path / REQUEST_FILE).write_text("{}")
    Outbox(tmp_path).add([tag_op("k", "v")])
    assert pending_work(tmp_path) == ["the DVC push to s3://bucket/dvc", "the registration", "1 MLflow write(s)"]
    (tmp_path / REGISTERED_FILE).write_text(json.dumps({"version": "3"}))
    assert "the registration" not in pending_work(tmp_path)


def test_system_metrics_are_sampled_into_the_run_and_into_the_outbox_while_the_server_is_down(tmp_path, store, monkeypatch):
    import time

    from adapterflow.tasks.tracking import system_metrics

    uri, client, run_id = store
    with system_metrics(RunRef(uri, run_id, str(tmp_path)), 0.1):
        time.sleep(0.45)
    steps = {m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")}
    assert len(steps) >= 2 and min(steps) == 0

    monkeypatch.setattr("adapterflow.tasks.tracking.OUTAGES", Outages(lambda line: None))
    dead = RunRef(f"http://127.0.0.1:{free_port()}", "r", str(tmp_path))
    with system_metrics(dead, 0.1):
        time.sleep(0.35)
    waiting = [op for op in Outbox(tmp_path).pending() if op["op"] == "metrics"]
    assert waiting and all(key.startswith("system/") for op in waiting for key in op["metrics"])
