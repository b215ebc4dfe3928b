"""A sweep in MLflow: one parent run whose child runs are the trials (tag mlflow.parentRunId), so the MLflow UI nests
them under it; the parent holds the sweep's settings, the trials' table and a parallel-coordinates plot, and names
the winner. The MLflow UI's own compare view (select the child runs → Compare) draws the same plot interactively.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from adapterflow.redact import redact_text
from adapterflow.tasks.sweep_plan import SweepPlan, TrialResult
from adapterflow.tasks.tracking import RunRef, _experiment_id, client, is_server


def open_sweep_run(config, uri: str, artifacts_root: Path, plan: SweepPlan, name: str, settings: dict[str, str]) -> RunRef:
    mlflow_client = client(uri)
    experiment_id = _experiment_id(mlflow_client, config.experiment_name(), None if is_server(uri) else artifacts_root)
    tags = {"adapterflow.sweep": name, "adapterflow.config_hash": config.digest()}
    run = mlflow_client.create_run(experiment_id, run_name=f"{config.name}-sweep-{name}", tags=tags)
    params = {"sweep.keys": ",".join(plan.keys), "sweep.trials": str(plan.size()),
              **{f"sweep.{key}": redact_text(value) for key, value in settings.items()}}
    for axis in plan.axes:
        params[f"sweep.grid.{axis.key}"] = ",".join(map(str, axis.values))
    for span in plan.spans:
        params[f"sweep.range.{span.key}"] = f"{span.low:g}:{span.high:g}:{span.scale}"
    for key, value in params.items():
        mlflow_client.log_param(run.info.run_id, key, value[:6000])
    return RunRef(uri, run.info.run_id, None, run.info.start_time)


def close_sweep_run(run: RunRef, results: list[TrialResult], metric: str, winner: TrialResult | None, version: str | None) -> None:
    mlflow_client = client(run.uri)
    rows = trial_rows(results, metric, winner)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.json"
        table.write_text(json.dumps(rows, indent=1, default=str))
        files = [table, Path(tmp) / "trials.md"]
        files[1].write_text(trials_markdown(rows, metric))
        plot = parallel_coordinates(rows, metric, Path(tmp) / "parallel_coordinates.png")
        for path in files + ([plot] if plot else []):
            mlflow_client.log_artifact(run.run_id, str(path), "sweep")
    finished = [r for r in results if r.ok]
    mlflow_client.log_metric(run.run_id, "sweep/trials_finished", len(finished))
    mlflow_client.log_metric(run.run_id, "sweep/trials_failed", sum(r.error is not None for r in results))
    mlflow_client.log_metric(run.run_id, "sweep/trials_pruned", sum(r.pruned for r in results))
    if winner is not None:
        mlflow_client.log_metric(run.run_id, f"sweep/best_{metric}", winner.metrics[metric])
        mlflow_client.set_tag(run.run_id, "adapterflow.sweep.winner", winner.label)
        mlflow_client.set_tag(run.run_id, "adapterflow.sweep.winner_run_id", winner.run_id or "")
        if version:
            mlflow_client.set_tag(run.run_id, "adapterflow.sweep.registered_version", version)
    mlflow_client.set_terminated(run.run_id, "FINISHED" if winner is not None else "FAILED")


def trial_rows(results: list[TrialResult], metric: str, winner: TrialResult | None) -> list[dict]:
    rows = []
    for r in sorted(results, key=lambda r: r.number):
        state = "winner" if r is winner else "failed" if r.error else "pruned" if r.pruned else "finished"
        rows.append({"trial": r.number, **r.params, metric: r.metrics.get(metric), "state": state, "seconds": round(r.seconds, 1),
                     "run_id": r.run_id, "error": r.error})
    return rows


def trials_markdown(rows: list[dict], metric: str) -> str:
    keys = [k for k in rows[0] if k not in ("trial", metric, "state", "seconds", "run_id", "error")] if rows else []
    lines = ["| trial | " + " | ".join(keys) + f" | {metric} | state | s |", "|---" * (len(keys) + 4) + "|"]
    for row in rows:
        value = row[metric]
        shown = f"{value:.4f}" if isinstance(value, float) else "—"
        state = row["state"] + (f": {row['error'].splitlines()[0][:120]}" if row["error"] else "")
        lines.append(f"| {row['trial']} | " + " | ".join(str(row[k]) for k in keys) + f" | {shown} | {state} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def parallel_coordinates(rows: list[dict], metric: str, out: Path) -> Path | None:
    """One line per finished trial across the swept keys and the metric, each axis scaled to its own range; numeric
    keys on a log axis when they span more than a decade (learning rates)."""
    finished = [row for row in rows if isinstance(row.get(metric), float) and math.isfinite(row[metric])]
    keys = [k for k in rows[0] if k not in ("trial", metric, "state", "seconds", "run_id", "error")] if rows else []
    if not finished or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [*keys, metric]
    positions = {key: _axis_positions([row[key] for row in finished]) for key in axes}
    figure, plot = plt.subplots(figsize=(2.2 * len(axes) + 2, 4))
    for index, row in enumerate(finished):
        ys = [positions[key][1][index] for key in axes]
        plot.plot(range(len(axes)), ys, marker="o", lw=3 if row["state"] == "winner" else 1.2,
                  color="tab:red" if row["state"] == "winner" else "tab:blue", alpha=0.9 if row["state"] == "winner" else 0.5)
    for x, key in enumerate(axes):
        plot.axvline(x, color="grey", lw=0.8)
        for label, y in positions[key][0]:
            plot.annotate(label, (x, y), xytext=(4, 0), textcoords="offset points", fontsize=7, va="center")
    plot.set_xticks(range(len(axes)), [key.rsplit(".", 1)[-1] for key in axes])
    plot.set_yticks([])
    plot.set_title(f"sweep trials (red: the winner, registered); {metric} on the right")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def _axis_positions(values: list) -> tuple[list[tuple[str, float]], list[float]]:
    """(tick labels with their heights, each value's height in [0, 1])."""
    numbers = [_number(v) for v in values]
    if all(n is not None for n in numbers):
        logged = min(numbers) > 0 and max(numbers) / min(numbers) > 10
        scaled = [math.log10(n) if logged else n for n in numbers]
        low, high = min(scaled), max(scaled)
        heights = [(v - low) / (high - low) if high > low else 0.5 for v in scaled]
        ticks = sorted({(f"{n:.3g}", h) for n, h in zip(numbers, heights)}, key=lambda t: t[1])
        return ticks, heights
    labels = sorted({str(v) for v in values})
    place = {label: (i / (len(labels) - 1) if len(labels) > 1 else 0.5) for i, label in enumerate(labels)}
    return [(label, place[label]) for label in labels], [place[str(v)] for v in values]


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
