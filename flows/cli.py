"""`adapterflow` command line: run, check, make-tiny-model."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

from tasks.errors import AdapterflowError
from tasks.state import prepare_environment

HEAVY_MODULES = ("torch", "transformers", "peft", "great_expectations", "mlflow", "datasets", "sklearn.metrics")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except AdapterflowError as err:
        return _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was registered.", 130)
    except Exception as err:
        from adapters.errors import InitError

        if isinstance(err, InitError):
            return _fail(str(err), err.exit_code)
        raise


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapterflow", description="Declarative retraining pipeline for LoRA adapters.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="validate a config and run the retraining flow")
    run.add_argument("config", help="path of the run's YAML config, e.g. configs/demo.yaml")
    run.set_defaults(handler=cmd_run)
    check = sub.add_parser("check", help="validate a config (keys, values, files, model path) without running")
    check.add_argument("config")
    check.set_defaults(handler=cmd_check)
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
    from tasks.config import load_config
    from tasks.data_io import split_files
    from tasks.errors import DataError
    from tasks.model_io import resolve_base

    config = load_config(config_path)
    for split, path in split_files(config.data).items():
        if not Path(path).is_file():
            raise DataError(f"data.{split}: file not found: {path}. Check the path (relative paths are read from the config's folder).")
    if config.evaluate.generation and not Path(config.evaluate.generation.file).is_file():
        raise DataError(f"evaluate.generation.file not found: {config.evaluate.generation.file}")
    resolve_base(config.model)
    return config


def cmd_run(args) -> int:
    config = preflight(args.config)
    dirs = prepare_environment(offline=config.model.hub_id is None)
    _warm_imports_in_background()
    start = time.perf_counter()
    from flows.retrain import retrain

    _quiet_user_errors_in_prefect_logs()
    summary = retrain(str(Path(args.config).resolve()))
    print(render_summary(summary, dirs, time.perf_counter() - start))
    return 0


def _warm_imports_in_background() -> None:
    """Import the heavy libraries while Prefect's ephemeral server boots (it runs in a subprocess)."""
    import importlib

    def warm():
        for name in HEAVY_MODULES:
            try:
                importlib.import_module(name)
            except Exception:  # the stage that needs it will report the problem properly
                return

    threading.Thread(target=warm, daemon=True, name="warm-imports").start()


class _DropUserErrors(logging.Filter):
    """The CLI prints a user error once, as one message: keep its traceback off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        from adapters.errors import InitError

        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, (AdapterflowError, InitError)) and not _mentions_user_error(record)


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
        f"init             {init['method']} in {init['seconds']:.2f} s",
        f"training         {summary['train']['steps']} steps in {summary['train']['seconds']:.0f} s on {summary['train']['device']}",
        f"metrics ({summary['eval_split']})  {metrics}",
        f"registered       {summary['model_name']} version {summary['version']}  alias @{summary['alias']}",
        f"mlflow run       {summary['run_id']}",
        "",
        "Open the dashboards on this data:",
        f"  mlflow ui --backend-store-uri {summary['tracking_uri']} --port 5000",
        f"  PREFECT_HOME={dirs.prefect_home} prefect server start",
    ])


def cmd_make_tiny_model(args) -> int:
    prepare_environment(offline=True)
    from tasks.tiny_models import make_tiny_bert, make_tiny_llama

    maker = make_tiny_bert if args.arch == "bert" else make_tiny_llama
    print(f"wrote tiny {args.arch} to {maker(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
