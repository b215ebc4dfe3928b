"""The retraining flow: validate → version → initialize → train → evaluate → register (alias staging)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from adapterflow.flows.stages import (
    evaluate_stage, init_stage, merge_choice_stage, open_run_stage, promote_stage, register_stage, spectral_stage, train_stage, validate_stage, version_stage,
)
from adapterflow.tasks.config import load_config
from adapterflow.tasks.data_io import split_files
from adapterflow.tasks.hardware import check_hardware
from adapterflow.digests import file_md5
from adapterflow.tasks.promote import unchanged_version
from adapterflow.tasks.model_io import resolve_base
from adapterflow.tasks.state import quiet_library_noise, state_dirs
from adapterflow.flows import warm
from adapterflow.tasks import track


@flow(name="adapterflow-retrain", log_prints=False, validate_parameters=False)
def retrain(config_path: str, force: bool = False) -> dict:
    """`force` retrains even when staging or production already holds this exact config and data."""
    warm.wait()
    quiet_library_noise()  # again here: a served run executes in its own process
    config = load_config(config_path)
    check_hardware(config)  # again here: a served run skips the CLI's preflight
    dirs = state_dirs()
    uri = config.tracking.mlflow_uri or dirs.default_mlflow_uri()
    track.check_reachable(uri)
    track.check_servers(config)  # again here too, for served runs
    unchanged = None if force else unchanged_version(config, uri)
    if unchanged:
        get_run_logger().info(f"skipped: {config.registry.model_name} version {unchanged[1]} (@{unchanged[0]}) was trained on this exact config and data")
        return {"skipped": True, "name": config.name, "model_name": config.registry.model_name, "alias": unchanged[0], "version": unchanged[1], "tracking_uri": uri}
    run_dir = _new_run_dir(dirs.runs, config.name)
    base_ref = resolve_base(config.model)
    timings: dict[str, float] = {}
    validation = _timed(timings, "validate", validate_stage, config, run_dir)
    # Versioning (DVC add + push) runs beside initialization and training; registration waits for it.
    versioning = version_stage.submit(config, dirs.dvc_repo, dirs.dvc_remote)
    run_id = _timed(timings, "track", open_run_stage, config, uri, dirs.mlflow_artifacts, validation["files"], base_ref)
    try:
        with track.system_metrics(uri, run_id, config.tracking.system_metrics_seconds):
            summary = _train_and_register(config, base_ref, run_dir, dirs.init_cache, uri, run_id, versioning, timings)
        track.log_metrics(uri, run_id, timings, prefix="stage_seconds/")
    except BaseException:
        versioning.wait()
        track.end_run(uri, run_id, "FAILED")
        raise
    track.end_run(uri, run_id, "FINISHED")
    summary.update(validation=validation, run_dir=str(run_dir), tracking_uri=uri, timings=timings)
    create_markdown_artifact(markdown=_summary_markdown(summary), key="retrain-summary", description=config.name)
    return summary


def _timed(timings: dict, name: str, stage, *args):
    start = time.perf_counter()
    result = stage(*args)
    timings[name] = round(time.perf_counter() - start, 2)
    return result


def _train_and_register(config, base_ref, run_dir: Path, cache_root: Path, uri: str, run_id: str, versioning, timings: dict) -> dict:
    init = _timed(timings, "initialize", init_stage, config, base_ref, run_dir, cache_root)
    track.log_metrics(uri, run_id, {"seconds": init.seconds, "cache_hit": float(init.cache == "hit"), **init.checks}, prefix="init/")
    track.log_file(uri, run_id, Path(init.report_path), "init")
    if init.plot_path:
        track.log_file(uri, run_id, Path(init.plot_path), "init")
    train_config = config
    if init.learning_rate is not None:  # auto: train the race winner at its own learning rate
        track.log_file(uri, run_id, Path(init.race_path), "init")
        track.log_metrics(uri, run_id, {"chosen_learning_rate": init.learning_rate}, prefix="init/")
        train_config = config.model_copy(update={"train": config.train.model_copy(update={"learning_rate": init.learning_rate})})
    trained = _timed(timings, "train", train_stage, train_config, base_ref, init.init_dir, run_dir, {"uri": uri, "run_id": run_id})
    adapter_dir, merge = trained.adapter_dir, None
    if trained.merged_adapter_dir:
        merge = _timed(timings, "merge", merge_choice_stage, config, base_ref, trained)
        adapter_dir = merge["adapter_dir"]
        _log_merge(uri, run_id, run_dir, merge)
    metrics = _timed(timings, "evaluate", evaluate_stage, config, base_ref, adapter_dir, run_dir / "plots")
    _log_plots(uri, run_id, run_dir)
    spectral = _spectral(config, base_ref, adapter_dir, run_dir, uri, run_id, timings)
    data_version = versioning.result()
    track.log_data_version(config, uri, run_id, data_version)
    track.log_metrics(uri, run_id, metrics, prefix=f"{config.evaluate.split}/")
    tags = _version_tags(train_config, base_ref, data_version, init.method, metrics, trained)
    description = _version_description(train_config, init.method, metrics, trained, data_version)
    if spectral:
        tags["intruder_dimensions"] = f"{spectral['intruders_total']:.0f}"
    if merge:
        tags["checkpoint_merge"] = f"{merge['chosen']} ({merge['metric']} on validation: merged {merge['merged']:.4f}, final {merge['final']:.4f})"
    version = _timed(timings, "register", register_stage, config, uri, run_id, adapter_dir, base_ref, tags, description)
    promotion = _auto_promotion(config, uri, timings) if config.promotion.promote == "auto" else None
    return {
        "promotion": promotion,
        "name": config.name, "run_id": run_id, "init": init.to_dict(), "train": trained.to_dict(), "metrics": metrics,
        "model_name": config.registry.model_name, "version": version, "alias": config.registry.staging_alias,
        "eval_split": config.evaluate.split, "data_md5": data_version.digest, "merge": merge, "spectral": spectral,
    }


def _spectral(config, base_ref, adapter_dir: str, run_dir: Path, uri: str, run_id: str, timings: dict) -> dict | None:
    if config.evaluate.intruders is None:
        return None
    report = _timed(timings, "spectral", spectral_stage, config, base_ref, adapter_dir, run_dir / "spectral")
    for path in report["files"]:
        track.log_file(uri, run_id, Path(path), "spectral")
    track.log_metrics(uri, run_id, report["summary"], prefix="spectral/")
    return report["summary"]


def _log_merge(uri: str, run_id: str, run_dir: Path, merge: dict) -> None:
    from adapterflow.tasks.checkpoint_merge import merge_markdown

    (run_dir / "checkpoint_merge.md").write_text(merge_markdown(merge))
    (run_dir / "checkpoint_merge.json").write_text(json.dumps(merge, indent=1))
    for name in ("checkpoint_merge.md", "checkpoint_merge.json"):
        track.log_file(uri, run_id, run_dir / name, "merge")
    metric = merge["metric"]
    track.log_metrics(uri, run_id, {f"final_{metric}": merge["final"], f"merged_{metric}": merge["merged"], "chose_merged": float(merge["chosen"] == "merged")}, prefix="merge/")


def _log_plots(uri: str, run_id: str, run_dir: Path) -> None:
    from adapterflow.tasks.run_plots import plot_loss_curves

    plot_loss_curves(run_dir / "train_log.json", run_dir / "plots" / "loss_curves.png")
    for path in sorted((run_dir / "plots").glob("*.png")):
        track.log_file(uri, run_id, path, "plots")


def _auto_promotion(config, uri: str, timings: dict) -> dict:
    """The gate after registration; a refusal or a registry conflict leaves the new version at staging."""
    from adapterflow.errors import RegistryError

    try:
        decision = _timed(timings, "promote", promote_stage, config, uri, state_dirs().root / "locks")
    except RegistryError as err:
        return {"promoted": False, "reason": str(err)}
    return {"promoted": decision.promoted, "reason": decision.reason}


def _version_tags(config, base_ref, data_version, method: str, metrics: dict, trained) -> dict[str, str]:
    adapter = config.adapter
    tags = {
        "task": config.task,
        "lora_r": str(adapter.r),
        "lora_alpha": f"{adapter.alpha:g}",
        "target_modules": ", ".join(adapter.target_modules),
        "train_steps": str(trained.steps),
        "learning_rate": f"{config.train.learning_rate:g}",
        "data_md5": data_version.digest,
        "git_commit": track.git_commit(),
        "config_hash": config.digest(),
        "init_method": method,
        "base_model": base_ref.identity,
        "base_revision": base_ref.revision or "n/a (local files; identity is a content hash)",
        "eval_split": config.evaluate.split,
    }
    tags.update({f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()})
    # Per-split digests let `adapterflow promote` prove it compares on the same frozen split.
    tags.update({f"data.{split}_md5": file_md5(Path(path)) for split, path in split_files(config.data).items()})
    return tags


def _version_description(config, method: str, metrics: dict, trained, data_version) -> str:
    scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    return (
        f"{method} init, r={config.adapter.r}; {trained.steps} steps at learning rate {config.train.learning_rate:g} "
        f"(final train loss {trained.train_loss:.4f}). On the {config.evaluate.split} split: {scores}. "
        f"Data: DVC md5 {data_version.digest}."
    )


def _new_run_dir(root: Path, name: str) -> Path:
    run_dir = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir(parents=True)
    return run_dir


def _summary_markdown(summary: dict) -> str:
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in summary["metrics"].items())
    return (
        f"# {summary['name']}\n\n- data md5: `{summary['data_md5']}`\n- init: {summary['init']['method']} "
        f"({summary['init']['seconds']:.2f} s)\n- metrics ({summary['eval_split']}): {metrics}\n"
        f"- registered: {summary['model_name']} v{summary['version']} @{summary['alias']}\n"
    )
