"""MLflow's basic-auth server app plus one rule: moving a protected alias of a registered model needs MANAGE.

Basic-auth alone lets any user with EDIT on a registered model set any alias, @production included, so
adapterflow's own MANAGE check in `promote`/`rollback` could be bypassed with a raw MLflow client. This app
is basic-auth (its `create_app`, user store, config and permission lookups, unchanged) with one more
before-request check, run after basic-auth's own (the caller is authenticated and holds EDIT by then):

- POST   .../registered-models/alias   (set an alias)     of a protected alias: MANAGE;
- DELETE .../registered-models/alias   (delete an alias)  of a protected alias: MANAGE (basic-auth already
  asks its DELETE permission, which only MANAGE has);
- POST   .../registered-models/rename  of a model that holds a protected alias: MANAGE (the alias goes
  along to the new name, and the old name is free for a model its creator manages).

Each under /api and the UI's /ajax-api (and --static-prefix). MLflow's GraphQL endpoint has no mutation
that touches aliases. Admins pass, as in basic-auth. A refusal is a 403 with MLflow's JSON error
(PERMISSION_DENIED) naming the permission.

    mlflow server --app-name adapterflow-auth ...   (the same MLFLOW_AUTH_CONFIG_PATH ini as basic-auth)
    ADAPTERFLOW_PROTECTED_ALIASES=production,prod   (read at server start; default: production; case-insensitive)
"""

from __future__ import annotations

import logging
import os

PROTECTED_ALIASES_ENV = "ADAPTERFLOW_PROTECTED_ALIASES"
DEFAULT_PROTECTED_ALIASES = ("production",)
_KINDS = ("set", "delete", "rename")

_logger = logging.getLogger(__name__)


def protected_aliases(environ=None) -> frozenset[str]:
    """The aliases only MANAGE may move, lower-cased: ADAPTERFLOW_PROTECTED_ALIASES, comma-separated."""
    raw = (os.environ if environ is None else environ).get(PROTECTED_ALIASES_ENV)
    if raw is None:
        return frozenset(DEFAULT_PROTECTED_ALIASES)
    names = frozenset(name.strip().lower() for name in raw.split(",") if name.strip())
    if not names:  # an empty list would silently protect nothing
        raise ValueError(f"{PROTECTED_ALIASES_ENV} is set but names no alias; unset it for the default "
                         f"({','.join(DEFAULT_PROTECTED_ALIASES)}), or run --app-name basic-auth to protect none.")
    return names


def create_app(app=None):
    """The `mlflow.app` factory: basic-auth's app, then the alias guard on the same Flask app."""
    from mlflow.server import app as mlflow_app
    from mlflow.server.auth import create_app as basic_auth_app

    flask_app = mlflow_app if app is None else app
    protected = protected_aliases()
    served = basic_auth_app(flask_app)  # under uvicorn a FastAPI app wrapping flask_app: its hooks still run
    flask_app.before_request(_alias_guard(protected, alias_routes()))  # after basic-auth's: authenticated, EDIT held
    _logger.info("adapterflow-auth: moving @%s needs MANAGE on the registered model", ", @".join(sorted(protected)))
    return served


def alias_routes() -> dict[tuple[str, str], str]:
    """(path, method) -> set/delete/rename for every route MLflow serves those requests on."""
    from mlflow.protos.model_registry_pb2 import DeleteRegisteredModelAlias, RenameRegisteredModel, SetRegisteredModelAlias
    from mlflow.server.handlers import get_endpoints

    kinds = {SetRegisteredModelAlias: "set", DeleteRegisteredModelAlias: "delete", RenameRegisteredModel: "rename"}
    routes = {(path, method): kind for path, kind, methods in get_endpoints(kinds.get) if kind in _KINDS for method in methods}
    if set(routes.values()) != set(_KINDS):  # an MLflow that moved them: refuse to start rather than guard nothing
        raise RuntimeError(f"adapterflow-auth: MLflow serves no route for {sorted(set(_KINDS) - set(routes.values()))}")
    return routes


def _alias_guard(protected: frozenset[str], routes: dict[tuple[str, str], str]):
    from flask import request
    from mlflow.server.handlers import catch_mlflow_exception

    @catch_mlflow_exception  # a malformed request gets MLflow's JSON 400, not a 500
    def guard_protected_aliases():
        kind = routes.get((request.path, request.method))
        return None if kind is None else _check(kind, protected)

    return guard_protected_aliases


def _check(kind: str, protected: frozenset[str]):
    """None to let the request through, or the 403 response."""
    from flask import Response
    from mlflow.server import auth

    authorization = auth.authenticate_request()
    if isinstance(authorization, Response):  # basic-auth answered 401 already; never reached, kept safe
        return authorization
    if auth.sender_is_admin():
        return None
    name = auth._get_request_param("name")
    moved = _moved_aliases(kind, name, protected)
    if not moved:
        return None
    permission = auth._get_permission_from_registered_model_or_prompt_name()  # basic-auth's own lookup (prompts too)
    if permission.can_manage:
        return None
    return _refusal(kind, name, moved, authorization.username, permission.name)


def _moved_aliases(kind: str, name: str, protected: frozenset[str]) -> list[str]:
    """The protected aliases this request would move."""
    from mlflow.server import auth
    from mlflow.server.handlers import _get_model_registry_store

    if kind == "rename":
        model = auth._fetch_or_none(_get_model_registry_store().get_registered_model, name)
        return sorted(alias for alias in (model.aliases if model else {}) if alias.lower() in protected)
    alias = auth._get_request_param("alias")
    return [alias] if isinstance(alias, str) and alias.lower() in protected else []


def _refusal(kind: str, name: str, aliases: list[str], username: str, held: str):
    from flask import Response
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    moved = ", ".join(f"@{alias}" for alias in aliases)
    action = {"set": f"moving {moved} on registered model {name!r}", "delete": f"deleting {moved} of registered model {name!r}",
              "rename": f"renaming registered model {name!r}, which holds {moved},"}[kind]
    message = f"{action} needs MANAGE; MLflow user {username!r} has {held} on it."
    error = MlflowException(message, error_code=PERMISSION_DENIED)
    return Response(error.serialize_as_json(), status=error.get_http_status_code(), mimetype="application/json")
