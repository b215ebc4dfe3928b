"""Reading the registry: a model's aliases, versions and history, one version's lineage, the retrain skip check."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from adapterflow.errors import RegistryError
from adapterflow.redact import redact_text
from adapterflow.tasks.registry_tags import INCOMPLETE, VersionTags, read_events, registration_state
from adapterflow.tasks.server_health import check_reachable
from adapterflow.tasks.tracking import client, public_config


@dataclass(frozen=True)
class VersionRecord:
    version: str
    tags: VersionTags
    registration: str | None  # registry_tags.COMPLETE, INCOMPLETE, or None (registered before the tag existed)


@dataclass(frozen=True)
class ModelStatus:
    aliases: Mapping[str, str]
    versions: tuple[VersionRecord, ...]  # oldest first
    history: tuple[dict, ...]  # promotion, refusal and rollback events, oldest first


@dataclass(frozen=True)
class Lineage:
    version: str
    run_id: str
    experiment_id: str
    tags: VersionTags
    data_paths: Mapping[str, str]  # split -> the file the run's config named
    config: dict  # the resolved run config, as JSON, credentials masked (versions logged before redaction too)
    comparisons: tuple[dict, ...]  # the events this version took part in, oldest first


def status(name: str, uri: str) -> ModelStatus:
    """Aliases, versions with their tags, and the promotion history, oldest first."""
    mlflow_client = reachable_client(uri)
    model = registered_model(mlflow_client, name)
    versions = sorted(mlflow_client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    events = {}
    for version in versions:  # one event is tagged on each version it involved: keep it once
        events.update(read_events(version.tags))
    return ModelStatus(
        aliases=aliases_of(model),
        versions=tuple(VersionRecord(v.version, VersionTags.from_tags(v.tags), registration_state(v.tags)) for v in versions),
        history=tuple(events[when] for when in sorted(events)),
    )


def lineage(name: str, version: str, uri: str) -> Lineage:
    """Where a version came from: data, code, config, init, metrics, and the comparisons it went through."""
    mlflow_client = reachable_client(uri)
    registered_model(mlflow_client, name)
    try:
        record = mlflow_client.get_model_version(name, version)
    except Exception:
        raise RegistryError(f"{name} has no version {version}; see adapterflow status {name}.") from None
    config = version_config(mlflow_client, record)
    events = read_events(record.tags)
    return Lineage(
        version=record.version, run_id=record.run_id, experiment_id=mlflow_client.get_run(record.run_id).info.experiment_id,
        tags=VersionTags.from_tags(record.tags),
        data_paths={split: getattr(config.data, split) for split in ("train", "validation", "test") if getattr(config.data, split)},
        config=public_config(config), comparisons=tuple(events[when] for when in sorted(events)),
    )


def unchanged_version(config, uri: str, split_md5s: Mapping[str, str]) -> tuple[str, str] | None:
    """(alias, version) of a production/staging version trained on this exact config and these split files."""
    from mlflow.exceptions import MlflowException

    mlflow_client, registry = client(uri), config.registry
    try:
        model = mlflow_client.get_registered_model(registry.model_name)
    except MlflowException:
        return None
    for alias in (registry.production_alias, registry.staging_alias):
        version = aliases_of(model).get(alias)
        if version and _tags_of(mlflow_client, registry.model_name, version).trained_on(config.digest(), split_md5s):
            return alias, version
    return None


def registered_model(mlflow_client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in mlflow_client.search_registered_models())
        raise RegistryError(f"no registered model named {name!r}; registered models: {', '.join(known) or 'none'}.") from None


def complete_version(mlflow_client, name: str, alias: str, model):
    """The version an alias names, refused if its registration never finished."""
    if alias not in model.aliases:
        raise RegistryError(f"{name} has no version with alias @{alias}; run a retrain first (adapterflow run CONFIG).")
    version = mlflow_client.get_model_version(name, aliases_of(model)[alias])
    if registration_state(version.tags) == INCOMPLETE:
        raise RegistryError(
            f"{name} version {version.version} (@{alias}) never finished registering; it cannot be promoted. "
            f"Point @{alias} back at a complete version or rerun the retrain."
        )
    return version


def aliases_of(model) -> dict[str, str]:
    """Alias → version as a string (MLflow returns ints here but strings for ModelVersion.version)."""
    return {alias: str(version) for alias, version in model.aliases.items()}


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def version_config(mlflow_client, version):
    """The resolved run config a version was trained with (logged with its run)."""
    import yaml

    from adapterflow.tasks.config import RunConfig

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow_client.download_artifacts(version.run_id, "config.resolved.yaml", tmp)
        return RunConfig.model_validate(yaml.safe_load(Path(path).read_text()))


def download_adapter(mlflow_client, name: str, version: str, folder: Path) -> Path:
    """The version's adapter folder, downloaded; refused when its files are gone."""
    import mlflow

    try:
        # The version's own storage URI: a "models:/name/version" URI would be resolved against
        # mlflow's process-wide registry URI, which may name another registry.
        source = mlflow_client.get_model_version_download_uri(name, version)
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(folder), tracking_uri=mlflow_client.tracking_uri))
    except Exception as err:
        reason = redact_text((str(err).splitlines() or [""])[0])  # a server's error names its URL
        raise RegistryError(f"{name} version {version}: its adapter cannot be read ({reason}); it cannot serve as production.") from None
    adapter = root / "artifacts" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise RegistryError(f"{name} version {version} has no adapter files; it cannot serve as production.")
    require_safetensors(adapter, f"{name} version {version}")
    return adapter


def require_safetensors(adapter: Path, what: str) -> None:
    """Weights are read only from safetensors: a pickle-based file (.bin, .pt, .pkl) in a registry folder is refused
    before peft could unpickle it, whoever put it there."""
    pickled = sorted(p.name for p in adapter.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickled or not (adapter / "adapter_model.safetensors").is_file():
        found = f"pickle-based weight files ({', '.join(pickled)})" if pickled else "no adapter_model.safetensors"
        raise RegistryError(f"{what}: its adapter folder holds {found}; adapterflow reads adapter weights only from safetensors. "
                            "Re-register it from a run (adapterflow run) or save it with save_pretrained(safe_serialization=True).")


def reachable_client(uri: str):
    """A client for a tracking store that answers now (MLflow's own client would retry for minutes)."""
    check_reachable(uri)
    return client(uri)


def _tags_of(mlflow_client, name: str, version: str) -> VersionTags:
    return VersionTags.from_tags(mlflow_client.get_model_version(name, version).tags)
