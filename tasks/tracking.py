"""MLflow tracking: one run per retrain with its params, metrics, artifacts, dataset digest and system metrics."""

from __future__ import annotations

import itertools
import os
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from adapterflow.redact import redact_text, redact_uri, redact_values
from adapterflow.tasks.config import flatten
from adapterflow.tasks.outages import OUTAGES, every, mlflow_answers
from adapterflow.tasks.outbox import Outbox, apply, artifact_op, dataset_op, metrics_op, tag_op, terminate_op

MAX_PARAMS_PER_BATCH = 100
# MLflow writes "View run ... at: <tracking URI>" to stdout whenever a run on a server ends: the URI with its
# credentials, in the middle of the CLI's output. The run summary names the server's UI instead, without them.
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


@dataclass(frozen=True)
class RunRef:
    """The tracking run a retrain logs into; small enough to hand to every stage."""

    uri: str
    run_id: str
    # The run folder whose outbox keeps what the server could not take (tasks/outbox.py); None: write or raise.
    run_dir: str | None = None
    started_ms: int = 0  # the MLflow run's start time

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def service(self) -> str:
        return f"MLflow at {redact_uri(self.uri)}"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def open_run(config, uri: str, artifacts_root: Path, validation_files: dict, base_ref, run_dir: Path | None = None,
             extra_tags: dict[str, str] | None = None) -> RunRef:
    """Create the run with params, the resolved config and the validation report."""
    mlflow_client = client(uri)
    # A server stores artifacts in its own artifact store (S3, ...): a local folder would stay on this machine.
    local_root = None if is_server(uri) else artifacts_root
    experiment_id = _experiment_id(mlflow_client, config.experiment_name(), local_root)
    tags = {
        "adapterflow.config_hash": config.digest(), "adapterflow.base_model": base_ref.identity,
        "mlflow.source.git.commit": git_commit(), **(extra_tags or {}),
    }
    run = mlflow_client.create_run(experiment_id, run_name=f"{config.name}-{config.adapter.init.method}", tags=tags)
    run_id = run.info.run_id
    # Params and the resolved config are stored for anyone who can read the experiment: no credentials.
    _log_params(mlflow_client, run_id, {key: redact_text(value) for key, value in flatten(config).items()})
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.resolved.yaml"
        resolved.write_text(yaml.safe_dump(public_config(config), sort_keys=False))
        mlflow_client.log_artifact(run_id, str(resolved))
    for path in validation_files.values():
        mlflow_client.log_artifact(run_id, str(path), "validation")
    return RunRef(uri, run_id, str(run_dir) if run_dir else None, run.info.start_time)


def public_config(config) -> dict:
    """The config as JSON with every credential masked: what leaves the process (the resolved-config artifact,
    the training job file, printed lineage) is this, never `model_dump` itself."""
    return redact_values(config.model_dump(mode="json"))


def log_data_version(config, run: RunRef, data_version) -> None:
    """The DVC md5 as a run tag, the .dvc file that pins the data, and the dataset input."""
    deliver(run, [tag_op("adapterflow.data_md5", data_version.digest), artifact_op(data_version.dvc_file, "data"),
                  _dataset_op(config, data_version)])


def _experiment_id(mlflow_client, name: str, artifacts_root: Path) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (artifacts_root / name).as_uri() if artifacts_root else None
    return mlflow_client.create_experiment(name, artifact_location=location)


def _log_params(mlflow_client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])


def _dataset_op(config, data_version) -> dict:
    """The train split as an MLflow dataset input whose digest is its DVC md5."""
    import mlflow.data

    from adapterflow.tasks.data_io import read_split

    frame = read_split(data_version.paths["train"], "train")
    dataset = mlflow.data.from_pandas(
        frame, source=data_version.paths["train"], name=f"{config.name}-train", digest=data_version.files["train"]
    )._to_mlflow_entity()
    fields = {k: getattr(dataset, k) for k in ("name", "digest", "source_type", "source", "schema", "profile")}
    return dataset_op(fields, {"mlflow.data.context": "training", "dvc.md5.snapshot": data_version.digest})


def log_metrics(run: RunRef, metrics: dict[str, float], prefix: str = "") -> None:
    deliver(run, [metrics_op({prefix + k: v for k, v in metrics.items()}, int(time.time() * 1000))])


def log_files(run: RunRef, paths, folder: str | None = None) -> None:
    deliver(run, [artifact_op(path, folder) for path in paths])


def deliver(run: RunRef, ops: list[dict]) -> None:
    """Applies the writes now; a run with a folder keeps them in its outbox while its server does not answer,
    after what is already waiting there (the order MLflow sees is the order the run wrote in)."""
    if run.run_dir is None or not is_server(run.uri):
        for op in ops:
            apply(client(run.uri), run.run_id, op)
        return
    with _OUTBOX_LOCK:  # the flow's threads (versioning, system metrics) write beside its stages
        Outbox(run.run_dir).add(ops)
        flush_outbox(run)


_OUTBOX_LOCK = threading.RLock()


def flush_outbox(run: RunRef) -> bool:
    """True when nothing waits in the run's outbox any more; an outage is reported once, not raised."""
    with _OUTBOX_LOCK:
        return _flush(run)


def _flush(run: RunRef) -> bool:
    outbox = Outbox(run.run_dir)
    if not outbox.pending():
        return True
    if mlflow_answers(run.uri):
        try:
            outbox.replay(client(run.uri), run.run_id)
            OUTAGES.up(run.service())
            return True
        except Exception:
            if mlflow_answers(run.uri):
                raise  # the server answers and refused: a real error, not an outage
    OUTAGES.down(run.service(), f"the run goes on; what it logs waits in {outbox.path}")
    return False


@contextmanager
def system_metrics(run: RunRef, interval_seconds: float):
    """CPU, memory, disk, network (and GPU) every `interval_seconds` as system/* metrics, from a thread.

    MLflow's collectors, not its monitor thread: that one asks the server for the run's status on every
    sample, retrying a dead server for minutes, and the flow would wait on it at the end of the run.
    These samples go through `deliver`, so an outage keeps them in the run's outbox.
    """
    if not interval_seconds:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    collectors = SystemMetricsMonitor(run.run_id, sampling_interval=interval_seconds, tracking_uri=run.uri)
    steps = itertools.count()

    def sample() -> None:
        collectors.collect_metrics()
        metrics = collectors.aggregate_metrics()
        for monitor in collectors.monitors:
            monitor.clear_metrics()
        try:
            deliver(run, [metrics_op({"system/" + k: v for k, v in metrics.items()}, int(time.time() * 1000), next(steps))])
        except Exception:  # a refused write of a sample is not worth a run; the next sample tries again
            pass

    with every(interval_seconds, sample, "adapterflow-system-metrics"):
        yield


def end_run(run: RunRef, status: str) -> None:
    deliver(run, [terminate_op(status)])


def git_commit() -> str:
    """The commit of the project the run was started from, '+dirty' when it has local changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))

