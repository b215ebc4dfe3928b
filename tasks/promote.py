"""Champion/challenger: move `production` to the `staging` version only when it is better, measured now.

Both adapters are re-evaluated on the same frozen split (the staging run's evaluation file, checked
against the md5 recorded at registration), never compared by logged numbers. MLflow keeps no
history of alias moves, so every promotion, refusal and rollback is written as a tag on the
versions involved, and the production history (for rollback) as a tag on the registered model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from adapterflow.errors import RegistryError

EVENT_PREFIX = "adapterflow.event."
HISTORY_TAG = "adapterflow.production_history"


@dataclass(frozen=True)
class Decision:
    promoted: bool
    candidate: str
    incumbent: str | None  # None: compared with the bare base model
    metric: str
    candidate_value: float
    incumbent_value: float
    reason: str
    forgetting: dict | None = None
    tie_break: dict | None = None  # intruder dimensions of both, when the metric tied


def promote(name: str, uri: str, lock_dir: Path, staging: str = "staging", production: str = "production") -> Decision:
    """Evaluate staging vs production (or the bare base) and move production when the gate passes."""
    from adapterflow.tasks.track import check_reachable, client

    check_reachable(uri)
    mlflow_client = client(uri)
    with promotion_lock(lock_dir, uri, name):
        model = _registered_model(mlflow_client, name)
        candidate = _alias_version(mlflow_client, name, staging, model)
        config = version_config(mlflow_client, candidate)
        incumbent = aliases_of(model).get(production)
        if incumbent == candidate.version:
            raise RegistryError(f"{name} version {candidate.version} is already @{production}; nothing to promote.")
        decision = _judge(mlflow_client, name, config, candidate, incumbent)
        if decision.promoted:
            _move_production(mlflow_client, name, production, candidate.version, incumbent)
        _record(mlflow_client, name, "promoted" if decision.promoted else "refused", decision, [candidate.version, incumbent])
        return decision


def rollback(name: str, uri: str, lock_dir: Path, production: str = "production") -> tuple[str, str]:
    """Point production back at the version it held before; returns (from, to)."""
    from adapterflow.tasks.track import check_reachable, client

    check_reachable(uri)
    mlflow_client = client(uri)
    with promotion_lock(lock_dir, uri, name):
        model = _registered_model(mlflow_client, name)
        current = aliases_of(model).get(production)
        history = json.loads(model.tags.get(HISTORY_TAG, "[]"))
        if current is None:
            raise RegistryError(f"{name} has no @{production} version; there is nothing to roll back.")
        if not history:
            raise RegistryError(f"{name} @{production} (version {current}) has no previous production version to roll back to.")
        previous = history[-1]
        _adapter_dir(mlflow_client, name, previous, Path(tempfile.mkdtemp()))  # refuse a version whose adapter is gone
        mlflow_client.set_registered_model_alias(name, production, previous)
        mlflow_client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
        event = {"action": "rollback", "from": current, "to": previous, "reason": "adapterflow rollback"}
        _tag_event(mlflow_client, name, event, [current, previous])
        return current, previous


def status(name: str, uri: str) -> dict:
    """Aliases, versions with their metric tags, and the promotion history, oldest first."""
    from adapterflow.tasks.track import check_reachable, client

    check_reachable(uri)
    mlflow_client = client(uri)
    model = _registered_model(mlflow_client, name)
    versions = sorted(mlflow_client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    events = {}
    for version in versions:
        for key, value in version.tags.items():
            if key.startswith(EVENT_PREFIX):
                events[key] = json.loads(value)
    return {
        "aliases": aliases_of(model),
        "versions": [{"version": v.version, "tags": {k: t for k, t in v.tags.items() if not k.startswith(EVENT_PREFIX)}} for v in versions],
        "history": [events[k] for k in sorted(events)],
    }


def lineage(name: str, version: str, uri: str) -> dict:
    """Where a version came from: data, code, config, init, metrics, and the comparisons it went through."""
    from adapterflow.tasks.track import check_reachable, client

    check_reachable(uri)
    mlflow_client = client(uri)
    _registered_model(mlflow_client, name)
    try:
        record = mlflow_client.get_model_version(name, version)
    except Exception:
        raise RegistryError(f"{name} has no version {version}; see adapterflow status {name}.") from None
    config = version_config(mlflow_client, record)
    tags = record.tags
    run = mlflow_client.get_run(record.run_id)
    return {
        "version": record.version, "run_id": record.run_id, "experiment_id": run.info.experiment_id,
        "data_md5": tags.get("data_md5"), "data_files": {k.removeprefix("data.").removesuffix("_md5"): v for k, v in tags.items() if k.startswith("data.")},
        "data_paths": {split: getattr(config.data, split) for split in ("train", "validation", "test") if getattr(config.data, split)},
        "git_commit": tags.get("git_commit"), "config_hash": tags.get("config_hash"), "base_model": tags.get("base_model"),
        "init_method": tags.get("init_method"), "config": config.model_dump(mode="json"),
        "metrics": {k.removeprefix("metric."): v for k, v in tags.items() if k.startswith("metric.")},
        "comparisons": sorted((json.loads(v) for k, v in tags.items() if k.startswith(EVENT_PREFIX)), key=lambda e: e["when"]),
    }


def unchanged_version(config, uri: str) -> tuple[str, str] | None:
    """(alias, version) of a staging/production version trained on this exact config and data, if any."""
    from mlflow.exceptions import MlflowException

    from adapterflow.tasks.data_io import split_files
    from adapterflow.digests import file_md5
    from adapterflow.tasks.track import client

    mlflow_client, registry = client(uri), config.registry
    try:
        model = mlflow_client.get_registered_model(registry.model_name)
    except MlflowException:
        return None
    wanted = {"config_hash": config.digest(), **{f"data.{s}_md5": file_md5(Path(p)) for s, p in split_files(config.data).items()}}
    for alias in (registry.production_alias, registry.staging_alias):
        version = aliases_of(model).get(alias)
        if version and all(mlflow_client.get_model_version(registry.model_name, version).tags.get(k) == v for k, v in wanted.items()):
            return alias, version
    return None


@contextmanager
def promotion_lock(lock_dir: Path, uri: str, name: str):
    """One promotion per model at a time: a second one fails at once with a clear message."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"promote-{hashlib.sha256(f'{uri}|{name}'.encode()).hexdigest()[:16]}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RegistryError(f"another promotion or rollback of {name} is in progress; run it again when that one has finished.") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _registered_model(mlflow_client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in mlflow_client.search_registered_models())
        raise RegistryError(f"no registered model named {name!r}; registered models: {', '.join(known) or 'none'}.") from None


def _alias_version(mlflow_client, name: str, alias: str, model):
    if alias not in model.aliases:
        raise RegistryError(f"{name} has no version with alias @{alias}; run a retrain first (adapterflow run CONFIG).")
    version = mlflow_client.get_model_version(name, aliases_of(model)[alias])
    if version.tags.get("adapterflow.registration") == "incomplete":
        raise RegistryError(
            f"{name} version {version.version} (@{alias}) never finished registering; it cannot be promoted. "
            f"Point @{alias} back at a complete version or rerun the retrain."
        )
    return version


def aliases_of(model) -> dict[str, str]:
    """Alias → version as a string (MLflow returns ints here but strings for ModelVersion.version)."""
    return {alias: str(version) for alias, version in model.aliases.items()}


def version_config(mlflow_client, version):
    """The resolved run config a version was trained with (logged with its run)."""
    import yaml

    from adapterflow.tasks.config import RunConfig

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow_client.download_artifacts(version.run_id, "config.resolved.yaml", tmp)
        return RunConfig.model_validate(yaml.safe_load(Path(path).read_text()))


def _adapter_dir(mlflow_client, name: str, version: str, folder: Path) -> Path:
    import mlflow

    try:
        # The version's own storage URI: a "models:/name/version" URI would be resolved against
        # mlflow's process-wide registry URI, which may name another registry.
        source = mlflow_client.get_model_version_download_uri(name, version)
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(folder), tracking_uri=mlflow_client.tracking_uri))
    except Exception as err:
        raise RegistryError(f"{name} version {version}: its adapter cannot be read ({str(err).splitlines()[0]}); it cannot serve as production.") from None
    adapter = root / "artifacts" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise RegistryError(f"{name} version {version} has no adapter files; it cannot serve as production.")
    return adapter


def _judge(mlflow_client, name: str, config, candidate, incumbent: str | None) -> Decision:
    from adapterflow.tasks.model_io import resolve_base

    gate = config.promotion
    _check_frozen_split(config, candidate)
    base_ref = resolve_base(config.model)
    with tempfile.TemporaryDirectory() as tmp:
        challenger = _adapter_dir(mlflow_client, name, candidate.version, Path(tmp) / "candidate")
        champion = _adapter_dir(mlflow_client, name, incumbent, Path(tmp) / "incumbent") if incumbent else None
        ours, theirs = _scores(config, base_ref, challenger, champion, config.evaluate.split)
        forgetting = _forgetting(config, base_ref, challenger, champion) if gate.forgetting else None
        metric = config.gate_metric()
        improvement = oriented(metric, ours[metric] - theirs[metric])
        tie = _intruder_tie_break(config, base_ref, challenger, champion, improvement) if champion else None
    promoted, reason = _verdict(config, improvement, ours[metric], theirs[metric], incumbent, forgetting, tie)
    return Decision(promoted, candidate.version, incumbent, metric, ours[metric], theirs[metric], reason, forgetting, tie)


def _verdict(config, improvement: float, ours: float, theirs: float, incumbent, forgetting, tie) -> tuple[bool, str]:
    gate, metric = config.promotion, config.gate_metric()
    against = f"version {incumbent}" if incumbent else "the base model without adapter"
    if incumbent is None and improvement <= 0:
        return False, f"{metric} {ours:.4f} does not beat {against} ({theirs:.4f})"
    if forgetting and forgetting["drop"] > gate.forgetting.tolerance:
        return False, f"forgetting set: {metric} drops by {forgetting['drop']:.4f} vs {against}, more than tolerance {gate.forgetting.tolerance}"
    if tie is not None:
        fewer = tie["candidate"] < tie["incumbent"]
        return fewer, (
            f"{metric} {ours:.4f} vs {theirs:.4f} ({against}) is a tie (within promotion.tie_margin {gate.tie_margin}); "
            f"intruder dimensions {tie['candidate']} vs {tie['incumbent']}: {'fewer, promoted' if fewer else 'not fewer, production stays'}"
        )
    if improvement < gate.min_improvement:
        return False, f"{metric} improves by {improvement:+.4f} over {against}, less than promotion.min_improvement {gate.min_improvement}"
    return True, f"{metric} {ours:.4f} vs {theirs:.4f} ({against}): improvement {improvement:+.4f} >= {gate.min_improvement}"


def _intruder_tie_break(config, base_ref, challenger: Path, champion: Path, improvement: float) -> dict | None:
    """On a metric tie, count both adapters' intruder dimensions now (the incumbent may predate the report)."""
    gate = config.promotion
    if gate.tie_breaker != "intruder_dimensions" or abs(improvement) > gate.tie_margin:
        return None
    from adapterflow.tasks.spectral_report import intruders_total

    return {"candidate": intruders_total(config, base_ref, challenger), "incumbent": intruders_total(config, base_ref, champion)}


def oriented(metric: str, difference: float) -> float:
    from adapterflow.tasks.config import LOWER_IS_BETTER

    return -difference if metric in LOWER_IS_BETTER else difference


def _scores(config, base_ref, challenger: Path, champion: Path | None, split: str) -> tuple[dict, dict]:
    from adapterflow.tasks.evaluate import evaluate_adapter

    return evaluate_adapter(config, base_ref, challenger, split), evaluate_adapter(config, base_ref, champion, split)


def _forgetting(config, base_ref, challenger: Path, champion: Path | None) -> dict:
    """Both adapters on the forgetting file, evaluated as if it were the test split."""
    check = config.promotion.forgetting
    probe = config.model_copy(update={"data": config.data.model_copy(update={"test": check.file})})
    ours, theirs = _scores(probe, base_ref, challenger, champion, "test")
    metric = config.gate_metric()
    return {"file": check.file, "candidate": ours[metric], "incumbent": theirs[metric], "drop": -oriented(metric, ours[metric] - theirs[metric])}


def _check_frozen_split(config, candidate) -> None:
    from adapterflow.digests import file_md5

    split = config.evaluate.split
    recorded = candidate.tags.get(f"data.{split}_md5")
    path = Path(getattr(config.data, split))
    if not path.is_file():
        raise RegistryError(f"the evaluation split of version {candidate.version} is gone: {path}. Restore it (dvc pull) and promote again.")
    if recorded and file_md5(path) != recorded:
        raise RegistryError(
            f"the evaluation split {path} changed since version {candidate.version} was registered (md5 {recorded}); "
            "the comparison would not be on the frozen split. Restore it (dvc checkout) or retrain."
        )


def _move_production(mlflow_client, name: str, alias: str, version: str, expected: str | None) -> None:
    """Move the alias only if production is still what was evaluated against."""
    model = mlflow_client.get_registered_model(name)
    current = aliases_of(model).get(alias)
    if current != expected:
        raise RegistryError(f"@{alias} of {name} moved to version {current} during this promotion; promote again.")
    if expected is not None:
        history = json.loads(model.tags.get(HISTORY_TAG, "[]")) + [expected]
        mlflow_client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    mlflow_client.set_registered_model_alias(name, alias, version)


def _record(mlflow_client, name: str, action: str, decision: Decision, versions: list) -> None:
    event = {
        "action": action, "from": decision.incumbent, "to": decision.candidate, "metric": decision.metric,
        "candidate": decision.candidate_value, "incumbent": decision.incumbent_value, "reason": decision.reason,
    }
    if decision.forgetting:
        event["forgetting"] = decision.forgetting
    if decision.tie_break:
        event["intruder_dimensions"] = decision.tie_break
    _tag_event(mlflow_client, name, event, versions)


def _tag_event(mlflow_client, name: str, event: dict, versions: list) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"
    event["when"] = stamp
    for version in {v for v in versions if v is not None}:
        mlflow_client.set_model_version_tag(name, version, EVENT_PREFIX + stamp, json.dumps(event))
