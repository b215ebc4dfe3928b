"""The adapterflow-auth MLflow app (tasks/auth_app.py) on a real server: basic-auth's rights, except that
moving a protected alias (@production) needs MANAGE on the registered model, whatever client asks."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_port, stop_process_group, wait_for

from adapterflow.tasks import auth_users
from adapterflow.tasks.auth_app import PROTECTED_ALIASES_ENV, protected_aliases

MODEL = "guarded-adapter"
ADMIN_PASSWORD = "adapterflow-test-admin-2c9f41"
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def test_protected_aliases_come_from_the_environment():
    assert protected_aliases({}) == {"production"}
    assert protected_aliases({PROTECTED_ALIASES_ENV: " production, Prod ,"}) == {"production", "prod"}
    with pytest.raises(ValueError, match="names no alias"):
        protected_aliases({PROTECTED_ALIASES_ENV: " , "})


@pytest.fixture
def guarded_server(tmp_path):
    """`mlflow server --app-name adapterflow-auth` on SQLite (runs and users), protecting production and prod."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path / 'users.db'}\n"
                   "admin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {key: value for key, value in os.environ.items() if key not in CREDENTIALS}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY="k" * 32,
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true", **{PROTECTED_ALIASES_ENV: "production,prod"})
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "adapterflow-auth",
               "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(tmp_path / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = tmp_path / "mlflow-server.log"
    with log.open("w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True)
    try:
        def healthy():
            assert server.poll() is None, log.read_text()[-3000:]
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                return response.status == 200

        wait_for(healthy, 240, f"mlflow server at {url}", interval=0.5)
        yield url
    finally:
        stop_process_group(server)


@contextmanager
def logged_in(monkeypatch, user: str, password: str):
    with monkeypatch.context() as env:
        env.setenv("MLFLOW_TRACKING_USERNAME", user)
        env.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield


def refused(action) -> str:
    """The server's 403 for `action`, as the MLflow client raises it."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as error:
        action()
    assert auth_users.permission_denied(error.value), error.value  # what promote/rollback turn into one clean message
    return str(error.value)


@pytest.mark.slow
def test_only_manage_moves_production(guarded_server, monkeypatch):
    from mlflow import MlflowClient

    uri = guarded_server
    for name in CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    aliases = lambda: client.get_registered_model(MODEL).aliases  # noqa: E731
    with logged_in(monkeypatch, "admin", ADMIN_PASSWORD):
        team = {user.name: user for user in auth_users.create_team_users(uri, MODEL)}
    trainer, promoter = team["trainer"].password, team["promoter"].password

    with logged_in(monkeypatch, "trainer", trainer):  # EDIT: versions and @staging, as the flow does
        run = client.create_run(client.create_experiment("guarded")).info.run_id
        v1, v2 = (client.create_model_version(MODEL, f"runs:/{run}/model", run_id=run).version for _ in range(2))
        client.set_registered_model_alias(MODEL, "staging", v1)
        message = refused(lambda: client.set_registered_model_alias(MODEL, "production", v1))
        assert f"moving @production on registered model '{MODEL}' needs MANAGE; MLflow user 'trainer' has EDIT" in message
        assert "@PROD" in refused(lambda: client.set_registered_model_alias(MODEL, "PROD", v1))  # the set is case-insensitive
        assert aliases() == {"staging": v1}

    with logged_in(monkeypatch, "promoter", promoter):  # MANAGE
        client.set_registered_model_alias(MODEL, "production", v1)

    with logged_in(monkeypatch, "trainer", trainer):
        refused(lambda: client.set_registered_model_alias(MODEL, "production", v2))
        refused(lambda: client.delete_registered_model_alias(MODEL, "production"))
        assert "which holds @production" in refused(lambda: client.rename_registered_model(MODEL, f"{MODEL}-moved"))
        client.set_registered_model_alias(MODEL, "candidate", v2)  # an unprotected alias stays EDIT's
        assert aliases() == {"staging": v1, "production": v1, "candidate": v2}
        _ajax_refused(uri, "trainer", trainer, v2)  # the UI's route is guarded too

    with logged_in(monkeypatch, "promoter", promoter):
        client.set_registered_model_alias(MODEL, "production", v2)
        client.delete_registered_model_alias(MODEL, "candidate")
    with logged_in(monkeypatch, "admin", ADMIN_PASSWORD):  # admins pass
        client.set_registered_model_alias(MODEL, "production", v1)
        assert aliases() == {"staging": v1, "production": v1}


def _ajax_refused(uri: str, user: str, password: str, version: str) -> None:
    import requests

    response = requests.post(f"{uri}/ajax-api/2.0/mlflow/registered-models/alias", auth=(user, password), timeout=30,
                             json={"name": MODEL, "alias": "production", "version": version})
    assert response.status_code == 403 and response.json()["error_code"] == "PERMISSION_DENIED", response.text
    assert "needs MANAGE" in response.json()["message"]
