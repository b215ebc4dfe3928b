"""Where run state lives (one git-ignored folder) and the environment every process needs.

`ADAPTERFLOW_HOME` overrides the folder; by default it is `.adapterflow/` under the current
directory, so nothing lands in `$HOME`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
