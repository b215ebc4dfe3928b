"""Bad inputs a user can cause end in one short message and a documented exit code, never a traceback,
and leave the registry exactly as it was (read from the MLflow SQLite store of the test's state folder).

Exit codes: 2 config or state folder, 3 data, 4 training, 5 registry.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import LABELS, ROOT, classification_rows, cls_config, write_config, write_jsonl

from adapterflow.flows.cli import main

MESSAGE_LIMIT = 2000
MODEL = "tiny-cls-adapter"


def _registry(home: Path) -> dict:
    """Every registered version, alias and version tag in the state folder's MLflow store (empty when there is none)."""
    db = home / "mlflow" / "mlflow.db"
    if not db.exists():
        return {"versions": [], "aliases": [], "tags": []}
    with sqlite3.connect(db) as store:
        return {
            "versions": sorted(store.execute("select name, version, status from model_versions").fetchall()),
            "aliases": sorted(store.execute("select name, alias, version from registered_model_aliases").fetchall()),
            "tags": sorted(store.execute("select name, version, key, value from model_version_tags").fetchall()),
        }


def _unprivileged() -> list[str] | None:
    """A command prefix under which file modes bind (root ignores them): none needed for a user, else a user
    namespace mapping us to uid 1000 (util-linux unshare); None where neither is possible."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    prefix = [unshare, "--map-user=1000", "--map-group=1000"] if unshare else None
    if prefix and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
        return prefix
    return None


def _cli(*args: str, home: Path, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    """As conftest.run_cli: the CLI in its own process, against the test Prefect server if one runs."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, ADAPTERFLOW_HOME=str(home), PREFECT_API_URL=PREFECT_API_URL.value() or "")
    command = [*prefix, sys.executable, "-m", "adapterflow.flows.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _assert_one_message(code: int, expected: int, stderr: str, *phrases: str) -> None:
    assert code == expected, stderr
    assert "Traceback" not in stderr and len(stderr) < MESSAGE_LIMIT, stderr
    assert stderr.count("error: ") == 1, stderr
    for phrase in phrases:
        assert phrase in stderr, stderr


# Preflight: each refused before anything runs, by the command a user types, in its own process.

def _folder_for_data(tmp_path, data, config):
    data["train"].unlink()
    data["train"].mkdir()
    return ["is a folder, not a file", str(data["train"])]


def _unreadable_data(tmp_path, data, config):
    data["train"].chmod(0)
    return ["data.train: cannot read", str(data["train"]), "Permission denied", "readable"]


def _corrupt_parquet(tmp_path, data, config):
    broken = tmp_path / "train.parquet"
    broken.write_bytes(b"not parquet at all\n" * 20)
    config["data"]["train"] = str(broken)
    return ["is not a readable parquet file", str(broken)]


def _latin1_csv(tmp_path, data, config):
    data["train"].write_bytes(data["train"].read_bytes().replace(b"games", "jeux \xe9t\xe9".encode("latin-1")))
    return ["is not UTF-8 text", str(data["train"]), "Save it as UTF-8"]


def _read_only_state(tmp_path, data, config):
    home = tmp_path / "state"
    (home / "runs").mkdir(parents=True)
    home.chmod(0o555)
    return ["the state folder", str(home), "is not writable", "ADAPTERFLOW_HOME"]


def _state_is_a_file(tmp_path, data, config):
    (tmp_path / "state").write_text("not a folder")
    return ["is a file, not a folder", "ADAPTERFLOW_HOME"]


PREFLIGHT = [
    pytest.param(_folder_for_data, 3, False, id="data-file-is-a-folder"),
    pytest.param(_unreadable_data, 3, True, id="data-file-permission-denied"),
    pytest.param(_corrupt_parquet, 3, False, id="corrupt-parquet"),
    pytest.param(_latin1_csv, 3, False, id="non-utf8-csv"),
    pytest.param(_read_only_state, 2, True, id="read-only-state-folder"),
    pytest.param(_state_is_a_file, 2, False, id="state-folder-is-a-file"),
]


@pytest.mark.parametrize("breaks, expected, needs_modes", PREFLIGHT)
def test_refused_in_preflight(tmp_path, tiny_bert, cls_data, breaks, expected, needs_modes):
    prefix = _unprivileged() if needs_modes else []
    if prefix is None:
        pytest.skip("running as root without a user namespace (unshare): file modes cannot bind")
    home = tmp_path / "state"
    config = cls_config(tiny_bert, cls_data)
    phrases = breaks(tmp_path, cls_data, config)
    result = _cli("run", str(write_config(tmp_path / "run.yaml", config)), home=home, prefix=prefix)
    _assert_one_message(result.returncode, expected, result.stderr, *phrases)
    if home.is_dir():  # nothing started: no registry, no run folder
        assert _registry(home)["versions"] == [] and not list(home.glob("runs/*"))


def test_a_full_state_folder_is_refused_in_preflight(tmp_path, tiny_bert, cls_data, monkeypatch, capsys):
    import shutil as shutil_module

    home = tmp_path / "state"
    monkeypatch.setenv("ADAPTERFLOW_HOME", str(home))
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage._replace(free=200 * 2**20))  # 200 MiB left
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data))
    code = main(["run", str(config)])
    _assert_one_message(code, 2, capsys.readouterr().err, f"the state folder {home} has 0.20 GiB free", "at least 1.00 GiB",
                        "ADAPTERFLOW_MIN_FREE_GB")
    assert not home.exists()  # the check creates nothing
    monkeypatch.setenv("ADAPTERFLOW_MIN_FREE_GB", "0.1")  # the threshold is the user's to lower
    assert main(["check", str(config)]) == 0


# The registry: versions MLflow holds that adapterflow cannot use, names MLflow refuses.

def _store(home: Path):
    from mlflow.tracking import MlflowClient

    (home / "mlflow").mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _handmade_version(home: Path, tmp_path: Path) -> None:
    """A version registered in the MLflow UI by hand: no run, no adapterflow config, alias staging."""
    client = _store(home)
    client.create_registered_model("handmade")
    version = client.create_model_version("handmade", str(tmp_path / "elsewhere"), run_id=None)
    client.set_registered_model_alias("handmade", "staging", version.version)


def _version_without_md5(home: Path, tmp_path: Path, tiny_bert: Path, data: dict) -> None:
    """A version as an older adapterflow registered it: its run holds the config, its tags lack data.test_md5."""
    client = _store(home)
    experiment = client.create_experiment("tiny-cls", artifact_location=str(home / "mlflow" / "artifacts" / "tiny-cls"))
    run = client.create_run(experiment)
    resolved = tmp_path / "logged" / "config.resolved.yaml"
    resolved.parent.mkdir()
    resolved.write_text(yaml.safe_dump(cls_config(tiny_bert, data)))
    client.log_artifact(run.info.run_id, str(resolved))
    client.set_terminated(run.info.run_id)
    client.create_registered_model(MODEL)
    tags = {"task": "sequence_classification", "eval_split": "test", "data.train_md5": "0" * 32, "adapterflow.registration": "complete"}
    version = client.create_model_version(MODEL, str(tmp_path / "adapter"), run_id=run.info.run_id, tags=tags)
    client.set_registered_model_alias(MODEL, "staging", version.version)


REGISTRY = [
    pytest.param(("promote", "handmade"), "the MLflow registry refused the request", id="promote-a-version-adapterflow-did-not-register"),
    pytest.param(("lineage", "handmade", "1"), "the MLflow registry refused the request", id="lineage-of-a-version-without-a-run"),
    pytest.param(("export", "handmade@staging", "{out}"), "the MLflow registry refused the request", id="export-a-version-without-files"),
    pytest.param(("status", "nobody"), "no registered model named 'nobody'; registered models: handmade", id="status-of-a-missing-model"),
    pytest.param(("lineage", "nobody", "1"), "no registered model named 'nobody'", id="lineage-of-a-missing-model"),
    pytest.param(("rollback", "nobody"), "no registered model named 'nobody'", id="rollback-of-a-missing-model"),
    pytest.param(("export", "nobody@production", "{out}"), "no version of nobody has the alias @production", id="export-missing-model"),
    pytest.param(("promote", "handmade", "--production-alias", "latest"), "'latest' is an alias MLflow refuses", id="reserved-alias"),
    pytest.param(("rollback", "handmade", "--production-alias", "prod uction"), "alias MLflow refuses", id="alias-with-a-space"),
    pytest.param(("promote", "handmade", "--staging-alias", "same", "--production-alias", "same"), "must name two aliases",
                 id="one-alias-for-both"),
]


@pytest.mark.parametrize("args, phrase", REGISTRY)
def test_registry_refusals_are_one_message(tmp_path, args, phrase):
    home = tmp_path / "state"
    _handmade_version(home, tmp_path)
    before = _registry(home)
    result = _cli(*(a.format(out=tmp_path / "out") for a in args), home=home)
    _assert_one_message(result.returncode, 5, result.stderr, phrase)
    assert _registry(home) == before


def test_promote_refuses_a_version_without_the_md5_of_its_evaluation_split(tmp_path, tiny_bert, cls_data):
    home = tmp_path / "state"
    _version_without_md5(home, tmp_path, tiny_bert, cls_data)
    before = _registry(home)
    result = _cli("promote", MODEL, home=home)
    _assert_one_message(result.returncode, 5, result.stderr, f"{MODEL} version 1 has no tag data.test_md5",
                        "cannot prove it compares on the frozen split", "Retrain")
    assert _registry(home) == before and ("tiny-cls-adapter", "production", 1) not in before["aliases"]


@pytest.mark.parametrize("error_code, phrase", [
    ("PERMISSION_DENIED", "MLFLOW_TRACKING_USERNAME"),
    ("RESOURCE_DOES_NOT_EXIST", "adapterflow status NAME"),
    ("INVALID_PARAMETER_VALUE", "'latest' and v<number> are reserved"),
])
def test_any_mlflow_exception_from_the_registry_is_a_registry_error(tmp_path, monkeypatch, capsys, error_code, phrase):
    """One mapping in the CLI: whatever MLflow call of whatever command refuses, the user reads one message, exit 5."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ErrorCode

    import adapterflow.tasks.registry_queries as queries

    monkeypatch.setenv("ADAPTERFLOW_HOME", str(tmp_path / "state"))
    secret = "s3cr3t-sentinel"
    uri = f"http://ops:{secret}@registry.example:5000"

    def refuse(name, tracking_uri):
        message = f"API request to {tracking_uri} failed: the user ops may not read {name}"
        raise MlflowException(message, ErrorCode.Value(error_code))

    monkeypatch.setattr(queries, "status", refuse)
    code = main(["status", MODEL, "--tracking-uri", uri])
    err = capsys.readouterr().err
    _assert_one_message(code, 5, err, f"the MLflow registry refused the request ({error_code})", phrase)
    assert secret not in err and "ops:***@registry.example" in err  # every message is redacted


# In the flow: the data checks that need the rows.

def _int_rows(count: int, seed: int) -> list[dict]:
    return [dict(row, label=LABELS.index(row["label"])) for row in classification_rows(count, seed)]


def _jsonl_data(tmp_path, rows_of) -> dict[str, Path]:
    return {split: write_jsonl(tmp_path / f"{split}.jsonl", rows_of(count, seed))
            for split, count, seed in (("train", 48, 1), ("validation", 18, 2), ("test", 18, 3))}


def _null_label_and_int_file_string_labels(tmp_path, tiny_bert):
    """Two problems, one run (validation reports every split's failures in its one message): a null label in the
    train split; integer labels in the validation and test splits while data.labels lists strings."""
    def rows(count, seed):
        if count != 48:
            return _int_rows(count, seed)
        found = classification_rows(count, seed)
        found[5]["label"] = None
        return found

    null_label = ["column_values_to_not_be_null on 'label'", "1 of 48"]
    int_file_string_labels = ["type mismatch: data.labels lists strings", "holds integers", "without quotes (e.g. [0, 1, 2])"]
    return cls_config(tiny_bert, _jsonl_data(tmp_path, rows)), null_label + int_file_string_labels


def _string_file_int_labels(tmp_path, tiny_bert):
    config = cls_config(tiny_bert, _jsonl_data(tmp_path, classification_rows), **{"data.labels": [0, 1, 2]})
    return config, ["type mismatch: data.labels lists integers", "holds strings (e.g. 'games')"]


@pytest.mark.parametrize("breaks", [
    pytest.param(_null_label_and_int_file_string_labels, id="null-label-and-int-labels-in-file-string-labels-in-config"),
    pytest.param(_string_file_int_labels, id="string-labels-in-file-int-labels-in-config"),
])
def test_refused_by_data_validation(prefect_server, tmp_path, tiny_bert, breaks):
    home = tmp_path / "state"
    config, phrases = breaks(tmp_path, tiny_bert)
    result = _cli("run", str(write_config(tmp_path / "run.yaml", config)), home=home)
    _assert_one_message(result.returncode, 3, result.stderr, "data validation failed; nothing was trained", *phrases)
    assert _registry(home)["versions"] == [] and not list(home.glob("runs/*/init"))


def test_divergence_says_what_to_change_and_registers_nothing(prefect_server, tmp_path, tiny_bert, cls_data, monkeypatch, capfd):
    from adapterflow.tasks.train import NonFiniteLossGuard

    real_guard = NonFiniteLossGuard.on_log

    def poisoned(self, args, state, control, logs=None, **kwargs):
        return real_guard(self, args, state, control, logs=dict(logs or {}, loss=float("nan")), **kwargs)

    home = tmp_path / "state"
    monkeypatch.setenv("ADAPTERFLOW_HOME", str(home))
    monkeypatch.setattr(NonFiniteLossGuard, "on_log", poisoned)
    code = main(["run", str(write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data)))])
    err = capfd.readouterr().err
    _assert_one_message(code, 4, err, "training diverged: loss became nan", "Lower train.learning_rate", "trains from scratch")
    assert "resume" not in err  # a rerun of the unchanged config would only diverge again
    assert _registry(home)["versions"] == []


def test_integer_labels_train_register_and_serve(prefect_server, tmp_path, tiny_bert, monkeypatch, capsys):
    import mlflow
    import pandas as pd
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    home = tmp_path / "state"
    monkeypatch.setenv("ADAPTERFLOW_HOME", str(home))
    config = cls_config(tiny_bert, _jsonl_data(tmp_path, _int_rows), **{"data.labels": [0, 1, 2]})
    assert main(["run", str(write_config(tmp_path / "run.yaml", config))]) == 0
    assert "registered       tiny-cls-adapter version 1  alias @staging" in capsys.readouterr().out
    assert [(name, alias) for name, alias, _ in _registry(home)["aliases"]] == [(MODEL, "staging")]
    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    with _use_tracking_uri(uri):
        served = mlflow.pyfunc.load_model(f"models:/{MODEL}@staging")
    predictions = list(served.predict(pd.DataFrame({"text": ["audio mixer volume synth", "puzzle board game arcade"]})))
    assert len(predictions) == 2 and all(type(p) is int and p in (0, 1, 2) for p in predictions)
