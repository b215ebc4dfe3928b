"""Do the servers a run talks to answer, and do they let this process in? Asked once, quickly, before any training.

A server that answers /health (open to everyone) but refuses the API is "unauthorised", with the
standard variable to set, not "unreachable". Credentials are read only from those variables.
Every URI in a message is redacted.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request

from adapterflow.errors import RegistryError
from adapterflow.redact import redact_text, redact_uri, without_login
from adapterflow.tasks.embedded_store import prepare_tracking_store
from adapterflow.tasks.tracking import client


def check_reachable(uri: str) -> None:
    prepare_tracking_store(uri)  # a fresh SQLite store is created once, under a lock: a concurrent process waits for it
    if uri.startswith(("http://", "https://")):
        _check_server_answers(uri)
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as err:  # any transport or database error means: cannot track
        reason = redact_text((str(err).splitlines() or [""])[0])
        raise RegistryError(f"MLflow at {redact_uri(uri)} cannot be reached: {reason}. Start it or fix tracking.mlflow_uri.") from None


def check_servers(config) -> None:
    """Every server the run will talk to answers, before any training: Prefect API, S3 endpoint of the DVC remote."""
    prefect_api = os.environ.get("PREFECT_API_URL")
    if prefect_api:
        what = f"the Prefect API at {redact_uri(prefect_api)} (PREFECT_API_URL)"
        _check_answers(prefect_api.rstrip("/") + "/health", what,
                       "Start it (prefect server start) or unset PREFECT_API_URL for the embedded one.")
        _check_prefect_login(prefect_api.rstrip("/") + "/admin/version", what)
    remote = config.tracking.dvc_remote or ""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if remote.startswith("s3://") and endpoint:
        _check_answers(endpoint, f"the S3 endpoint {redact_uri(endpoint)} of tracking.dvc_remote {redact_uri(remote)} (AWS_ENDPOINT_URL)",
                       "Start the object store or fix AWS_ENDPOINT_URL.", any_status=True)


def _check_answers(url: str, what: str, fix: str, any_status: bool = False) -> None:
    try:
        urllib.request.urlopen(without_login(url), timeout=10).close()
    except urllib.error.HTTPError:
        if not any_status:  # an S3 endpoint answers 403 to an unsigned request: it is up
            raise RegistryError(f"{what} answered with an error. {fix}") from None
    except (urllib.error.URLError, OSError) as err:
        raise RegistryError(f"{what} cannot be reached ({redact_text(str(getattr(err, 'reason', err)))}). {fix}") from None


def _check_prefect_login(url: str, what: str) -> None:
    """An API route that needs the server's PREFECT_SERVER_API_AUTH_STRING when it has one (/health never does)."""
    auth_string, api_key = os.environ.get("PREFECT_API_AUTH_STRING"), os.environ.get("PREFECT_API_KEY")
    headers = {}
    if auth_string:  # as Prefect's client sends it: HTTP basic with the string as user:password
        headers["Authorization"] = "Basic " + base64.b64encode(auth_string.encode()).decode()
    elif api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        urllib.request.urlopen(urllib.request.Request(without_login(url), headers=headers), timeout=10).close()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            refused = "it refused PREFECT_API_AUTH_STRING" if auth_string else "it requires a login"
            raise RegistryError(f"{what} answered {err.code} ({refused}): unauthorised: set PREFECT_API_AUTH_STRING to the "
                                "server's PREFECT_SERVER_API_AUTH_STRING (in the environment, never in the run config).") from None
    except (urllib.error.URLError, OSError):
        pass  # it answered /health a moment ago; the flow's own client reports anything else


def _check_server_answers(uri: str) -> None:
    """One quick request to the server's /health: MLflow's client would retry a dead server for minutes."""
    try:
        urllib.request.urlopen(without_login(uri.rstrip("/") + "/health"), timeout=10).close()
    except (urllib.error.URLError, OSError) as err:
        reason = redact_text(str(getattr(err, "reason", err)))
        raise RegistryError(f"MLflow at {redact_uri(uri)} cannot be reached ({reason}). "
                            "Start it (mlflow server) or fix tracking.mlflow_uri.") from None
    _check_mlflow_login(uri)


def _check_mlflow_login(uri: str) -> None:
    """One API request with MLflow's own credential handling (/health answers everyone, the API only a known user)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                                params={"max_results": 1}, max_retries=0, timeout=10)
    except Exception:
        return  # the client's own request reports anything but a refusal
    if response.status_code not in (401, 403):
        return
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if response.status_code == 403:
        refused = f"MLflow user {user!r} may not read experiments there"
    else:
        refused = f"it refused MLflow user {user!r} with that password" if user else "it requires a login"
    raise RegistryError(f"MLflow at {redact_uri(uri)} answered {response.status_code} ({refused}): unauthorised: set "
                        "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD to a user of that server (in the environment, "
                        "never in the run config).") from None
