"""MLflow tracking: one run per retrain with its params, metrics, artifacts, dataset digest and system metrics."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from adapterflow.redact import redact_text, redact_values
from adapterflow.tasks.config import flatten

MAX_PARAMS_PER_BATCH = 100
# MLflow writes "View run ... at: <tracking URI>" to stdout whenever a run on a server ends: the URI with its
# credentials, in the middle of the CLI's output. The run summary names the server's UI instead, without them.
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


@dataclass(frozen=True)
class RunRef:
    """The tracking run a retrain logs into; small enough to hand to every stage."""

    uri: str
    run_id: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def open_run(config, uri: str, artifacts_root: Path, validation_files: dict, base_ref) -> RunRef:
    """Create the run with params, the resolved config and the validation report."""
    mlflow_client = client(uri)
    # A server stores artifacts in its own artifact store (S3, ...): a local folder would stay on this machine.
    local_root = None if is_server(uri) else artifacts_root
    experiment_id = _experiment_id(mlflow_client, config.experiment_name(), local_root)
    tags = {
        "adapterflow.config_hash": config.digest(), "adapterflow.base_model": base_ref.identity,
        "mlflow.source.git.commit": git_commit(),
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
    return RunRef(uri, run_id)


def public_config(config) -> dict:
    """The config as JSON with every credential masked: what leaves the process (the resolved-config artifact,
    the training job file, printed lineage) is this, never `model_dump` itself."""
    return redact_values(config.model_dump(mode="json"))


def log_data_version(config, run: RunRef, data_version) -> None:
    """The DVC md5 as a run tag, the .dvc file that pins the data, and the dataset input."""
    mlflow_client = client(run.uri)
    mlflow_client.set_tag(run.run_id, "adapterflow.data_md5", data_version.digest)
    mlflow_client.log_artifact(run.run_id, data_version.dvc_file, "data")
    _log_dataset(mlflow_client, run.run_id, config, data_version)


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


def _log_dataset(mlflow_client, run_id: str, config, data_version) -> None:
    """The train split as an MLflow dataset input whose digest is its DVC md5."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    from adapterflow.tasks.data_io import read_split

    frame = read_split(data_version.paths["train"], "train")
    dataset = mlflow.data.from_pandas(
        frame, source=data_version.paths["train"], name=f"{config.name}-train", digest=data_version.files["train"]
    )
    tags = [InputTag("mlflow.data.context", "training"), InputTag("dvc.md5.snapshot", data_version.digest)]
    mlflow_client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])



def log_metrics(run: RunRef, metrics: dict[str, float], prefix: str = "") -> None:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    client(run.uri).log_batch(run.run_id, metrics=[Metric(prefix + k, float(v), stamp, 0) for k, v in metrics.items()])


def log_files(run: RunRef, paths, folder: str | None = None) -> None:
    mlflow_client = client(run.uri)
    for path in paths:
        mlflow_client.log_artifact(run.run_id, str(path), folder)


@contextmanager
def system_metrics(run: RunRef, interval_seconds: float):
    """MLflow's own system-metrics sampler on a thread, into the run the flow owns."""
    if not interval_seconds:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run.run_id, sampling_interval=interval_seconds, samples_before_logging=1, tracking_uri=run.uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def end_run(run: RunRef, status: str) -> None:
    client(run.uri).set_terminated(run.run_id, status)


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

