"""`adapterflow` command line: argument parsing and the commands; what they print is in flows/render.py."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from adapterflow.errors import AdapterflowError, ConfigError
from adapterflow.flows import console, render
from adapterflow.tasks.state import prepare_environment, quiet_library_noise


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except AdapterflowError as err:
        return _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was registered.", 130)
    except BrokenPipeError:
        return _reader_went_away()
    except Exception as err:  # not the user's mistake: one message, the traceback in a file
        from adapterflow.tasks.state import state_dirs

        print(console.bug_message(err, state_dirs().root / "logs"), file=sys.stderr)
        return BUG_EXIT_CODE


def _reader_went_away() -> int:
    """`adapterflow lineage ... | head`: the reader closed the pipe; exit quietly as other Unix tools do."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush must not fail again
    return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the closed pipe


BUG_EXIT_CODE = 70  # EX_SOFTWARE: an internal error


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
    export = sub.add_parser("export", help="write a registered version as a plain PEFT adapter folder, or merged into its base")
    export.add_argument("spec", metavar="NAME@ALIAS", help="registered model and alias, e.g. my-adapter@production")
    export.add_argument("out", help="new or empty folder to write to")
    export.add_argument("--merged", action="store_true", help="the base with the adapter merged in (safetensors) plus its tokenizer")
    export.add_argument("--tracking-uri", help="MLflow URI (default: the local state folder's SQLite store)")
    export.set_defaults(handler=cmd_export)
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
    from adapterflow.errors import DataError
    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.data_io import split_files
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
    from adapterflow.tasks.server_health import check_servers

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

    console.quiet_failures_in_prefect_logs()
    quiet_library_noise()
    try:
        summary = retrain(str(Path(args.config).resolve()), force=args.force)
    finally:
        _stop_ephemeral_prefect_server()
    if summary.get("skipped"):
        print(render.skipped_line(summary))
        return 0
    render.show(render.summary_rows(summary, dirs, time.perf_counter() - start))
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

    console.quiet_failures_in_prefect_logs()
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


def _registry_target(args) -> tuple[str, Path]:
    dirs = prepare_environment(offline=True)
    quiet_library_noise()
    return args.tracking_uri or dirs.default_mlflow_uri(), dirs.root / "locks"


def cmd_promote(args) -> int:
    from adapterflow.tasks.promote import promote

    uri, locks = _registry_target(args)
    decision = promote(args.model_name, uri, locks, args.staging_alias, args.production_alias)
    print("\n".join(render.promotion_lines(args.model_name, decision, args.production_alias)))
    return 0 if decision.promoted else 1


def cmd_rollback(args) -> int:
    from adapterflow.tasks.promote import rollback

    uri, locks = _registry_target(args)
    current, previous = rollback(args.model_name, uri, locks, args.production_alias)
    print(f"{args.model_name}: @{args.production_alias} rolled back from version {current} to version {previous}")
    return 0


def cmd_status(args) -> int:
    from adapterflow.tasks.registry_queries import status

    uri, _ = _registry_target(args)
    render.show_status(args.model_name, status(args.model_name, uri))
    return 0


def cmd_lineage(args) -> int:
    from adapterflow.tasks.registry_queries import lineage

    uri, _ = _registry_target(args)
    render.show(render.lineage_rows(args.model_name, lineage(args.model_name, args.version, uri)))
    return 0


def cmd_export(args) -> int:
    from adapterflow.tasks.export import export_version

    uri, _ = _registry_target(args)
    version = export_version(args.spec, Path(args.out), uri, merged=args.merged)
    kind = "merged model" if args.merged else "adapter"
    print(f"wrote the {kind} of {args.spec} (version {version}) to {args.out}")
    return 0


def cmd_make_tiny_model(args) -> int:
    prepare_environment(offline=True)
    from adapterflow.tasks.tiny_models import make_tiny_bert, make_tiny_llama

    maker = make_tiny_bert if args.arch == "bert" else make_tiny_llama
    print(f"wrote tiny {args.arch} to {maker(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
