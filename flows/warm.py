"""Import the heavy libraries in a thread while Prefect's ephemeral server boots in its subprocess.

The flow joins this thread before its first stage, so no module is ever imported by two threads
at once (concurrent imports of packages with circular imports fail with "partially initialized").
"""

from __future__ import annotations

import importlib
import threading

# In the order the stages need them: validation first.
HEAVY_MODULES = ("great_expectations", "torch", "transformers", "peft", "mlflow", "mlflow.tracking", "datasets", "sklearn.metrics")
_thread: threading.Thread | None = None


def start(threads_will_import: bool = False) -> None:
    """A run warms up only where Prefect boots its embedded server: with a configured server (PREFECT_API_URL)
    there is no boot to overlap, and the flow would wait for every import before its skip check, which needs none
    of them (an unchanged retrain against a team server took 15 s, 8 s of it waiting for torch and peft).
    `threads_will_import`: flows in threads (a sweep's trials) follow, and they must find the imports done."""
    global _thread
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() and not threads_will_import:
        return
    # Prefect's server module is imported here, before the thread, because booting the ephemeral
    # server imports it (fastapi, sqlalchemy, alembic) and mlflow shares those dependencies.
    import prefect.server.api.server  # noqa: F401

    _thread = threading.Thread(target=_import_all, daemon=True, name="warm-imports")
    _thread.start()


def wait() -> None:
    if _thread is not None:
        _thread.join()


def import_before_threads() -> None:
    """Once a run will train: every heavy module, in this thread, before the stages that run in threads (data
    versioning beside init and training) import anything. Already imported (warmed, or an earlier flow of a
    served process): nothing to do."""
    wait()
    _import_all()


def _import_all() -> None:
    for name in HEAVY_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # the stage that needs it reports the problem properly
            return
