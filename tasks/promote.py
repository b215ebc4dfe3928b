"""Champion/challenger: move `production` to the `staging` version only when the gate passes; roll it back.

MLflow keeps no history of alias moves, so every promotion, refusal and rollback is written as a
tag on the versions involved (with who did it), and the production history (for rollback) as a tag on the model.
On a server with authentication both need MANAGE on the registered model, checked before anything is evaluated.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from adapterflow.errors import RegistryError
from adapterflow.tasks.auth_users import manage_refused, permission_denied, require_manage
from adapterflow.tasks.gate import Decision, judge
from adapterflow.tasks.promotion_lock import promotion_lock
from adapterflow.tasks.registry_queries import (
    aliases_of,
    complete_version,
    download_adapter,
    reachable_client,
    registered_model,
    version_config,
)
from adapterflow.tasks.registry_tags import HISTORY_TAG, event_tag, history_value, read_history


def promote(name: str, uri: str, lock_dir: Path, staging: str = "staging", production: str = "production") -> Decision:
    """Evaluate staging vs production (or the bare base) and move production when the gate passes."""
    mlflow_client = reachable_client(uri)
    with promotion_lock(lock_dir, uri, name):
        model = registered_model(mlflow_client, name)
        user = require_manage(uri, name, f"promoting {name} (moving @{production})")
        candidate = complete_version(mlflow_client, name, staging, model)
        config = version_config(mlflow_client, candidate)
        incumbent = aliases_of(model).get(production)
        if incumbent == candidate.version:
            raise RegistryError(f"{name} version {candidate.version} is already @{production}; nothing to promote.")
        decision = judge(mlflow_client, name, config, candidate, incumbent)
        if decision.promoted:
            _move_production(mlflow_client, name, production, candidate.version, incumbent, uri)
        _record(mlflow_client, name, "promoted" if decision.promoted else "refused", decision, [candidate.version, incumbent], user)
        return decision


def rollback(name: str, uri: str, lock_dir: Path, production: str = "production") -> tuple[str, str]:
    """Point production back at the version it held before; returns (from, to)."""
    mlflow_client = reachable_client(uri)
    with promotion_lock(lock_dir, uri, name):
        model = registered_model(mlflow_client, name)
        user = require_manage(uri, name, f"rolling back @{production} of {name}")
        current = aliases_of(model).get(production)
        history = read_history(model.tags)
        if current is None:
            raise RegistryError(f"{name} has no @{production} version; there is nothing to roll back.")
        if not history:
            raise RegistryError(f"{name} @{production} (version {current}) has no previous production version to roll back to.")
        previous = history[-1]
        download_adapter(mlflow_client, name, previous, Path(tempfile.mkdtemp()))  # refuse a version whose adapter is gone
        with _server_refusal(name, f"moving @{production}", uri):
            mlflow_client.set_registered_model_alias(name, production, previous)
        mlflow_client.set_registered_model_tag(name, HISTORY_TAG, history_value(history[:-1]))
        event = {"action": "rollback", "from": current, "to": previous, "reason": "adapterflow rollback"}
        _tag_event(mlflow_client, name, event, [current, previous], user)
        return current, previous


def _move_production(mlflow_client, name: str, alias: str, version: str, expected: str | None, uri: str) -> None:
    """Move the alias only if production is still what was evaluated against."""
    model = mlflow_client.get_registered_model(name)
    current = aliases_of(model).get(alias)
    if current != expected:
        raise RegistryError(f"@{alias} of {name} moved to version {current} during this promotion; promote again.")
    with _server_refusal(name, f"moving @{alias}", uri):
        if expected is not None:
            mlflow_client.set_registered_model_tag(name, HISTORY_TAG, history_value(read_history(model.tags) + [expected]))
        mlflow_client.set_registered_model_alias(name, alias, version)


@contextmanager
def _server_refusal(name: str, action: str, uri: str):
    """A 403 from the server (whose permissions could not be read beforehand) as the user's error, not a bug."""
    try:
        yield
    except Exception as err:
        if permission_denied(err):
            raise manage_refused(name, action, uri) from None
        raise


def _record(mlflow_client, name: str, action: str, decision: Decision, versions: list, user: str) -> None:
    event = {
        "action": action, "from": decision.incumbent, "to": decision.candidate, "metric": decision.metric,
        "candidate": decision.candidate_value, "incumbent": decision.incumbent_value, "reason": decision.reason,
    }
    if decision.forgetting:
        event["forgetting"] = decision.forgetting
    if decision.tie_break:
        event["intruder_dimensions"] = decision.tie_break
    _tag_event(mlflow_client, name, event, versions, user)


def _tag_event(mlflow_client, name: str, event: dict, versions: list, user: str) -> None:
    """`by`: the authenticated MLflow user on a server with auth, else the OS user."""
    event["by"] = user
    event["when"] = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"
    key, value = event_tag(event)
    for version in {v for v in versions if v is not None}:
        mlflow_client.set_model_version_tag(name, version, key, value)
