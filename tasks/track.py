"""MLflow: one run per retrain (params, metrics, artifacts, dataset digest) and the registered version."""

from __future__ import annotations

import os
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from adapterflow.tasks.config import flatten
from adapterflow.errors import RegistryError

MAX_PARAMS_PER_BATCH = 100


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def open_run(config, uri: str, artifacts_root: Path, validation_files: dict, base_ref) -> str:
    """Create the run with params, the resolved config and the validation report."""
    mlflow_client = client(uri)
    # A server stores artifacts in its own artifact store (S3, ...): a local folder would stay on this machine.
    local_root = None if is_server(uri) else artifacts_root
    experiment_id = _experiment_id(mlflow_client, config.experiment_name(), local_root)
    tags = {"adapterflow.config_hash": config.digest(), "adapterflow.base_model": base_ref.identity, "mlflow.source.git.commit": git_commit()}
    run = mlflow_client.create_run(experiment_id, run_name=f"{config.name}-{config.adapter.init.method}", tags=tags)
    run_id = run.info.run_id
    _log_params(mlflow_client, run_id, flatten(config))
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.resolved.yaml"
        resolved.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        mlflow_client.log_artifact(run_id, str(resolved))
    for path in validation_files.values():
        mlflow_client.log_artifact(run_id, str(path), "validation")
    return run_id


def log_data_version(config, uri: str, run_id: str, data_version) -> None:
    """The DVC md5 as a run tag, the .dvc file that pins the data, and the dataset input."""
    mlflow_client = client(uri)
    mlflow_client.set_tag(run_id, "adapterflow.data_md5", data_version.digest)
    mlflow_client.log_artifact(run_id, data_version.dvc_file, "data")
    _log_dataset(mlflow_client, run_id, config, data_version)


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


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], prefix: str = "") -> None:
    from mlflow.entities import Metric
    import time

    stamp = int(time.time() * 1000)
    client(uri).log_batch(run_id, metrics=[Metric(prefix + k, float(v), stamp, 0) for k, v in metrics.items()])


def log_file(uri: str, run_id: str, path: Path, folder: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), folder)


@contextmanager
def system_metrics(uri: str, run_id: str, interval_seconds: float):
    """MLflow's own system-metrics sampler on a thread, into the run the flow owns."""
    if not interval_seconds:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_seconds, samples_before_logging=1, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def end_run(uri: str, run_id: str, status: str) -> None:
    client(uri).set_terminated(run_id, status)


REGISTRATION_TAG = "adapterflow.registration"


def register_adapter(config, uri: str, run_id: str, adapter_dir: Path, base_ref, tags: dict[str, str], description: str = "") -> str:
    """Log the adapter as a pyfunc model of this run, register it with its tags, point `staging` at it.

    Moving the alias is the last step: a crash anywhere before it leaves the alias where it was,
    and the half-registered version keeps the tag `adapterflow.registration: incomplete`.
    """
    # MLflow's SQL registry looks the logged model up through the process-wide URI, so it is set
    # for the whole registration, then put back.
    with _fluent_tracking_uri(uri):
        return _register(config, uri, run_id, adapter_dir, base_ref, tags, description)


def _register(config, uri: str, run_id: str, adapter_dir: Path, base_ref, tags: dict[str, str], description: str) -> str:
    import mlflow

    from adapterflow.tasks.pyfunc_adapter import LoraAdapterModel

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="adapter", python_model=LoraAdapterModel(), artifacts={"adapter": str(adapter_dir)},
            model_config=_pyfunc_config(config, base_ref), pip_requirements=_requirements(),
        )
    mlflow_client = client(uri)
    name = config.registry.model_name
    _describe_registered_model(mlflow_client, name, config, base_ref)
    # Tags go in with the version itself, so a version never exists without its lineage.
    version = mlflow_client.create_model_version(
        name, info.model_uri, run_id=run_id, tags={**tags, REGISTRATION_TAG: "incomplete"}, model_id=info.model_id,
        description=description or None,
    )
    _wait_until_ready(mlflow_client, name, version.version)
    mlflow_client.set_model_version_tag(name, version.version, REGISTRATION_TAG, "complete")
    mlflow_client.set_registered_model_alias(name, config.registry.staging_alias, version.version)
    return str(version.version)


@contextmanager
def _fluent_tracking_uri(uri: str):
    """log_model exists only in MLflow's fluent API, whose URI is process-wide and is also written to
    MLFLOW_TRACKING_URI (inherited by later subprocesses). MLflow's own `_use_tracking_uri` puts both
    back exactly as they were (unset stays unset); private, but public set_tracking_uri cannot unset."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


def _wait_until_ready(mlflow_client, name: str, version: str, timeout: float = 300.0) -> None:
    """A server may copy artifacts asynchronously: the alias must never name a version still copying."""
    import time

    deadline = time.monotonic() + timeout
    while (status := mlflow_client.get_model_version(name, version).status) == "PENDING_REGISTRATION":
        if time.monotonic() > deadline:
            raise RegistryError(f"{name} version {version} is still pending registration after {timeout:.0f} s; no alias was moved.")
        time.sleep(1.0)
    if status != "READY":
        raise RegistryError(f"{name} version {version} failed registration (status {status}); no alias was moved.")


def _describe_registered_model(mlflow_client, name: str, config, base_ref) -> None:
    """Create the model if needed; its description and tags follow the latest config."""
    from mlflow.exceptions import MlflowException

    description = registered_model_description(config, base_ref)
    try:
        mlflow_client.get_registered_model(name)
        mlflow_client.update_registered_model(name, description=description)
    except MlflowException:
        mlflow_client.create_registered_model(name, description=description)
    model_tags = {"task": config.task, "base_model": base_label(config, base_ref), "gate_metric": config.gate_metric()}
    if config.data.labels:
        model_tags["labels"] = ", ".join(config.data.labels)
    for key, value in model_tags.items():
        mlflow_client.set_registered_model_tag(name, key, value)


def base_label(config, base_ref) -> str:
    """A name that means something on another machine: the bundled name, the hub id, else the content hash."""
    if config.model.bundled:
        return f"bundled:{config.model.bundled}"
    return f"{config.model.hub_id}@{base_ref.revision}" if config.model.hub_id else base_ref.identity


def registered_model_description(config, base_ref) -> str:
    labels = f" over the labels {', '.join(config.data.labels)}" if config.data.labels else ""
    return (
        f"LoRA adapters for {config.task}{labels} on the base model `{base_label(config, base_ref)}`, retrained by the "
        f"adapterflow config `{config.name}`.\n\n"
        f"- `@{config.registry.staging_alias}`: the newest registered version.\n"
        f"- `@{config.registry.production_alias}`: the version serving traffic; it moves only when "
        f"`adapterflow promote {config.registry.model_name}` finds the candidate better on `{config.gate_metric()}` "
        f"(re-evaluated on the same frozen split).\n"
        f"- Each version's tags give its data md5 (DVC), git commit, init method and metrics; "
        f"`adapterflow lineage {config.registry.model_name} VERSION` prints them.\n\n"
        f"Load a version with plain peft: download its `adapter` artifact folder and call "
        f"`PeftModel.from_pretrained(base_model, folder)`, or `mlflow.pyfunc.load_model('models:/{config.registry.model_name}@{config.registry.production_alias}')`."
    )


def _pyfunc_config(config, base_ref) -> dict:
    return {
        "task": config.task, "labels": config.data.labels, "max_length": config.data.max_length,
        "source": base_ref.source, "bundled": config.model.bundled, "name_or_path": base_ref.name_or_path,
        "revision": base_ref.revision, "identity": base_ref.identity,
    }


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "transformers", "peft", "mlflow")]


def _check_server_answers(uri: str) -> None:
    """One quick request to the server's /health: MLflow's client would retry a dead server for minutes."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise RegistryError(f"MLflow at {uri} cannot be reached ({reason}). Start it (mlflow server) or fix tracking.mlflow_uri.") from None


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


def check_reachable(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        _check_server_answers(uri)
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as err:  # any transport or database error means: cannot track
        raise RegistryError(f"MLflow at {uri} cannot be reached: {str(err).splitlines()[0]}. Start it or fix tracking.mlflow_uri.") from None


def check_servers(config) -> None:
    """Every server the run will talk to answers, before any training: Prefect API, S3 endpoint of the DVC remote."""
    prefect_api = os.environ.get("PREFECT_API_URL")
    if prefect_api:
        _check_answers(prefect_api.rstrip("/") + "/health", f"the Prefect API at {prefect_api} (PREFECT_API_URL)",
                       "Start it (prefect server start) or unset PREFECT_API_URL for the embedded one.")
    remote = config.tracking.dvc_remote or ""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if remote.startswith("s3://") and endpoint:
        _check_answers(endpoint, f"the S3 endpoint {endpoint} of tracking.dvc_remote {remote} (AWS_ENDPOINT_URL)",
                       "Start the object store or fix AWS_ENDPOINT_URL.", any_status=True)


def _check_answers(url: str, what: str, fix: str, any_status: bool = False) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=10).close()
    except urllib.error.HTTPError:
        if not any_status:  # an S3 endpoint answers 403 to an unsigned request: it is up
            raise RegistryError(f"{what} answered with an error. {fix}") from None
    except (urllib.error.URLError, OSError) as err:
        raise RegistryError(f"{what} cannot be reached ({getattr(err, 'reason', err)}). {fix}") from None
