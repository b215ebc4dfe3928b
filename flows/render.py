"""What the CLI prints: rich tables and colour on a terminal, the same lines as plain text when piped.

The plain text is a stable interface (scripts and tests read it); the rich form is free to change.
A row is (label, value) where the plain line is label + value, (None, text) for a free line, or
(HEADING, text) for a heading. Nothing printed here holds a credential: every line goes through
adapterflow.redact (URIs' passwords, secret query values, secret environment values masked).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.text import Text

from adapterflow.redact import MASK, redact_text, redact_uri

Row = tuple[str | None, str]
HEADING = "=="


def show(rows: list[Row]) -> None:
    """Print rows: a rich grid on a terminal, otherwise the exact plain lines."""
    rows = [(label, redact_text(text)) for label, text in rows]
    if not sys.stdout.isatty():
        print(plain(rows))
        return
    _rich_rows(rows)


def plain(rows: list[Row]) -> str:
    return "\n".join(_plain_line(label, text) for label, text in rows)


def _plain_line(label: str | None, text: str) -> str:
    if label == HEADING:
        return f"== {text} =="
    return text if label is None else label + text


# --- the run summary ----------------------------------------------------------------------------


REMOTE_CODE_NOTE = "model.trust_remote_code is on: the base model's own Python code ran"


def summary_rows(summary: dict, dirs, seconds: float) -> list[Row]:
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in summary["metrics"].items())
    validation, init, train = summary["validation"], summary["init"], summary["train"]
    rows = ", ".join(f"{k} {v}" for k, v in validation["row_counts"].items())
    return [
        (None, ""),
        (HEADING, f"adapterflow: {summary['name']} done in {seconds:.0f} s"),
        ("data validation  ", f"passed ({validation['checks']} checks; rows: {rows})"),
        ("data md5 (DVC)   ", summary["data_md5"]),
        ("init             ", init_text(init) + _race_note(init)),
        *_init_report_rows(init),
        ("training         ", f"{train['steps']} steps in {train['seconds']:.0f} s on {train['device']}" + _launch_note(train)),
        *([("bnb cpu path     ", summary["bnb_cpu_path"])] if summary.get("bnb_cpu_path") else []),
        *([("remote code      ", REMOTE_CODE_NOTE)] if summary.get("trust_remote_code") else []),
        *_merge_rows(summary.get("merge")),
        (f"metrics ({summary['eval_split']})  ", metrics),
        *_spectral_rows(summary.get("spectral")),
        _registered_row(summary),
        *_promotion_rows(summary.get("promotion")),
        *[("outage           ", line) for line in summary.get("outages", [])],
        *([("deferred         ", "; ".join(summary["deferred"]))] if summary.get("deferred") else []),
        ("mlflow run       ", summary["run_id"]),
        ("stage seconds    ", "  ".join(f"{k} {v:.1f}" for k, v in summary["timings"].items())),
        (None, ""),
        (None, "Open the dashboards on this data:"),
        *_mlflow_ui_rows(summary["tracking_uri"]),
        (None, f"  PREFECT_HOME={dirs.prefect_home} {_script('prefect')} server start"),
    ]


def _registered_row(summary: dict) -> Row:
    if summary["version"] is None:
        return ("registered       ", f"not yet: MLflow did not answer; `adapterflow register {summary['run_dir']}` registers it")
    return ("registered       ", f"{summary['model_name']} version {summary['version']}  alias @{summary['alias']}")


def sweep_rows(summary: dict, dirs, seconds: float) -> list[Row]:
    """The sweep's trials, one row each (the winner marked), and what was registered."""
    metric, winner = summary["metric"], summary["winner"]
    rows: list[Row] = [(None, ""), (HEADING, f"adapterflow sweep {summary['name']}: {len(summary['trials'])} trials in {seconds:.0f} s")]
    for trial in summary["trials"]:
        value = trial["metrics"].get(metric)
        outcome = (f"failed: {trial['error'].splitlines()[0][:160]}" if trial["error"] else
                   "pruned" if trial["pruned"] else f"validation {metric} {value:.4f}")
        mark = "  <- winner" if winner and trial["number"] == winner["number"] else ""
        rows.append((f"trial {trial['number']:<3}        ", f"{trial['label']}: {outcome} ({trial['seconds']:.0f} s){mark}"))
    rows += [
        ("winner           ", f"trial {winner['number']} ({winner['label']}), MLflow run {winner['run_id']}"),
        ("registered       ", f"{summary['model_name']} version {summary['version']}  alias @{summary['alias']}"),
        ("mlflow run       ", f"{summary['parent_run_id']} (the sweep; its trials are its child runs)"),
        (None, ""),
        (None, "Compare the trials: in the MLflow UI, open the sweep run's experiment, expand its run, select the child runs, "
               "Compare (parallel coordinates); the sweep run's artifacts hold sweep/trials.md and the plot."),
        *_mlflow_ui_rows(summary["tracking_uri"]),
        (None, f"  PREFECT_HOME={dirs.prefect_home} {_script('prefect')} server start"),
    ]
    return rows


def deferred_message(summary: dict) -> str:
    """The run trained but left work for later: what, and the one command that finishes it."""
    what = "; ".join(summary["deferred"])
    return redact_text(f"trained, not complete: {what} could not be done while a service was down. Everything needed is kept "
                       f"in {summary['run_dir']}; once the service is back, run: adapterflow register {summary['run_dir']}")


def finished_lines(done, run_dir: str) -> list[str]:
    """What `adapterflow register RUN_DIR` did."""
    lines = ["data pushed to the DVC remote"] if done.pushed else []
    if done.writes:
        lines.append(f"{done.writes} deferred MLflow write(s) sent")
    if done.already:
        lines.append(f"already registered as version {done.version}; nothing new was registered")
    elif done.version:
        lines.append(f"registered version {done.version} for {run_dir}")
    if done.promotion:
        lines.append(done.promotion)
    return [redact_text(line) for line in lines + done.notes] or [f"nothing was left to do for {run_dir}"]


def _mlflow_ui_rows(uri: str) -> list[Row]:
    """Where to see the run: a tracking server's own UI, else `mlflow ui` on the store. Credentials never printed."""
    if _server_ui(uri):
        return [(None, f"  {_server_ui(uri)} (the MLflow server's UI)")]
    shown = redact_uri(uri)
    rows = [(None, f"  {_mlflow_ui_command(uri)}")]
    if MASK in shown:
        rows.append((None, f"  (the password shows as {MASK}: pass it in the environment, e.g. PGPASSWORD or ~/.pgpass)"))
    return rows


def _server_ui(uri: str) -> str | None:
    """A tracking server's UI address without its login; None for a store `mlflow ui` must serve."""
    from urllib.parse import urlsplit, urlunsplit

    if not uri.startswith(("http://", "https://")):
        return None
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def _mlflow_ui_command(uri: str) -> str:
    return f"{_script('mlflow')} ui --backend-store-uri {redact_uri(uri)} --port {MLFLOW_UI_PORT}"


MLFLOW_UI_PORT = 5000


def mlflow_run_link(uri: str, experiment_id: str, run_id: str) -> tuple[str, str]:
    """(the run's page in the MLflow UI, how to open it): the server's page, or the page `mlflow ui` will serve."""
    server = _server_ui(uri)
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if server:
        url = f"{server.rstrip('/')}/{page}"
        return url, url
    url = f"http://127.0.0.1:{MLFLOW_UI_PORT}/{page}"
    return url, f"{url} once `{_mlflow_ui_command(uri)}` runs"


# --- lines while the run goes (stderr) ---------------------------------------------------------------


def stage_start_line(name: str) -> str:
    return f"{name:<10} started"


def stage_end_line(name: str, seconds: float, result) -> str:
    outcome = stage_outcome(name, result)
    return redact_text(f"{name:<10} done in {seconds:.1f} s" + (f": {outcome}" if outcome else ""))


def stage_outcome(name: str, result) -> str:
    """A stage's key result in a few words; the stages' result records are read by their fields."""
    if name == "validate":
        counts = ", ".join(f"{split} {rows}" for split, rows in result.row_counts.items())
        return f"{sum(result.row_counts.values())} rows passed {result.checks} checks ({counts})"
    if name == "track":
        return f"MLflow run {result.run_id}"
    if name == "initialize":
        return init_text(result.to_dict())
    if name == "train":
        return f"{result.steps} steps on {result.device}, loss {result.train_loss:.4f}, {result.samples_per_second:.1f} samples/s"
    if name == "merge":
        return f"{result.chosen} adapter chosen"
    if name == "evaluate":
        return f"{result.split}: " + "  ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    if name == "spectral":
        return f"{result['intruders_total']:.0f} intruder dimensions"
    if name == "register":
        if result.held:
            return "held: the sweep registers its best trial"
        if result.version is None:
            return "deferred: MLflow did not answer within tracking.wait_for_server_seconds"
        return f"{result.model_name} version {result.version} @{result.alias}"
    if name == "promote":
        return ("promoted" if result.promoted else "not promoted") + f": {result.reason}"
    return ""


def skipped_line(summary: dict) -> str:
    return (f"skipped: {summary['model_name']} version {summary['version']} (@{summary['alias']}) was trained on this exact "
            "config and data; nothing to retrain. New data (a new DVC version) or a changed config trains; --force retrains anyway.")


def _launch_note(train: dict) -> str:
    note = f" × {train['processes']} processes" if train.get("processes", 1) > 1 else ""
    if train.get("resumed_from"):
        note += f"; resumed from {Path(train['resumed_from']).name} of the interrupted run"
    return note


def _spectral_rows(spectral: dict | None) -> list[Row]:
    if spectral is None:
        return []
    return [("intruder dims    ", f"{spectral['intruders_total']:.0f} in {spectral['layers_with_intruders']:.0f} layers "
             f"(lowest best-match similarity {spectral['intruders_min_similarity']:.2f}); table and plot under spectral/ in the run")]


def _merge_rows(merge: dict | None) -> list[Row]:
    if merge is None:
        return []
    steps = ", ".join(f"{c['step']}×{c['weight']:.2f}" for c in merge["checkpoints"])
    return [("checkpoint merge ", f"{merge['chosen']} registered ({merge['metric']} on validation: merged {merge['merged']:.4f}, "
             f"final {merge['final']:.4f}; steps×weights {steps})")]


def _promotion_rows(promotion: dict | None) -> list[Row]:
    if promotion is None:
        return []
    verdict = "promoted to @production" if promotion["promoted"] else "not promoted"
    return [("promotion gate   ", f"{verdict}: {promotion['reason']}")]


def _init_report_rows(init: dict) -> list[Row]:
    """Per-layer ranks, the spectrum plot and, for a race, its table, from the init report."""
    report = json.loads(Path(init["report_path"]).read_text())
    ranks = list(report.get("ranks", {}).values())
    rows: list[Row] = []
    if ranks:
        rows.append(("init ranks       ", f"{min(ranks)}–{max(ranks)} per layer over {len(ranks)} layers (sum {sum(ranks)})"))
    if "min_explained_variance" in report.get("checks", {}):
        share = report["checks"]["min_explained_variance"]
        rows.append(("init variance    ", f"kept components explain ≥ {share:.3f} of each layer's input variance"))
    if init.get("plot_path"):
        rows.append(("init spectrum    ", init["plot_path"]))
    if init.get("race_path"):
        race = Path(init["race_path"]).read_text().rstrip()
        rows += [(None, ""), (None, "init race (cut only on a validation-loss gap beyond its noise):"), (None, race), (None, "")]
    return rows


def init_text(init: dict) -> str:
    """The init's seconds; a race's are its contenders' inits and rounds, not the winner's init alone."""
    if init.get("race_contenders") is None:
        return f"{init['method']} in {init['seconds']:.2f} s (cache {init['cache']})"
    return (f"{init['method']} at lr {init['learning_rate']:g} won a race of {init['race_contenders']} contenders in "
            f"{init['seconds']:.1f} s ({init['race_extra_steps']} extra steps)")


def _race_note(init: dict) -> str:
    return "" if init.get("race_path") is None else f"; table: {init['race_path']}"


def _script(name: str) -> str:
    """The console script installed beside this interpreter, so the command works without activating the venv."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


# --- registry commands ----------------------------------------------------------------------------


def promotion_lines(model_name: str, decision, production_alias: str) -> list[str]:
    if decision.promoted:
        verdict = f"promoted version {decision.candidate} to @{production_alias}"
    else:
        verdict = f"kept @{production_alias}: version {decision.candidate} refused"
    lines = [f"{model_name}: {verdict}", f"  {decision.reason}"]
    if decision.forgetting:
        check = decision.forgetting
        lines.append(f"  forgetting set {check['file']}: candidate {check['candidate']:.4f}, production {check['incumbent']:.4f}")
    return [redact_text(line) for line in lines]


def show_status(name: str, state) -> None:
    if not sys.stdout.isatty():
        print(status_text(name, state))
        return
    _rich_status(name, state)


def status_text(name: str, state) -> str:
    """state: a registry_queries.ModelStatus."""
    lines = [f"{name}", f"aliases   {_aliases(state.aliases)}", "versions"]
    for record in state.versions:
        init, data, metrics, note = _version_cells(record)
        lines.append(f"  v{record.version:<4} init {init:<8} data {data}  {metrics}{note and '  ' + note}")
    lines.append("history")
    lines += [f"  {e['when']:<26} {e['action']:<9} v{e.get('from')} → v{e['to']}  {e.get('reason', '')}" for e in state.history]
    if not state.history:
        lines.append("  no promotion yet")
    return redact_text("\n".join(lines))


def lineage_rows(name: str, info) -> list[Row]:
    """info: a registry_queries.Lineage."""
    import yaml

    from adapterflow.redact import redact_values
    from adapterflow.tasks.registry_tags import metric_text

    tags = info.tags
    files = [(None, f"  {split:<10} {info.data_paths.get(split, '?')}  md5 {md5}") for split, md5 in sorted(tags.split_md5s.items())]
    return [
        (None, f"{name} version {info.version}  (MLflow run {info.run_id}, experiment {info.experiment_id})"),
        ("data md5 (DVC)  ", f"{tags.data_md5}"),
        *files,
        ("git commit      ", f"{tags.git_commit}"),
        ("base model      ", f"{tags.base_model}"),
        ("init method     ", f"{tags.init_method}"),
        ("config hash     ", f"{tags.config_hash}"),
        ("metrics         ", "  ".join(f"{k}={metric_text(v)}" for k, v in sorted(tags.metrics.items()))),
        ("compared        ", "; ".join(_comparison(e) for e in info.comparisons) or "never (not promoted or refused yet)"),
        (None, "config:"),
        (None, yaml.safe_dump(redact_values(info.config), sort_keys=False).rstrip()),  # a version logged before redaction
    ]


def _comparison(event: dict) -> str:
    against = f"production v{event['from']}" if event.get("from") else "the base model"
    scores = f" ({event['metric']} {event['candidate']:.4f} vs {event['incumbent']:.4f})" if "metric" in event else ""
    return f"{event['when']} {event['action']} against {against}{scores}"


def _aliases(aliases) -> str:
    return ", ".join(f"@{alias} → v{version}" for alias, version in sorted(aliases.items())) or "none"


def _version_cells(record) -> tuple[str, str, str, str]:
    """init method, data md5 (short), metrics, note: one version's row in `status`."""
    from adapterflow.tasks.registry_tags import INCOMPLETE, metric_text

    tags = record.tags
    metrics = "  ".join(f"{k}={metric_text(v)}" for k, v in sorted(tags.metrics.items()))
    note = "(registration incomplete: never staged)" if record.registration == INCOMPLETE else ""
    return tags.init_method or "?", (tags.data_md5 or "?")[:8], metrics, note


# --- rich, on a terminal ----------------------------------------------------------------------------


def _console():
    from rich.console import Console  # imported here: piped output never needs it

    return Console(highlight=False)


def _rich_rows(rows: list[Row]) -> None:
    from rich.table import Table

    console, grid = _console(), None
    for label, text in rows:
        if label is None or label == HEADING:
            if grid is not None:
                console.print(grid)
                grid = None
            if label == HEADING:
                console.rule(Text(text, style="bold"))
            else:
                console.print(text, markup=False)
            continue
        if grid is None:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold cyan", no_wrap=True)
            grid.add_column()
        grid.add_row(label.strip(), _coloured(label, text))
    if grid is not None:
        console.print(grid)


def _coloured(label: str, text: str):
    styles = {"registered": "bold green", "promotion gate": "green" if text.startswith("promoted") else "yellow"}
    return Text(text, style=styles.get(label.strip(), ""))


def _rich_status(name: str, state) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{name}[/bold]  aliases {_aliases(state.aliases)}")
    versions = Table("version", "init", "data md5", "metrics", "registration", title="versions", title_justify="left")
    for record in state.versions:
        init, data, metrics, note = _version_cells(record)
        registration = Text("incomplete: never staged", style="red") if note else ""
        versions.add_row(f"v{record.version}", init, data, metrics.replace("  ", "\n"), registration)
    console.print(versions)
    history = Table("when", "action", "from → to", "reason", title="history", title_justify="left")
    for event in state.history:
        before = f"v{event['from']}" if event.get("from") else "base"
        history.add_row(event["when"], event["action"], f"{before} → v{event['to']}", redact_text(event.get("reason", "")))
    console.print(history if state.history else "history: no promotion yet")
