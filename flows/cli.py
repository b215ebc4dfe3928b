"""`adapterflow` command line: argument parsing and the commands; what they print is in flows/render.py."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from adapterflow.errors import DEFERRED_EXIT_CODE, AdapterflowError, ConfigError, RegistryError
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
    except Exception as err:
        user_error = _as_user_error(err)
        if user_error is not None:  # a registry refusal or a path the system refused: the user's to fix
            return _fail(str(user_error), user_error.exit_code)
        return _bug(err)  # not the user's mistake: one message, the traceback in a file


def _bug(err: Exception) -> int:
    import traceback

    from adapterflow.redact import redact_text
    from adapterflow.tasks.state import state_dirs

    try:
        message = console.bug_message(err, state_dirs().root / "logs")
    except OSError as unsaved:  # the state folder itself is unwritable: the traceback stays on screen only
        message = ("".join(traceback.format_exception(err)) + f"error: unexpected {type(err).__name__}: "
                   f"{(str(err).splitlines() or [''])[0]}\nThis is a bug in adapterflow, not a problem with your config or "
                   f"data. Please report it with the traceback above (it could not be saved: {unsaved}).")
    print(redact_text(message), file=sys.stderr)
    return BUG_EXIT_CODE


# OSErrors a user causes and fixes (permissions, read-only mounts, full disks, a file where a folder should be);
# any other OSError (a missing file the code expected, ...) stays a bug with its traceback.
_USER_ERRNOS = {"EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOTDIR", "EISDIR"}


def _as_user_error(err: Exception) -> AdapterflowError | None:
    """An MlflowException → RegistryError (exit 5); an OSError from the list above → one message naming the path."""
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")  # never imported here: a CLI error must stay fast
    if mlflow_exceptions is not None and isinstance(err, mlflow_exceptions.MlflowException):
        return _registry_refusal(err)
    if isinstance(err, OSError) and _errno_name(err) in _USER_ERRNOS:
        return _path_refusal(err)
    return None


def _errno_name(err: OSError) -> str | None:
    import errno

    return errno.errorcode.get(err.errno) if err.errno is not None else None


def _registry_refusal(err) -> AdapterflowError:
    code = str(getattr(err, "error_code", "") or "")
    text = str(getattr(err, "message", "") or err)
    said = " ".join(line.strip() for line in text.splitlines() if line.strip())[:500] or type(err).__name__  # never a wall
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or any(f"error code {n}" in text for n in (401, 403)):
        fix = ("Your MLflow user may not do this: ask an MLflow admin for the permission on this model, or set "
               "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for a user who has it.")
    elif code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "ENDPOINT_NOT_FOUND"):
        fix = "Check the model name, version and alias with adapterflow status NAME (or the MLflow UI) and the tracking URI."
    elif code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS"):
        fix = ("MLflow refuses this name, alias or version: aliases may hold letters, digits, _ and -, and 'latest' and "
               "v<number> are reserved; a version adapterflow did not register (no run with config.resolved.yaml) cannot "
               "be promoted, traced or exported. Check the names, and the versions with adapterflow status NAME.")
    else:
        fix = "Check that the registry (the tracking URI) is up and consistent, then retry."
    return RegistryError(f"the MLflow registry refused the request ({code or type(err).__name__}): {said.rstrip('.')}. {fix}")


def _path_refusal(err: OSError) -> AdapterflowError:
    from adapterflow.tasks.state import StateFolderError, state_dirs

    path = Path(err.filename) if err.filename else None
    root = state_dirs().root
    in_state = path is not None and (path == root or root in path.parents)
    name = _errno_name(err)
    if name in ("ENOSPC", "EDQUOT"):
        fix = "Free space on that disk" + (", or point ADAPTERFLOW_HOME at a folder on a disk with room." if in_state else ".")
    elif name in ("ENOTDIR", "EISDIR"):
        fix = "A file stands where a folder should be, or the reverse: fix the path."
    elif in_state:
        fix = "Make the state folder writable by this user, or point ADAPTERFLOW_HOME at a writable folder."
    else:
        fix = "Fix its permissions (owner and mode) or its mount, or use another path."
    if in_state:
        subject = f"the state folder {root}" + (f" ({path})" if path != root else "")
    else:
        subject = str(path) if path else "the system refused a file operation"
    return (StateFolderError if in_state else ConfigError)(f"{subject}: {err.strerror or err}. {fix}")


def _reader_went_away() -> int:
    """`adapterflow lineage ... | head`: the reader closed the pipe; exit quietly as other Unix tools do."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush must not fail again
    return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the closed pipe


BUG_EXIT_CODE = 70  # EX_SOFTWARE: an internal error


def _fail(message: str, code: int) -> int:
    from adapterflow.redact import redact_text

    print(f"error: {redact_text(message)}", file=sys.stderr)  # a message may quote a URI: never its credentials
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapterflow", description="Declarative retraining pipeline for LoRA adapters.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="validate a config and run the retraining flow")
    run.add_argument("config", help="path of the run's YAML config, e.g. configs/demo.yaml")
    run.add_argument("--force", action="store_true", help="retrain even if staging/production holds this exact config and data")
    loudness = run.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true", help="print the summary only (and warnings): no stage lines, no progress")
    loudness.add_argument("--verbose", action="store_true", help="the libraries' own logs too (Prefect, MLflow, transformers)")
    run.set_defaults(handler=cmd_run)
    serve = sub.add_parser("serve", help="serve the retrain flow as a Prefect deployment on the config's schedule")
    serve.add_argument("config")
    serve.set_defaults(handler=cmd_serve)
    register = sub.add_parser("register", help="finish a run that trained while a service was down: push its data, ship its "
                              "metrics, register its version (once, however often it is run), move its alias")
    register.add_argument("run_dir", metavar="RUN_DIR", help="the run folder the run's summary named")
    register.add_argument("--mlflow-uri", help="the run's MLflow URI, when it carried a password (never written to disk)")
    register.set_defaults(handler=cmd_register)
    sweep = sub.add_parser("sweep", help="train a grid (or Optuna samples) of settings as child runs; register the best",
                           description="Each trial is the retrain flow with the trial's --set overrides: a Prefect child "
                                       "flow run and an MLflow child run under one parent run. The best trial on the "
                                       "validation split is registered (alias staging); the others are not.")
    sweep.add_argument("config")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="values to try for one key, read as YAML: --grid train.learning_rate=1e-4,3e-4 (repeatable; "
                            "every combination is a trial)")
    sweep.add_argument("--range", action="append", default=[], metavar="KEY=LOW:HIGH[:log|int]", dest="ranges",
                       help="a numeric range sampled by Optuna's TPE, with --trials: --range train.learning_rate=1e-5:1e-3:log")
    sweep.add_argument("--trials", type=int, help="sample this many trials with Optuna (TPE, successive-halving pruning "
                                                  "on train.eval_every evaluations) instead of the whole grid")
    sweep.add_argument("--max-parallel", type=int, default=1, help="trials at once (default 1)")
    sweep.add_argument("--metric", help="the validation metric that picks the winner (default: promotion.metric, or "
                                        "accuracy / eval_loss by task)")
    sweep.add_argument("--quiet", action="store_true", help="print the summary only (and warnings)")
    sweep.set_defaults(handler=cmd_sweep, verbose=False)
    check = sub.add_parser("check", help="validate a config (keys, values, files, model path) without running")
    check.add_argument("config")
    check.add_argument("--print", action="store_true", dest="print_config",
                       help="print the resolved config (bases merged, overrides applied, paths absolute, credentials masked)")
    check.set_defaults(handler=cmd_check)
    for command in (run, serve, check, sweep):
        command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                             help="override one key, read as YAML and checked by the schema: --set train.learning_rate=1e-3 "
                                  "(repeatable; applied after the config and the files it extends)")
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
    infra = sub.add_parser("infra", help="administration of the shared servers (infra/)")
    infra_actions = infra.add_subparsers(required=True, metavar="ACTION")
    users = infra_actions.add_parser(
        "users", help="create the MLflow users trainer (EDIT) and promoter (MANAGE) on a registered model; idempotent",
        description="Needs an MLflow admin's MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD. New passwords are shown "
                    "once, or appended to --out (mode 0600); existing users keep theirs unless --reset-passwords.")
    users.add_argument("model_name", help="the registered model (created by the admin if missing)")
    users.add_argument("--tracking-uri", help="MLflow server URI (default: $MLFLOW_TRACKING_URI)")
    users.add_argument("--out", help="append the new passwords to this file (mode 0600) instead of printing them")
    users.add_argument("--trainer", default="trainer", help="user name of the training identity (default: trainer)")
    users.add_argument("--promoter", default="promoter", help="user name of the promoting identity (default: promoter)")
    users.add_argument("--reset-passwords", action="store_true", help="give existing users new passwords too")
    users.set_defaults(handler=cmd_infra_users)
    tiny = sub.add_parser("make-tiny-model", help="build a tiny model from config (no hub) for smoke runs")
    tiny.add_argument("arch", choices=["bert", "llama"])
    tiny.add_argument("out", help="folder to write the model and tokenizer to")
    tiny.set_defaults(handler=cmd_make_tiny_model)
    return parser


def cmd_check(args) -> int:
    config = preflight(args.config, args.overrides)
    if args.print_config:
        import yaml

        from adapterflow.tasks.tracking import public_config

        print(yaml.safe_dump(public_config(config), sort_keys=False), end="")
    print(f"ok: {args.config} is a valid {config.task} config (init method {config.adapter.init.method}).")
    return 0


def preflight(config_path: str, overrides: list[str] = ()):
    """Everything checkable without loading a model: config, state folder, files, model path."""
    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.data_io import check_readable, split_files
    from adapterflow.tasks.hardware import check_hardware
    from adapterflow.tasks.model_io import resolve_base
    from adapterflow.tasks.state import check_state_folder

    config = load_config(config_path, overrides)
    check_state_folder()  # writable, with room: a read-only or full one failed late, in thousands of lines
    for split, path in split_files(config.data).items():
        check_readable(path, split)  # exists, a readable file, its format's bytes (UTF-8 text, parquet markers)
    if config.data.dataset is not None:
        from adapterflow.tasks.data_sources import check_source

        check_source(config.data.dataset)  # a saved dataset's folder, or a hub id with a pinned revision
    if config.evaluate.generation:
        check_readable(config.evaluate.generation.file, "evaluate.generation.file")
    if config.promotion.forgetting:
        check_readable(config.promotion.forgetting.file, "promotion.forgetting.file")
    resolve_base(config.model)
    check_hardware(config)
    from adapterflow.tasks.server_health import check_servers

    check_servers(config)
    if config.schedule is not None:
        check_schedule(config.schedule)
    from adapterflow.tasks.init_adapter import check_init_plan

    check_init_plan(config)
    return config


def refuse_secret_overrides(overrides: list[str]) -> None:
    """A flow run's parameters (the overrides among them) are stored in Prefect's database and shown in its UI."""
    from adapterflow.redact import redact_text

    for override in overrides:
        if redact_text(override) != override:
            key = override.partition("=")[0]
            raise ConfigError(f"--set {key}: the value holds a credential, and overrides are stored with the Prefect flow run "
                              "as its parameters. Give it in the environment (MLFLOW_TRACKING_URI, AWS_* ...) or in the "
                              "config file instead.")


def cmd_run(args) -> int:
    from adapterflow.flows.progress import say

    _set_output_mode(args)
    refuse_secret_overrides(args.overrides)
    config = preflight(args.config, args.overrides)
    # Before the first line: saying it imports prefect, which reads its logging level (WARNING, set here) once.
    dirs = prepare_environment(offline=not config.uses_hub())
    say(f"adapterflow: {args.config} checked ({config.task}, init {config.adapter.init.method}); starting the flow")
    start = time.perf_counter()
    from adapterflow.flows import warm
    from adapterflow.flows.retrain import retrain

    warm.start()
    from adapterflow.tasks.embedded_store import prepare_prefect_store

    prepare_prefect_store()  # a fresh Prefect database is created once, under a lock: two first runs would race on it
    console.quiet_failures_in_prefect_logs()
    quiet_library_noise()
    try:
        summary = retrain(str(Path(args.config).resolve()), force=args.force, overrides=args.overrides)
    finally:
        _stop_ephemeral_prefect_server()
    if summary.get("skipped"):
        print(render.skipped_line(summary))
        return 0
    render.show(render.summary_rows(summary, dirs, time.perf_counter() - start))
    if summary.get("deferred"):
        print(render.deferred_message(summary), file=sys.stderr)
        return DEFERRED_EXIT_CODE
    # The interpreter's final garbage collection walked the whole heap (prefect, mlflow, GE,
    # torch) for ~5 s after every run; frozen objects are skipped and the OS reclaims them.
    import gc

    gc.freeze()
    return 0


def _set_output_mode(args) -> None:
    """The flow runs in this process and reads the mode from the environment (a served run has none: normal)."""
    import os

    from adapterflow.flows.progress import OUTPUT_ENV

    os.environ[OUTPUT_ENV] = "quiet" if args.quiet else "verbose" if args.verbose else "normal"
    if args.verbose:
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"  # read when Prefect sets its logging up, before prepare_environment's default
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0"


def cmd_sweep(args) -> int:
    from adapterflow.tasks.sweep_plan import check_trials, parse_plan

    _set_output_mode(args)
    refuse_secret_overrides([*args.overrides, *args.grid])
    plan = parse_plan(args.grid, args.ranges, args.trials)
    if args.max_parallel < 1:
        raise ConfigError(f"--max-parallel must be at least 1, got {args.max_parallel}.")
    config = preflight(args.config, args.overrides)
    check_trials(args.config, args.overrides, plan)
    _check_sweep_metric(config, args.metric)
    dirs = prepare_environment(offline=not config.uses_hub())
    start = time.perf_counter()
    from adapterflow.flows import warm
    from adapterflow.flows.sweep import sweep
    from adapterflow.tasks.embedded_store import prepare_prefect_store

    warm.start(threads_will_import=True)
    prepare_prefect_store()
    console.quiet_failures_in_prefect_logs()
    quiet_library_noise()
    try:
        summary = sweep(str(Path(args.config).resolve()), args.grid, args.ranges, args.trials, args.overrides, args.metric,
                        args.max_parallel)
    finally:
        _stop_ephemeral_prefect_server()
    render.show(render.sweep_rows(summary, dirs, time.perf_counter() - start))
    return 0


def _check_sweep_metric(config, metric: str | None) -> None:
    from adapterflow.tasks.config import TASK_METRICS

    # exact_match is measured on evaluate.generation's file only, not on the validation split the winner is picked on
    known = [name for name in TASK_METRICS[config.task] if name != "exact_match"]
    source = "--metric" if metric else "promotion.metric"
    metric = metric or config.gate_metric()
    if metric not in known:
        raise ConfigError(f"{source} {metric} is not measured on the validation split a sweep picks its winner on; give "
                          f"--metric with one of: {', '.join(known)}.")


def cmd_serve(args) -> int:
    """Blocks: Prefect runs the retrain flow on schedule; parameters (config_path, force) can be set per run."""
    refuse_secret_overrides(args.overrides)
    config = preflight(args.config, args.overrides)
    if config.schedule is None:
        raise ConfigError(f"{args.config} has no schedule section; add e.g. schedule: {{cron: '0 3 * * *'}} to serve it.")
    schedule = check_schedule(config.schedule)
    prepare_environment(offline=not config.uses_hub())
    from adapterflow.flows.retrain import retrain
    from adapterflow.tasks.embedded_store import prepare_prefect_store

    prepare_prefect_store()
    console.quiet_failures_in_prefect_logs()
    quiet_library_noise()
    print(f"serving deployment adapterflow-retrain/{config.name} ({schedule}); Ctrl-C stops it.")
    parameters = {"config_path": str(Path(args.config).resolve()), "force": False, "overrides": args.overrides}
    retrain.serve(name=config.name, parameters=parameters,
                  print_starting_message=False, limit=1, **_schedule_kwargs(config.schedule))
    return 0


def cmd_register(args) -> int:
    from adapterflow.tasks.deferred import finish_deferred

    prepare_environment(offline=True)
    done = finish_deferred(Path(args.run_dir), args.mlflow_uri)
    for line in render.finished_lines(done, args.run_dir):
        print(line)
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
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():  # a configured server is not ours to stop (and its module costs 3 s to import)
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    for server in list(SubprocessASGIServer._instances.values()):
        if server.server_process is not None:
            server.server_process.kill()
            server.server_process.wait()
        server.stop()


def _registry_target(args, writes_state: bool = False) -> tuple[str, Path]:
    """The tracking URI and the lock folder; promote and rollback write their locks into the state folder."""
    from adapterflow.tasks.state import check_state_folder

    for option in ("staging_alias", "production_alias"):
        if hasattr(args, option):
            check_alias(getattr(args, option), "--" + option.replace("_", "-"))
    if writes_state:
        check_state_folder(free_bytes=0)
    dirs = prepare_environment(offline=True)
    quiet_library_noise()
    return args.tracking_uri or dirs.default_mlflow_uri(), dirs.root / "locks"


def check_alias(alias: str, option: str) -> None:
    """An alias MLflow would refuse only at the end of a promotion (after the evaluation) is refused before it."""
    import re

    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias) or not re.fullmatch(r"[\w\-]{1,255}", alias):
        raise RegistryError(
            f"{option} {alias!r} is an alias MLflow refuses: aliases are letters, digits, _ and - (1 to 255), and "
            "'latest' and v<number> are reserved. Pick another name, e.g. production or champion."
        )


def cmd_promote(args) -> int:
    from adapterflow.tasks.promote import promote

    if args.staging_alias == args.production_alias:
        raise RegistryError(f"--staging-alias and --production-alias are both {args.staging_alias!r}; they must name two aliases.")
    uri, locks = _registry_target(args, writes_state=True)
    decision = promote(args.model_name, uri, locks, args.staging_alias, args.production_alias)
    print("\n".join(render.promotion_lines(args.model_name, decision, args.production_alias)))
    return 0 if decision.promoted else 1


def cmd_rollback(args) -> int:
    from adapterflow.tasks.promote import rollback

    uri, locks = _registry_target(args, writes_state=True)
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


def cmd_infra_users(args) -> int:
    from adapterflow.redact import redact_uri
    from adapterflow.tasks.auth_users import create_team_users, write_passwords

    uri, _ = _registry_target(args)
    team = create_team_users(uri, args.model_name, args.trainer, args.promoter, args.reset_passwords)
    print(f"MLflow users for registered model {args.model_name!r} on {redact_uri(uri)}:")
    for user in team:
        state = "created" if user.created else "new password" if user.password else "exists, password unchanged"
        change = f"; was {user.changed_permission}" if user.changed_permission and not user.created else ""
        print(f"  {user.name:<10} {user.permission:<7} {user.duty} ({state}{change})")
    if not any(user.password for user in team):
        return 0
    if args.out:
        write_passwords(Path(args.out), args.model_name, uri, team)
        print(f"new passwords appended to {args.out} (mode 0600); they are not shown again.")
    else:
        print("new passwords, shown once (use one identity per process):")
        print("\n".join("  " + user.export_line(args.model_name) for user in team if user.password))
    return 0


def cmd_make_tiny_model(args) -> int:
    prepare_environment(offline=True)
    from adapterflow.tasks.tiny_models import make_tiny_bert, make_tiny_llama

    maker = make_tiny_bert if args.arch == "bert" else make_tiny_llama
    print(f"wrote tiny {args.arch} to {maker(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
