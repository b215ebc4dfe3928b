"""Do the servers a run talks to answer? Asked once, quickly, before any training."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from adapterflow.errors import RegistryError
from adapterflow.tasks.tracking import client


def check_reachable(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        _check_server_answers(uri)
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as err:  # any transport or database error means: cannot track
        reason = str(err).splitlines()[0]
        raise RegistryError(f"MLflow at {uri} cannot be reached: {reason}. Start it or fix tracking.mlflow_uri.") from None


def check_servers(config) -> None:
    """Every server the run will talk to answers, before any training: Prefect API, S3 endpoint of the DVC remote."""
    prefect_api = os.environ.get("PREFECT_API_URL")
    if prefect_api:
        _check_answers(prefect_api.rstrip("/") + "/health", f"the Prefect API at {prefect_api} (PREFECT_API_URL)",
                       "Start it (prefect server start) or unset PREFECT_API_URL for the embedded one.")
    remote = config.tracking.dvc_remote or ""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if remote.startswith("s3://") and endpoint:
        _check_answers(endpoint, f"the S3 endpoint {endpoint} of tracking.dvc_remote {remote} (AWS_ENDPOINT_URL)",
                       "Start the object store or fix AWS_ENDPOINT_URL.", any_status=True)


def _check_answers(url: str, what: str, fix: str, any_status: bool = False) -> None:
    try:
        urllib.request.urlopen(url, timeout=10).close()
    except urllib.error.HTTPError:
        if not any_status:  # an S3 endpoint answers 403 to an unsigned request: it is up
            raise RegistryError(f"{what} answered with an error. {fix}") from None
    except (urllib.error.URLError, OSError) as err:
        raise RegistryError(f"{what} cannot be reached ({getattr(err, 'reason', err)}). {fix}") from None


def _check_server_answers(uri: str) -> None:
    """One quick request to the server's /health: MLflow's client would retry a dead server for minutes."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise RegistryError(f"MLflow at {uri} cannot be reached ({reason}). Start it (mlflow server) or fix tracking.mlflow_uri.") from None
