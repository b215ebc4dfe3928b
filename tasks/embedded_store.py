"""The embedded SQLite stores (MLflow's tracking database, Prefect's ephemeral one) created once, under a lock.

Both libraries create or migrate their schema on first use. Two processes doing that at the same
time on a fresh state folder (a cron run and a manual run) collide: one fails with "table
experiments already exists" or "duplicate column name", which MLflow's caller reported as a
server that "cannot be reached" and Prefect's ephemeral server as a startup traceback. Here the
first process initialises the store while holding an exclusive lock beside the database; a
second one waits for the lock, then finds the schema current.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path

from adapterflow.errors import RegistryError
from adapterflow.redact import redact_text, redact_uri

_ready: set[str] = set()  # stores initialised by this process: the lock is taken once per store and process


@contextmanager
def exclusive_lock(path: Path):
    """Held until the block ends, or until the process dies, however it dies (the OS releases a flock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative to the working folder, as SQLAlchemy reads it); None otherwise."""
    for scheme in ("sqlite:///", "sqlite+aiosqlite:///", "sqlite+pysqlite:///"):
        if uri.startswith(scheme):
            path = uri.removeprefix(scheme).split("?", 1)[0]
            return Path(path).absolute() if path and path != ":memory:" else None
    return None


def prepare_tracking_store(uri: str) -> None:
    """MLflow's SQLite store: its first client access creates and migrates the schema, here under the lock."""
    database = sqlite_path(uri)
    if database is None or str(database) in _ready:
        return
    from adapterflow.tasks.tracking import client

    try:
        with exclusive_lock(database.with_name(database.name + ".lock")):
            mlflow_client = client(uri)
            mlflow_client.search_experiments(max_results=1)  # the tracking store: tables and migrations
            mlflow_client.search_registered_models(max_results=1)  # the registry store on the same database
    except Exception as err:  # a database that cannot be created or opened: one message, no traceback
        reason = redact_text(str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise RegistryError(
            f"MLflow at {redact_uri(uri)} cannot be opened: {reason}. "
            "Check that its folder is writable and has free space, or fix tracking.mlflow_uri."
        ) from None
    _ready.add(str(database))


def prepare_prefect_store() -> None:
    """Prefect's ephemeral SQLite database (no PREFECT_API_URL), created once, under the lock: call before the flow.

    Prefect's ephemeral server migrates its database and registers its block types when it starts;
    two servers starting together on a fresh database collide ("duplicate column name", "UNIQUE
    constraint failed"), and the loser exits with a traceback. The first process starts its
    server while holding the lock (the flow then uses that server), the second waits and finds the
    database ready. A marker beside the database names the Prefect version that prepared it, so
    every later run skips this (and an upgraded Prefect prepares it again, under the lock).
    A configured server (PREFECT_API_URL) or a database that is not SQLite is left alone.
    """
    import prefect
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return
    url = settings.server.database.connection_url
    database = sqlite_path(url.get_secret_value() if url is not None else "")
    if database is None:
        return
    marker = database.with_name(database.name + ".prepared")
    if _prepared(database, marker, prefect.__version__):
        return
    with exclusive_lock(database.with_name(database.name + ".lock")):
        if not _prepared(database, marker, prefect.__version__):  # the process that held the lock may have done it
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()  # the flow's client finds this same server running and uses it
            marker.write_text(prefect.__version__)


def _prepared(database: Path, marker: Path, version: str) -> bool:
    try:
        return database.is_file() and marker.read_text() == version
    except OSError:
        return False
