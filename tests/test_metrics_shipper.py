"""Metrics leave the run folder for MLflow; an outage delays them and says so once, nothing is lost or sent twice."""

import json

from mlflow.tracking import MlflowClient

from adapterflow.tasks.metrics_shipper import MetricsShipper


def _journal(run_dir, steps):
    with open(run_dir / "progress.jsonl", "a") as handle:
        for step in steps:
            record = {"event": "log", "step": step, "time": 1_700_000_000 + step, "metrics": {"train/loss": 1.0 / step}}
            handle.write(json.dumps(record) + "\n")


def test_points_wait_through_an_outage_and_arrive_once(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    said = []
    shipper = MetricsShipper(tmp_path, uri, run_id, said.append)
    _journal(tmp_path, [1, 2])
    assert shipper.ship()

    down = True
    monkeypatch.setattr(MetricsShipper, "_server_answers", lambda self: not down)
    _journal(tmp_path, [3, 4])
    assert not shipper.ship() and not shipper.ship() and shipper.pending()
    assert len(said) == 1 and "not answering" in said[0]
    down = False
    assert shipper.ship() and not shipper.pending()
    assert len(said) == 2 and "back after" in said[1]

    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    again = MetricsShipper(tmp_path, uri, run_id, said.append)  # e.g. `adapterflow register` later: nothing is left
    assert not again.pending() and again.ship()
    assert len(client.get_metric_history(run_id, "train/loss")) == 4


def test_a_dead_http_server_is_noticed_without_mlflow_retries(tmp_path):
    from conftest import free_port

    said = []
    shipper = MetricsShipper(tmp_path, f"http://u:secret-pw@127.0.0.1:{free_port()}", "r", said.append)
    _journal(tmp_path, [1])
    assert not shipper.drain(seconds=0.5, poll=0.1)
    assert len(said) == 1 and "secret-pw" not in said[0]


def test_as_a_sink_it_backs_off_while_the_server_is_away_and_tries_once_more_at_close(tmp_path, monkeypatch):
    import time

    from adapterflow.tasks.metrics_shipper import ShipperSink

    probes = []
    monkeypatch.setattr(MetricsShipper, "_server_answers", lambda self: probes.append(1) and False)
    sink = ShipperSink(MetricsShipper(tmp_path, "http://127.0.0.1:1", "r", lambda line: None), drain_seconds=0.3)
    _journal(tmp_path, [1])
    log = [{"event": "log"}]
    sink.records(log)
    sink.records(log)  # within the backoff: no second probe
    sink.records([{"event": "step"}])
    assert len(probes) == 1
    start = time.monotonic()
    sink.close()  # in an outage: one last try, not the whole drain (the train stage would end later for nothing)
    assert len(probes) == 2 and time.monotonic() - start < 2.5 and sink.shipper.pending()  # what did not go stays


def test_a_server_whose_uri_carries_a_login_is_probed_without_it(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        shipper = MetricsShipper(tmp_path, f"http://alice:pw@127.0.0.1:{server.server_port}", "r", print)
        assert shipper._server_answers()
    finally:
        server.shutdown()
