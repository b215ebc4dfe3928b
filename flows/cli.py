"""`adapterflow` command line: run, check, make-tiny-model."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from adapterflow.errors import AdapterflowError, ConfigError
from adapterflow.tasks.state import prepare_environment, quiet_library_noise



def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except AdapterflowError as err:
        return _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was registered.", 130)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapterflow", description="Declarative retraining pipeline for LoRA adapters.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="validate a config and run the retraining flow")
    run.add_argument("config", help="path of the run's YAML config, e.g. configs/demo.yaml")
    run.add_argument("--force", action="store_true", help="retrain even if staging/production holds this exact config and data")
    run.set_defaults(handler=cmd_run)
    serve = sub.add_parser("serve", help="serve the retrain flow as a Prefect deployment on the config's schedule")
    serve.add_argument("config")
    serve.set_defaults(handler=cmd_serve)
    check = sub.add_parser("check", help="validate a config (keys, values, files, model path) without running")
    check.add_argument("config")
    check.set_defaults(handler=cmd_check)
    for command, handler, text in (
        ("promote", cmd_promote, "re-evaluate @staging vs @production on the frozen split; move production if the gate passes"),
        ("rollback", cmd_rollback, "point @production back at the previous production version"),
        ("status", cmd_status, "aliases, versions, metrics and promotion history of a registered model"),
    ):
        registry = sub.add_parser(command, help=text)
        registry.add_argument("model_name")
        registry.add_argument("--tracking-uri", help="MLflow URI (default: the local state folder's SQLite store)")
        registry.add_argument("--staging-alias", default="staging")
        registry.add_argument("--production-alias", default="production")
        registry.set_defaults(handler=handler)
    trace = sub.add_parser("lineage", help="data, code, config, init, metrics and comparisons behind one registered version")
    trace.add_argument("model_name")
    trace.add_argument("version")
    trace.add_argument("--tracking-uri", help="MLflow URI (default: the local state folder's SQLite store)")
    trace.set_defaults(handler=cmd_lineage)
    tiny = sub.add_parser("make-tiny-model", help="build a tiny model from config (no hub) for smoke runs")
    tiny.add_argument("arch", choices=["bert", "llama"])
    tiny.add_argument("out", help="folder to write the model and tokenizer to")
    tiny.set_defaults(handler=cmd_make_tiny_model)
    return parser


def cmd_check(args) -> int:
    config = preflight(args.config)
    print(f"ok: {args.config} is a valid {config.task} config (init method {config.adapter.init.method}).")
    return 0


def preflight(config_path: str):
    """Everything checkable without loading a model: config, files, model path."""
    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.data_io import split_files
    from adapterflow.errors import DataError
    from adapterflow.tasks.hardware import check_hardware
    from adapterflow.tasks.model_io import resolve_base

    config = load_config(config_path)
    for split, path in split_files(config.data).items():
        if not Path(path).is_file():
            raise DataError(f"data.{split}: file not found: {path}. Check the path (relative paths are read from the config's folder).")
    if config.evaluate.generation and not Path(config.evaluate.generation.file).is_file():
        raise DataError(f"evaluate.generation.file not found: {config.evaluate.generation.file}")
    resolve_base(config.model)
    check_hardware(config)
    from adapterflow.tasks.track import check_servers

    check_servers(config)
    if config.schedule is not None:
        check_schedule(config.schedule)
    from adapterflow.tasks.init_adapter import check_init_plan

    check_init_plan(config)
    return config


def cmd_run(args) -> int:
    config = preflight(args.config)
    dirs = prepare_environment(offline=config.model.hub_id is None)
    start = time.perf_counter()
    from adapterflow.flows import warm
    from adapterflow.flows.retrain import retrain

    warm.start()

    _quiet_user_errors_in_prefect_logs()
    quiet_library_noise()
    try:
        summary = retrain(str(Path(args.config).resolve()), force=args.force)
    finally:
        _stop_ephemeral_prefect_server()
    if summary.get("skipped"):
        print(f"skipped: {summary['model_name']} version {summary['version']} (@{summary['alias']}) was trained on this exact "
              "config and data; nothing to retrain. New data (a new DVC version) or a changed config trains; --force retrains anyway.")
        return 0
    print(render_summary(summary, dirs, time.perf_counter() - start))
    # The interpreter's final garbage collection walked the whole heap (prefect, mlflow, GE,
    # torch) for ~5 s after every run; frozen objects are skipped and the OS reclaims them.
    import gc

    gc.freeze()
    return 0


def cmd_serve(args) -> int:
    """Blocks: Prefect runs the retrain flow on schedule; parameters (config_path, force) can be set per run."""
    config = preflight(args.config)
    if config.schedule is None:
        raise ConfigError(f"{args.config} has no schedule section; add e.g. schedule: {{cron: '0 3 * * *'}} to serve it.")
    schedule = check_schedule(config.schedule)
    prepare_environment(offline=config.model.hub_id is None)
    from adapterflow.flows.retrain import retrain

    _quiet_user_errors_in_prefect_logs()
    quiet_library_noise()
    print(f"serving deployment adapterflow-retrain/{config.name} ({schedule}); Ctrl-C stops it.")
    retrain.serve(name=config.name, parameters={"config_path": str(Path(args.config).resolve()), "force": False},
                  print_starting_message=False, limit=1, **_schedule_kwargs(config.schedule))
    return 0


def check_schedule(schedule) -> str:
    """Prefect's own parser judges the cron string; returns a description for the user."""
    if schedule.cron is None:
        return f"every {schedule.interval_seconds} s"
    try:
        _schedule_kwargs(schedule)
    except ValueError as err:
        detail = str(err).splitlines()[0]
        raise ConfigError(f"schedule.cron is not a valid schedule: {detail}. Use five fields, e.g. '0 3 * * *' (03:00 daily).") from None
    return f"cron '{schedule.cron}' {schedule.timezone}"


def _schedule_kwargs(schedule) -> dict:
    from prefect.schedules import Cron, Interval

    if schedule.cron is not None:
        return {"schedule": Cron(schedule.cron, timezone=schedule.timezone)}
    return {"schedule": Interval(schedule.interval_seconds, timezone=schedule.timezone)}


def _stop_ephemeral_prefect_server() -> None:
    """Send Prefect's queued logs and events, then stop its ephemeral server without the wait.

    Prefect 3.8 gives its ephemeral server 5 s to exit on SIGTERM and it never makes it here,
    so every run paid 5 s at exit. By now every state is stored and the queues are drained.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():  # a configured server is not ours to stop
        return
    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    for server in list(SubprocessASGIServer._instances.values()):
        if server.server_process is not None:
            server.server_process.kill()
            server.server_process.wait()
        server.stop()


class _DropUserErrors(logging.Filter):
    """The CLI prints a user error once, as one message: keep its traceback off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, AdapterflowError) and not _mentions_user_error(record)


def _mentions_user_error(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return any(name in message for name in ("ConfigError", "DataError", "ModelError", "InitError", "TrainingError", "RegistryError"))


def _quiet_user_errors_in_prefect_logs() -> None:
    # On the loggers, not their handlers: Prefect attaches console handlers lazily. The failed
    # state (with the message) still reaches the Prefect UI; only the duplicate traceback goes.
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        logging.getLogger(name).addFilter(_DropUserErrors())
    logging.getLogger("great_expectations").setLevel(logging.WARNING)


def render_summary(summary: dict, dirs, seconds: float) -> str:
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in summary["metrics"].items())
    validation = summary["validation"]
    rows = ", ".join(f"{k} {v}" for k, v in validation["row_counts"].items())
    init = summary["init"]
    return "\n".join([
        "",
        f"== adapterflow: {summary['name']} done in {seconds:.0f} s ==",
        f"data validation  passed ({validation['checks']} checks; rows: {rows})",
        f"data md5 (DVC)   {summary['data_md5']}",
        f"init             {init['method']} in {init['seconds']:.2f} s (cache {init['cache']})" + _race_line(init),
        *_init_report_lines(init),
        f"training         {summary['train']['steps']} steps in {summary['train']['seconds']:.0f} s on {summary['train']['device']}" + _launch_note(summary["train"]),
        *_merge_lines(summary.get("merge")),
        f"metrics ({summary['eval_split']})  {metrics}",
        *_spectral_lines(summary.get("spectral")),
        f"registered       {summary['model_name']} version {summary['version']}  alias @{summary['alias']}",
        *_promotion_lines(summary.get("promotion")),
        f"mlflow run       {summary['run_id']}",
        "stage seconds    " + "  ".join(f"{k} {v:.1f}" for k, v in summary["timings"].items()),
        "",
        "Open the dashboards on this data:",
        f"  {_script('mlflow')} ui --backend-store-uri {summary['tracking_uri']} --port 5000",
        f"  PREFECT_HOME={dirs.prefect_home} {_script('prefect')} server start",
    ])


def _launch_note(train: dict) -> str:
    note = f" × {train['processes']} processes" if train.get("processes", 1) > 1 else ""
    if train.get("resumed_from"):
        note += f"; resumed from {Path(train['resumed_from']).name} of the interrupted run"
    return note


def _spectral_lines(spectral: dict | None) -> list[str]:
    if spectral is None:
        return []
    return [f"intruder dims    {spectral['intruders_total']:.0f} in {spectral['layers_with_intruders']:.0f} layers "
            f"(lowest best-match similarity {spectral['intruders_min_similarity']:.2f}); table and plot under spectral/ in the run"]


def _merge_lines(merge: dict | None) -> list[str]:
    if merge is None:
        return []
    steps = ", ".join(f"{c['step']}×{c['weight']:.2f}" for c in merge["checkpoints"])
    return [f"checkpoint merge {merge['chosen']} registered ({merge['metric']} on validation: merged {merge['merged']:.4f}, final {merge['final']:.4f}; steps×weights {steps})"]


def _promotion_lines(promotion: dict | None) -> list[str]:
    if promotion is None:
        return []
    verdict = "promoted to @production" if promotion["promoted"] else "not promoted"
    return [f"promotion gate   {verdict}: {promotion['reason']}"]


def _init_report_lines(init: dict) -> list[str]:
    """Per-layer ranks, the spectrum plot and, for auto, the race table, from the init report."""
    import json

    report = json.loads(Path(init["report_path"]).read_text())
    ranks = list(report.get("ranks", {}).values())
    lines = [f"init ranks       {min(ranks)}–{max(ranks)} per layer over {len(ranks)} layers (sum {sum(ranks)})"] if ranks else []
    if "min_explained_variance" in report.get("checks", {}):
        lines.append(f"init variance    kept components explain ≥ {report['checks']['min_explained_variance']:.3f} of each layer's input variance")
    if init.get("plot_path"):
        lines.append(f"init spectrum    {init['plot_path']}")
    if init.get("race_path"):
        lines += ["", "auto race (successive halving on validation loss):", Path(init["race_path"]).read_text().rstrip(), ""]
    return lines


def _race_line(init: dict) -> str:
    if init.get("learning_rate") is None:
        return ""
    return f"; won the auto race at lr {init['learning_rate']:g}, table: {init['race_path']}"


def _script(name: str) -> str:
    """The console script installed beside this interpreter, so the command works without activating the venv."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _registry_target(args) -> tuple[str, Path]:
    dirs = prepare_environment(offline=True)
    quiet_library_noise()
    return args.tracking_uri or dirs.default_mlflow_uri(), dirs.root / "locks"


def cmd_promote(args) -> int:
    from adapterflow.tasks.promote import promote

    uri, locks = _registry_target(args)
    decision = promote(args.model_name, uri, locks, args.staging_alias, args.production_alias)
    verdict = f"promoted version {decision.candidate} to @{args.production_alias}" if decision.promoted else f"kept @{args.production_alias}: version {decision.candidate} refused"
    print(f"{args.model_name}: {verdict}\n  {decision.reason}")
    if decision.forgetting:
        print(f"  forgetting set {decision.forgetting['file']}: candidate {decision.forgetting['candidate']:.4f}, production {decision.forgetting['incumbent']:.4f}")
    return 0 if decision.promoted else 1


def cmd_rollback(args) -> int:
    from adapterflow.tasks.promote import rollback

    uri, locks = _registry_target(args)
    current, previous = rollback(args.model_name, uri, locks, args.production_alias)
    print(f"{args.model_name}: @{args.production_alias} rolled back from version {current} to version {previous}")
    return 0


def cmd_status(args) -> int:
    from adapterflow.tasks.promote import status

    uri, _ = _registry_target(args)
    print(render_status(args.model_name, status(args.model_name, uri)))
    return 0


def cmd_lineage(args) -> int:
    import yaml

    from adapterflow.tasks.promote import lineage

    uri, _ = _registry_target(args)
    info = lineage(args.model_name, args.version, uri)
    lines = [
        f"{args.model_name} version {info['version']}  (MLflow run {info['run_id']}, experiment {info['experiment_id']})",
        f"data md5 (DVC)  {info['data_md5']}",
        *[f"  {split:<10} {info['data_paths'].get(split, '?')}  md5 {md5}" for split, md5 in sorted(info["data_files"].items())],
        f"git commit      {info['git_commit']}",
        f"base model      {info['base_model']}",
        f"init method     {info['init_method']}",
        f"config hash     {info['config_hash']}",
        "metrics         " + "  ".join(f"{k}={v}" for k, v in sorted(info["metrics"].items())),
        "compared        " + ("; ".join(_comparison(e) for e in info["comparisons"]) or "never (not promoted or refused yet)"),
        "config:",
        yaml.safe_dump(info["config"], sort_keys=False).rstrip(),
    ]
    print("\n".join(lines))
    return 0


def _comparison(event: dict) -> str:
    against = f"production v{event['from']}" if event.get("from") else "the base model"
    scores = f" ({event['metric']} {event['candidate']:.4f} vs {event['incumbent']:.4f})" if "metric" in event else ""
    return f"{event['when']} {event['action']} against {against}{scores}"


def render_status(name: str, state: dict) -> str:
    aliases = ", ".join(f"@{alias} → v{version}" for alias, version in sorted(state["aliases"].items())) or "none"
    lines = [f"{name}", f"aliases   {aliases}", "versions"]
    for version in state["versions"]:
        tags = version["tags"]
        metrics = "  ".join(f"{k.removeprefix('metric.')}={v}" for k, v in sorted(tags.items()) if k.startswith("metric."))
        incomplete = "  (registration incomplete: never staged)" if tags.get("adapterflow.registration") == "incomplete" else ""
        lines.append(f"  v{version['version']:<4} init {tags.get('init_method', '?'):<8} data {tags.get('data_md5', '?')[:8]}  {metrics}{incomplete}")
    lines.append("history")
    for event in state["history"]:
        lines.append(f"  {event['when']:<26} {event['action']:<9} v{event.get('from')} → v{event['to']}  {event.get('reason', '')}")
    if not state["history"]:
        lines.append("  no promotion yet")
    return "\n".join(lines)


def cmd_make_tiny_model(args) -> int:
    prepare_environment(offline=True)
    from adapterflow.tasks.tiny_models import make_tiny_bert, make_tiny_llama

    maker = make_tiny_bert if args.arch == "bert" else make_tiny_llama
    print(f"wrote tiny {args.arch} to {maker(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
