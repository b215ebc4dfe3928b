"""Who may talk to the servers, said without a server where one is not needed: the preflight tells
"unauthorised" (with the variable to set) from "unreachable", masks every URI, and a store without
authentication has no users and no permission checks. The real servers (infra/native, MLflow's
basic-auth app, Prefect's auth string) are in tests/test_infra.py."""

from __future__ import annotations

import base64
import getpass
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from conftest import free_port

from adapterflow.errors import RegistryError
from adapterflow.tasks import auth_users
from adapterflow.tasks.server_health import check_reachable, check_servers

SECRET = "S3ntinel-Pa55word"
PREFECT_AUTH = "adapterflow:" + SECRET


@contextmanager
def stub_server(routes: dict, login: str | None = None):
    """A loopback HTTP server: path -> (status, body); with `login` every other path but */health wants that basic auth."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            expected = "Basic " + base64.b64encode(login.encode()).decode() if login else None
            if expected and not path.endswith("/health") and self.headers.get("Authorization") != expected:
                status, body = 401, {"error": "Unauthorized"}
            else:
                status, body = routes.get(path, (404, {"error": "not found"}))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


MLFLOW_ROUTES = {"/health": (200, "OK"), "/api/2.0/mlflow/experiments/search": (200, {"experiments": []})}


@pytest.fixture
def no_credentials(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PREFECT_API_AUTH_STRING",
                 "PREFECT_API_KEY", "PREFECT_API_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


def test_mlflow_preflight_says_unauthorised_and_which_variables_to_set(no_credentials, monkeypatch):
    with stub_server(MLFLOW_ROUTES, login=f"trainer:{SECRET}") as uri:
        with pytest.raises(RegistryError) as refused:
            check_reachable(uri)
        message = str(refused.value)
        assert "unauthorised: set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD" in message
        assert "requires a login" in message and "cannot be reached" not in message

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-wrong-password")
        with pytest.raises(RegistryError, match="refused MLflow user 'trainer' with that password"):
            check_reachable(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
        check_reachable(uri)  # the right password passes


def test_mlflow_preflight_says_unreachable_for_a_dead_server_and_masks_the_uri(no_credentials):
    uri = f"http://trainer:{SECRET}@127.0.0.1:{free_port()}"
    with pytest.raises(RegistryError) as failed:
        check_reachable(uri)
    message = str(failed.value)
    assert "cannot be reached" in message and "unauthorised" not in message
    assert SECRET not in message and "trainer:***@127.0.0.1" in message


def test_a_login_inside_the_uri_reaches_a_live_server(no_credentials):
    with stub_server(MLFLOW_ROUTES, login=f"trainer:{SECRET}") as uri:
        check_reachable(uri.replace("http://", f"http://trainer:{SECRET}@"))  # urllib alone took "trainer:..." for the host


def test_prefect_preflight_says_unauthorised_for_a_missing_or_wrong_auth_string(no_credentials, monkeypatch):
    config = SimpleNamespace(tracking=SimpleNamespace(dvc_remote=None))
    routes = {"/api/health": (200, True), "/api/admin/version": (200, "3.9.1")}
    with stub_server(routes, login=PREFECT_AUTH) as url:
        monkeypatch.setenv("PREFECT_API_URL", f"{url}/api")
        with pytest.raises(RegistryError) as refused:
            check_servers(config)
        assert "unauthorised: set PREFECT_API_AUTH_STRING" in str(refused.value) and "requires a login" in str(refused.value)
        monkeypatch.setenv("PREFECT_API_AUTH_STRING", "adapterflow:wrong")
        with pytest.raises(RegistryError, match="refused PREFECT_API_AUTH_STRING"):
            check_servers(config)
        monkeypatch.setenv("PREFECT_API_AUTH_STRING", PREFECT_AUTH)
        check_servers(config)
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    with pytest.raises(RegistryError, match="cannot be reached") as failed:
        check_servers(config)
    assert "unauthorised" not in str(failed.value)


def test_a_store_without_authentication_has_no_users_and_no_permission_checks(no_credentials, tmp_path):
    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert auth_users.whoami(sqlite) is None
    assert auth_users.require_manage(sqlite, "any-model", "promoting") == getpass.getuser()
    with stub_server(MLFLOW_ROUTES) as server_without_auth:  # no basic-auth app: /users/current does not exist
        assert auth_users.whoami(server_without_auth) is None
        assert auth_users.acting_user(server_without_auth) == getpass.getuser()
        with pytest.raises(RegistryError, match="has no authentication, so it has no users to create"):
            auth_users.create_team_users(server_without_auth, "any-model")
    with pytest.raises(RegistryError, match="has no authentication"):
        auth_users.create_team_users(sqlite, "any-model")


def test_the_authenticated_user_is_who_acts(no_credentials, monkeypatch):
    routes = {**MLFLOW_ROUTES, "/api/2.0/mlflow/users/current": (200, {"user": {"username": "promoter", "is_admin": False}}),
              "/api/3.0/mlflow/users/permissions/get": (200, {"allowed": True, "permission": "MANAGE"})}
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "promoter")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    with stub_server(routes, login=f"promoter:{SECRET}") as uri:
        assert auth_users.whoami(uri) == auth_users.Identity("promoter", False)
        assert auth_users.require_manage(uri, "m", "promoting m") == "promoter"
