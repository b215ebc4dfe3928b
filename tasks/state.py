"""Where run state lives (one git-ignored folder) and the environment every process needs.

`ADAPTERFLOW_HOME` overrides the folder; by default it is `.adapterflow/` under the current
directory, so nothing lands in `$HOME`.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from adapterflow.errors import ConfigError

QUIET_ENV = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    # A cold ephemeral Prefect start took 13-17 s on 2 cores; the default 20 s is too tight.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # transformers' "Writing model shards" bar at every adapter save broke the run's own progress lines;
    # `adapterflow run --verbose` keeps the libraries' bars (it sets this to 0 first).
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "GIT_PYTHON_REFRESH": "quiet",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "ERROR",
}


@dataclass(frozen=True)
class StateDirs:
    root: Path

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow" / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlflow" / "artifacts"

    @property
    def dvc_repo(self) -> Path:
        return self.root / "dvc" / "repo"

    @property
    def dvc_remote(self) -> Path:
        return self.root / "dvc" / "remote"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def init_cache(self) -> Path:
        return self.root / "cache" / "init"

    def default_mlflow_uri(self) -> str:
        """The user's MLFLOW_TRACKING_URI (as MLflow's own tools read it), else the local SQLite store."""
        return USER_MLFLOW_URI or f"sqlite:///{self.mlflow_db}"


# Read once, at import: mlflow.set_tracking_uri() writes this variable, so a later read in the same
# process would see the URI of whichever run registered last, not the user's choice.
USER_MLFLOW_URI = os.environ.get("MLFLOW_TRACKING_URI")


def state_dirs() -> StateDirs:
    root = Path(os.environ.get("ADAPTERFLOW_HOME", Path.cwd() / ".adapterflow")).resolve()
    return StateDirs(root)


class StateFolderError(ConfigError):
    """The state folder (ADAPTERFLOW_HOME) cannot hold a run: not a folder, not writable, or its disk is full."""


# A run writes model caches, checkpoints, MLflow artifacts and a DVC snapshot; below this it would fail midway.
MIN_FREE_GB_DEFAULT = 1.0
MIN_FREE_ENV = "ADAPTERFLOW_MIN_FREE_GB"


def min_free_bytes() -> int:
    """The free space a run needs in the state folder: ADAPTERFLOW_MIN_FREE_GB, else 1 GiB."""
    text = os.environ.get(MIN_FREE_ENV)
    try:
        gigabytes = float(text) if text else MIN_FREE_GB_DEFAULT
    except ValueError:
        raise StateFolderError(f"{MIN_FREE_ENV}={text!r} is not a number of GiB; set it to e.g. 0.5, or unset it for 1.") from None
    return int(max(gigabytes, 0.0) * 2**30)


def check_state_folder(dirs: StateDirs | None = None, free_bytes: int | None = None) -> StateDirs:
    """The state folder can hold a run: it is (or can be created as) a folder, it and its subfolders are
    writable, and its disk has `free_bytes` free (default `min_free_bytes()`; 0 checks writability only).

    Creates nothing: the check probes with a temporary file that it removes, in the folder or, before the
    first run, in the nearest folder above it that exists. One StateFolderError names the folder and the fix.
    """
    dirs = dirs or state_dirs()
    root = dirs.root
    needed = min_free_bytes() if free_bytes is None else free_bytes
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = f"the state folder {root} is" if existing == root else f"the state folder {root} cannot be created: {existing} is"
        raise StateFolderError(f"{what} a file, not a folder. Point ADAPTERFLOW_HOME at a folder (or move {existing} away).")
    folders = [existing] if existing != root else [root, *(f for f in _subfolders(dirs) if f.is_dir())]
    for folder in folders:
        _probe_write(root, folder)
    if needed:
        free = min(shutil.disk_usage(folder).free for folder in folders)
        if free < needed:
            raise StateFolderError(
                f"the state folder {root} has {free / 2**30:.2f} GiB free; a run needs at least {needed / 2**30:.2f} GiB "
                f"(model caches, checkpoints, MLflow artifacts, the DVC snapshot). Free space on that disk or point "
                f"ADAPTERFLOW_HOME at a folder on a disk with room ({MIN_FREE_ENV} sets the threshold)."
            )
    return dirs


def _subfolders(dirs: StateDirs) -> list[Path]:
    """The state folder's own subfolders a run writes to: any of them may have been made read-only on its own."""
    return [dirs.prefect_home, dirs.mlflow_db.parent, dirs.mlflow_artifacts, dirs.dvc_repo.parent, dirs.runs,
            dirs.init_cache, dirs.root / "locks", dirs.root / "logs", dirs.root / "hf"]


def _probe_write(root: Path, folder: Path) -> None:
    try:
        handle, probe = tempfile.mkstemp(prefix=".adapterflow-write-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        where = "" if folder == root else f" ({folder})"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "Free space on that disk (or raise your quota)"
        elif err.errno == errno.EROFS:
            fix = "It is on a read-only file system: remount it read-write"
        else:
            fix = f"Make it writable by this user (check its owner and mode, e.g. chmod -R u+w {folder})"
        raise StateFolderError(
            f"the state folder {root} is not writable{where}: {err.strerror or err}. "
            f"{fix}, or point ADAPTERFLOW_HOME at a writable folder."
        ) from None


def prepare_environment(offline: bool | None = None) -> StateDirs:
    """Point every library's home into the state folder; call before importing prefect/mlflow/HF."""
    dirs = state_dirs()
    dirs.root.mkdir(parents=True, exist_ok=True)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    homes = {
        "PREFECT_HOME": dirs.prefect_home,
        "HF_HOME": dirs.root / "hf",
        "MPLCONFIGDIR": dirs.root / "matplotlib",
        "TORCHINDUCTOR_CACHE_DIR": dirs.root / "torchinductor",
        "TRITON_CACHE_DIR": dirs.root / "triton",
    }
    for key, path in homes.items():
        os.environ.setdefault(key, str(path))
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return dirs


def quiet_library_noise() -> None:
    """Library deprecations and notices are for us, not for the person running a retrain."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*dataset source can be interpreted in multiple ways.*")
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    logging.getLogger("mlflow").setLevel(logging.ERROR)  # registration is reported in our summary
    # Prefect routes Python warnings to the console from worker threads; library deprecations
    # are for us, not for the person running a retrain.
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    # Their "websocket failed ... switching to polling" is a Prefect API outage, which the run reports itself in
    # one line when it starts and one when it ends (tasks/outages.py); polling keeps cancellation working.
    for observer in ("prefect.FlowRunCancellingObserver", "prefect.FlowRunSuspendingObserver"):
        logging.getLogger(observer).setLevel(logging.ERROR)
    _quiet_prefect_polling_printouts()


def _quiet_prefect_polling_printouts() -> None:
    """When those observers' polling fails three times running (the API away for a while), Prefect's service loop
    prints the tracebacks to stdout (its `printer` is `print`, not a logger), into a served run's output. The outage
    is reported in one line (tasks/outages.py) and the observer logs its one-line error; the printout goes to a DEBUG
    logger. Prefect 3.8's module layout: another one leaves the printout as it is. Only where Prefect is loaded (the
    flow's commands): a registry command would import it (1.2 s) for nothing."""
    import logging
    import sys

    if "prefect" not in sys.modules:
        return
    try:
        from prefect._internal import _observation_delivery as delivery
    except ImportError:
        return
    loop = getattr(delivery, "critical_service_loop", None)
    if loop is None or getattr(loop, "printer_is_a_logger", False):
        return
    logger = logging.getLogger("prefect.utilities.services")

    def printing_to_a_logger(*args, **kwargs):
        kwargs.setdefault("printer", lambda *parts: logger.debug(" ".join(map(str, parts))))
        return loop(*args, **kwargs)

    printing_to_a_logger.printer_is_a_logger = True
    delivery.critical_service_loop = printing_to_a_logger


BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


class _MissingKernelsNotice:
    """bitsandbytes (0.50.2) logs at import, on AVX512-BF16 CPUs, that the optional `kernels` package is absent;
    its own fused CPU kernel is used instead. Exactly that record is dropped: any other failure still shows."""

    def filter(self, record) -> bool:
        return not (
            str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
            and any("No module named 'kernels'" in str(arg) for arg in (record.args or ()))
        )


def _drop_missing_kernels_notice() -> None:
    import logging

    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _MissingKernelsNotice) for f in logger.filters):
        logger.addFilter(_MissingKernelsNotice())


# At import, not in quiet_library_noise: the CLI's warm-up thread and the training worker's own imports load
# bitsandbytes before either calls it, and every entry point imports this module first.
_drop_missing_kernels_notice()
