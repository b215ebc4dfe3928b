"""MLflow identities on a tracking server with its basic-auth app: who is calling, what they may do
on a registered model, and the team's `trainer` and `promoter` users.

Credentials come only from MLflow's standard environment variables (MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN), read by MLflow's own request helper. A store
without authentication (the embedded SQLite default, a server started without `--app-name
basic-auth`) has no users: every check here passes there and the acting user is the OS user.

The `adapterflow-auth` server app (tasks/auth_app.py) refuses to move a protected alias (@production)
without MANAGE, whatever client asks; `promote` and `rollback` check it first (`require_manage`) so they
stop before evaluating anything.
"""

from __future__ import annotations

import getpass
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from adapterflow.errors import RegistryError
from adapterflow.redact import redact_uri

TRAINER_PERMISSION = "EDIT"  # create versions, tag them, set @staging (checked against the server by tests/test_auth.py)
PROMOTER_PERMISSION = "MANAGE"  # also what adapterflow requires to move @production or roll back
CREDENTIALS = "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"

_CURRENT_USER = "/api/2.0/mlflow/users/current"
_GET_USER = "/api/2.0/mlflow/users/get"
_CREATE_USER = "/api/2.0/mlflow/users/create"
_LIST_USERS = "/api/2.0/mlflow/users/list"
_UPDATE_PASSWORD = "/api/2.0/mlflow/users/update-password"
_GET_PERMISSION = "/api/3.0/mlflow/users/permissions/get"
_GRANT_PERMISSION = "/api/3.0/mlflow/users/permissions/grant"
_REVOKE_PERMISSION = "/api/3.0/mlflow/users/permissions/revoke"
_LEGACY_GET_PERMISSION = "/api/2.0/mlflow/registered-models/permissions/get"  # MLflow before the v3 permission API


@dataclass(frozen=True)
class Identity:
    """The user the tracking server authenticated for this process."""

    name: str
    is_admin: bool


def whoami(uri: str) -> Identity | None:
    """The authenticated MLflow user, or None when the store has no authentication."""
    if not uri.startswith(("http://", "https://")):
        return None
    response = _request(uri, _CURRENT_USER, "GET")
    if response.status_code == 404:  # no basic-auth app: the route does not exist
        return None
    body = _json(uri, response, _CURRENT_USER)
    user = body.get("user") or {}
    if not user.get("username"):
        return None
    return Identity(user["username"], bool(user.get("is_admin")))


def acting_user(uri: str) -> str:
    """Who does this, for audit tags: the authenticated MLflow user when the server has auth, else the OS user."""
    identity = whoami(uri)
    return identity.name if identity else _os_user()


def require_manage(uri: str, name: str, action: str) -> str:
    """Stop unless the caller holds MANAGE on registered model `name` (or auth is off); returns the acting user."""
    identity = whoami(uri)
    if identity is None:
        return _os_user()
    if identity.is_admin:
        return identity.name
    permission = model_permission(uri, identity.name, name)
    if permission == PROMOTER_PERMISSION:
        return identity.name
    raise RegistryError(
        f"{action} needs MANAGE on registered model {name!r}, and MLflow user {identity.name!r} has "
        f"{permission or 'no permission'} on it; nothing was evaluated or changed. {_holders(uri, name)} "
        f"Run it with the credentials of a user who holds MANAGE ({CREDENTIALS}); an MLflow admin grants it "
        f"with: adapterflow infra users {name}"
    )


def permission_denied(err: Exception) -> bool:
    """An MLflow client error that is the server's 403."""
    return getattr(err, "error_code", None) == "PERMISSION_DENIED" or "error code 403" in str(err)


def manage_refused(name: str, action: str, uri: str) -> RegistryError:
    """The server itself refused a registry change (a server whose permissions adapterflow could not read first)."""
    return RegistryError(f"the MLflow server at {redact_uri(uri)} refused {action}: it needs MANAGE on registered model {name!r} "
                         f"for MLflow user {os.environ.get('MLFLOW_TRACKING_USERNAME') or '(none)'}. {_holders(uri, name)}")


def model_permission(uri: str, username: str, name: str) -> str | None:
    """The user's effective permission on the registered model, as the server resolves it (READ, EDIT, MANAGE, ...)."""
    params = {"username": username, "resource_type": "registered_model", "resource_id": name}
    response = _request(uri, _GET_PERMISSION, "GET", params=params)
    if response.status_code == 404 and "RESOURCE_DOES_NOT_EXIST" not in response.text:  # an older server
        response = _request(uri, _LEGACY_GET_PERMISSION, "GET", params={"name": name, "username": username})
        if response.status_code == 404:
            return None  # no explicit grant: the server's default_permission applies
        return _json(uri, response, _LEGACY_GET_PERMISSION)["registered_model_permission"]["permission"]
    return _json(uri, response, _GET_PERMISSION).get("permission")


def _holders(uri: str, name: str) -> str:
    """Who holds MANAGE on the model, as far as the caller may see: admins always; grants only to admins."""
    try:
        users = _json(uri, _request(uri, _LIST_USERS, "GET"), _LIST_USERS).get("users", [])
    except RegistryError:
        return "Who holds it is visible to MLflow admins only."
    admins = sorted(u["username"] for u in users if u.get("is_admin"))
    managers = sorted(
        u["username"] for u in users if not u.get("is_admin") and any(
            p.get("resource_type") == "registered_model" and p.get("resource_pattern") in (name, "*")
            and p.get("permission") == PROMOTER_PERMISSION
            for role in u.get("roles", []) for p in role.get("permissions", [])
        )
    )
    held = f"MANAGE is held by the MLflow admins ({', '.join(admins) or 'none'})"
    if managers:
        return f"{held} and by: {', '.join(managers)}."
    return f"{held} and by the users an admin granted it to (grants to other users are visible to admins only)."


# ---- the team's users ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TeamUser:
    name: str
    permission: str
    duty: str
    created: bool
    password: str | None  # set now (created, or reset on request); None: unchanged, never shown again
    changed_permission: str | None  # the permission it had before, when this run changed it

    def export_line(self, model: str) -> str:
        return (f"export MLFLOW_TRACKING_USERNAME={self.name} MLFLOW_TRACKING_PASSWORD={self.password}"
                f"  # {self.permission} on registered model {model!r}: {self.duty}")


def create_team_users(uri: str, model: str, trainer: str = "trainer", promoter: str = "promoter",
                      reset_passwords: bool = False) -> list[TeamUser]:
    """Create (or keep) the trainer and the promoter with their permissions on `model`; idempotent.

    Needs an MLflow admin's credentials in the environment. The registered model is created if
    missing, by the admin: a model's creator gets MANAGE on it, which a trainer must not have.
    """
    from adapterflow.tasks.server_health import check_reachable

    if trainer == promoter:
        raise RegistryError(f"the trainer and the promoter must be two users; both are {trainer!r}.")
    identity = None
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)  # unreachable and unauthorised said as the pipeline's preflight says them
        identity = whoami(uri)
    if identity is None:
        raise RegistryError(
            f"the MLflow store at {redact_uri(uri)} has no authentication, so it has no users to create. Start the server "
            "with --app-name adapterflow-auth (infra/native/start.sh and infra/compose.yaml do) and pass its URI with --tracking-uri "
            "or MLFLOW_TRACKING_URI."
        )
    if not identity.is_admin:
        raise RegistryError(
            f"creating users needs an MLflow admin, and {identity.name!r} is not one: set {CREDENTIALS} to the admin's "
            "(infra/native: source STATE/admin.env; compose: user admin, password MLFLOW_AUTH_ADMIN_PASSWORD)."
        )
    _ensure_model(uri, model)
    team = []
    for user, permission, duty in ((trainer, TRAINER_PERMISSION, "registers versions and moves @staging"),
                                   (promoter, PROMOTER_PERMISSION, "moves @production and rolls it back")):
        created, password = _ensure_user(uri, user, reset_passwords)
        before = _ensure_permission(uri, user, model, permission)
        team.append(TeamUser(user, permission, duty, created, password, before))
    return team


def write_passwords(path: Path, model: str, uri: str, team: list[TeamUser]) -> None:
    """Append the new passwords to `path`, created with mode 0600 (an existing file is made 0600 too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(descriptor, 0o600)
    lines = [f"# adapterflow infra users: registered model {model!r} on {redact_uri(uri)}; one identity per process."]
    lines += [user.export_line(model) for user in team if user.password]
    with os.fdopen(descriptor, "a") as handle:
        handle.write("\n".join(lines) + "\n")


def _ensure_model(uri: str, model: str) -> None:
    from mlflow.exceptions import MlflowException

    from adapterflow.tasks.tracking import client

    try:
        client(uri).create_registered_model(model)
    except MlflowException as err:
        if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise RegistryError(f"cannot create registered model {model!r}: {str(err).splitlines()[0]}") from None


def _ensure_user(uri: str, user: str, reset_password: bool) -> tuple[bool, str | None]:
    response = _request(uri, _GET_USER, "GET", params={"username": user})
    if response.status_code == 200:
        found = _json(uri, response, _GET_USER).get("user", {})
        if found.get("is_admin"):
            raise RegistryError(f"MLflow user {user!r} is an admin, which may do anything, including moving @production; "
                                "choose another name (--trainer / --promoter).")
        if not reset_password:
            return False, None
        password = _new_password()
        _json(uri, _request(uri, _UPDATE_PASSWORD, "PATCH", json={"username": user, "password": password}), _UPDATE_PASSWORD)
        return False, password
    if "RESOURCE_DOES_NOT_EXIST" not in response.text:
        _json(uri, response, _GET_USER)  # raises with the server's reason
    password = _new_password()
    _json(uri, _request(uri, _CREATE_USER, "POST", json={"username": user, "password": password}), _CREATE_USER)
    return True, password


def _ensure_permission(uri: str, user: str, model: str, permission: str) -> str | None:
    """Exactly `permission` for the user on the model (a creator's MANAGE is lowered); the earlier one if it changed."""
    current = model_permission(uri, user, model)
    if current == permission:
        return None
    grant = {"username": user, "resource_type": "registered_model", "resource_id": model}
    revoked = _request(uri, _REVOKE_PERMISSION, "POST", json=grant)  # a grant exists only if a store row does
    if revoked.status_code != 200 and "RESOURCE_DOES_NOT_EXIST" not in revoked.text:
        _json(uri, revoked, _REVOKE_PERMISSION)
    _json(uri, _request(uri, _GRANT_PERMISSION, "POST", json={**grant, "permission": permission}), _GRANT_PERMISSION)
    return current or "none"


def _new_password() -> str:
    return secrets.token_urlsafe(24)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return f"uid {os.getuid()}"


def _request(uri: str, endpoint: str, method: str, **kwargs):
    """One request with MLflow's own helper: the standard credential variables, TLS settings, no retries."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        return http_request(get_default_host_creds(uri), endpoint, method, max_retries=0, timeout=30, **kwargs)
    except Exception as err:  # transport errors
        reason = str(err).splitlines()[0]
        raise RegistryError(f"MLflow at {redact_uri(uri)} cannot be reached ({reason}).") from None


def _json(uri: str, response, endpoint: str) -> dict:
    if response.status_code == 401:
        raise RegistryError(f"MLflow at {redact_uri(uri)}: unauthorised: set {CREDENTIALS} (the server requires a login).")
    if response.status_code == 403:
        raise RegistryError(f"MLflow at {redact_uri(uri)} refused {endpoint} to MLflow user "
                            f"{os.environ.get('MLFLOW_TRACKING_USERNAME') or '(none)'} (permission denied).")
    if response.status_code != 200:
        raise RegistryError(f"MLflow at {redact_uri(uri)} answered {endpoint} with HTTP {response.status_code}: "
                            f"{response.text.strip().splitlines()[0] if response.text.strip() else ''}")
    return response.json() if response.text.strip() else {}
