"""Secrets never leave the process: the one place that masks credentials in URIs and free text.

Every URI that is logged, tagged, printed, written to a file or put in an error message goes
through `redact_uri` (one URI) or `redact_text` (any text that may contain URIs). A password in
a URI's userinfo, a known secret query parameter, and the value of a known secret environment
variable become `***`. User names stay: they are not secrets and they help to debug.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
SECRET_QUERY_KEYS = frozenset({
    "password", "passwd", "pwd", "pass", "secret", "token", "access_token", "refresh_token", "id_token", "api_key",
    "apikey", "key", "auth", "authorization", "credential", "credentials", "sig", "signature", "sas", "client_secret",
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "aws_secret_access_key", "aws_session_token",
})
# Environment variables whose values are secrets wherever they appear (the standard ways to pass credentials).
SECRET_ENV_VARS = (
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PGPASSWORD",
    "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING", "HF_TOKEN", "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_CONNECTION_STRING", "MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_TRAINER_PASSWORD",
)
_MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")


def redact_uri(uri: str | None) -> str | None:
    """The URI with its password and secret query values masked; anything unparsable is masked whole after '://'."""
    if not uri or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
        netloc, query = _masked_netloc(parts.netloc), _masked_query(parts.query)
        if (netloc, query) != (parts.netloc, parts.query):  # rebuilt only when changed: urlunsplit normalises sqlite:////
            uri = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
        return _mask_env_secrets(uri)
    except ValueError:
        return uri.split("://", 1)[0] + "://" + MASK


def redact_text(text: str) -> str:
    """Every URI inside `text` redacted, and every known secret environment value masked."""
    if not text:
        return text
    return _mask_env_secrets(_URI.sub(lambda match: redact_uri(match.group(0)), text))


def without_login(url: str) -> str:
    """The URL minus its user:password@, for a request that needs no login (a /health probe): urllib would take
    the login for the host."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])) if "@" in parts.netloc else url


def redact_values(value):
    """Every URI inside a JSON-like value with its credentials masked; keys, structure and every other string unchanged.

    A config carries credentials only in URIs (tracking.mlflow_uri, tracking.dvc_remote). Other strings
    (data paths, names) stay byte-exact: the training worker and `promote` read such a config back.
    """
    if isinstance(value, str):
        return redact_text(value) if "://" in value else value
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(item) for item in value]
    return value


def _masked_netloc(netloc: str) -> str:
    if "@" not in netloc:
        return netloc
    userinfo, host = netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return f"{user}:{MASK}@{host}" if ":" in userinfo else f"{MASK}@{host}" if _looks_like_token(user) else netloc


def _looks_like_token(user: str) -> bool:
    # A lone userinfo without ':' is a token for some services (https://TOKEN@host); a short name is a user.
    return len(user) >= 20


def _masked_query(query: str) -> str:
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(key.lower() in SECRET_QUERY_KEYS for key, _ in pairs):
        return query
    return urlencode([(key, MASK if key.lower() in SECRET_QUERY_KEYS else value) for key, value in pairs], safe="*")


def _mask_env_secrets(text: str) -> str:
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= _MIN_SECRET_LENGTH and value in text:
            text = text.replace(value, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a log record's message (and exception text) with secrets masked; install on handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def install_log_redaction(*loggers: logging.Logger) -> None:
    """The filter on every handler of the given loggers (root by default), once."""
    for logger in loggers or (logging.getLogger(),):
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
