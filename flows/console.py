"""What reaches the terminal when something fails: one message per error, never a wall of tracebacks.

A user's mistake (any AdapterflowError) is printed by the CLI as its message alone. A bug prints its
traceback once and one message that says it is a bug and names the file keeping the traceback;
Prefect's console handler shows no exception text, while its API handler (the Prefect UI's log)
still gets it. No handler (console, Prefect API, root) ever writes a credential: every record,
traceback included, goes through adapterflow.redact first.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from adapterflow.errors import AdapterflowError
from adapterflow.redact import RedactingFilter, redact_text

PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine")
TRACEBACK_FILE = "error.log"


class _DropUserErrors(logging.Filter):
    """A user error's traceback never reaches a log; its message reaches the user once, from the CLI."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, AdapterflowError) and not _mentions_user_error(record)


def _mentions_user_error(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return any(kind.__name__ in message for kind in _user_error_kinds())


def _user_error_kinds() -> list[type]:
    kinds, pending = [], [AdapterflowError]
    while pending:
        kind = pending.pop()
        kinds.append(kind)
        pending.extend(kind.__subclasses__())
    return kinds


class _WithoutTraceback(logging.Formatter):
    """Formats a record as its wrapped formatter would, minus the exception text."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        bare = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return self.inner.format(bare)


class _RedactingTraceback(RedactingFilter):
    """RedactingFilter plus the exception: a handler formats exc_info only after its filters ran, so the
    traceback text is made here, masked, and left as exc_text (which every Formatter uses as it is)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        return super().filter(record)


def redact_every_log_handler() -> None:
    """The redacting filter on every handler of every logger there is now (root, Prefect's console, API and
    debug handlers, MLflow's own, ...). Called again whenever libraries may have added handlers."""
    loggers = [logging.getLogger()] + [
        logger for logger in list(logging.Logger.manager.loggerDict.values()) if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in list(logger.handlers):
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(_RedactingTraceback())


def quiet_failures_in_prefect_logs() -> None:
    # User errors: filtered on the loggers (the failed state, with its message, still reaches the UI).
    for logger in map(logging.getLogger, PREFECT_RUN_LOGGERS):
        if not any(isinstance(f, _DropUserErrors) for f in logger.filters):
            logger.addFilter(_DropUserErrors())
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # Bugs: only the console drops the traceback, which the CLI writes to a file instead. Called again
    # when the flow starts: Prefect may set its handlers up only then, on the stream of that moment.
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # a no-op once `import prefect` did it; the handlers below must exist to be changed

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter))
    # Credentials: masked on every handler, so neither the terminal nor the Prefect database's logs hold one.
    redact_every_log_handler()


def keep_traceback(error: BaseException, folder: Path) -> Path:
    """Write the full traceback under `folder` (a run folder when there is one) and remember where on the error."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TRACEBACK_FILE
    if path.exists():
        path = folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{id(error):x}.log"
    path.write_text(redact_text("".join(traceback.format_exception(error))))
    error.adapterflow_traceback = str(path)  # the CLI names this file; Prefect may hand back the same object
    return path


def bug_message(error: BaseException, fallback_folder: Path) -> str:
    """The traceback once, then one message naming the file that keeps it (written now if the flow did not)."""
    path = getattr(error, "adapterflow_traceback", None) or keep_traceback(error, fallback_folder)
    first_line = (str(error).splitlines() or [""])[0]
    return redact_text(
        "".join(traceback.format_exception(error)) + f"error: unexpected {type(error).__name__}: {first_line}\n"
        f"This is a bug in adapterflow, not a problem with your config or data. Please report it with the full "
        f"traceback in {path}."
    )
