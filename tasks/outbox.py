"""What a run could not tell MLflow while its server was down, kept in the run folder until it can.

Every write the flow makes to its MLflow run after the run is created (metrics, artifacts, tags,
the dataset input, the final status) is an operation here. It is applied at once when the server
answers; otherwise it is appended to `tracking.outbox.jsonl` in the run folder, and applied, in
order, the next time a write finds the server back, or by `adapterflow register RUN_DIR`.
Artifacts are referenced by path: they are files of the run folder, which the run keeps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

OUTBOX_FILE = "tracking.outbox.jsonl"


def metrics_op(metrics: dict[str, float], time_ms: int, step: int = 0) -> dict:
    return {"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "time": time_ms, "step": step}


def artifact_op(path: Path | str, folder: str | None = None) -> dict:
    return {"op": "artifact", "path": str(path), "folder": folder}


def tag_op(key: str, value: str) -> dict:
    return {"op": "tag", "key": key, "value": value}


def dataset_op(dataset: dict, tags: dict[str, str]) -> dict:
    """`dataset`: the fields of MLflow's Dataset entity (name, digest, source_type, source, schema, profile)."""
    return {"op": "dataset", "dataset": dataset, "tags": tags}


def terminate_op(status: str) -> dict:
    return {"op": "terminate", "status": status}


def apply(mlflow_client, run_id: str, op: dict) -> None:
    """One operation, through MLflow's client; raises whatever the client raises."""
    kind = op["op"]
    if kind == "metrics":
        from mlflow.entities import Metric

        metrics = [Metric(key, value, op["time"], op["step"]) for key, value in op["metrics"].items()]
        mlflow_client.log_batch(run_id, metrics=metrics)
    elif kind == "artifact":
        mlflow_client.log_artifact(run_id, op["path"], op["folder"])
    elif kind == "tag":
        mlflow_client.set_tag(run_id, op["key"], op["value"])
    elif kind == "dataset":
        from mlflow.entities import Dataset, DatasetInput, InputTag

        tags = [InputTag(key, value) for key, value in op["tags"].items()]
        mlflow_client.log_inputs(run_id, datasets=[DatasetInput(Dataset(**op["dataset"]), tags=tags)])
    elif kind == "terminate":
        mlflow_client.set_terminated(run_id, op["status"])
    else:
        raise ValueError(f"unknown outbox operation {kind!r}")


class Outbox:
    def __init__(self, run_dir: Path | str):
        self.path = Path(run_dir) / OUTBOX_FILE

    def add(self, ops: list[dict]) -> None:
        with open(self.path, "a") as handle:
            handle.writelines(json.dumps(op) + "\n" for op in ops)
            handle.flush()
            os.fsync(handle.fileno())  # a kill after this line loses nothing the run has said it deferred

    def pending(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def replay(self, mlflow_client, run_id: str) -> int:
        """Applies the pending operations in order; the ones not applied (an error stops it) stay. Returns how
        many were applied. Applying one twice (a kill between applying and rewriting) is harmless: MLflow keeps
        one copy of an equal metric point, tag or artifact."""
        ops = self.pending()
        for done, op in enumerate(ops):
            try:
                apply(mlflow_client, run_id, op)
            except BaseException:
                self._keep(ops[done:])
                raise
        self._keep([])
        return len(ops)

    def _keep(self, ops: list[dict]) -> None:
        if not ops:
            self.path.unlink(missing_ok=True)
            return
        partial = self.path.with_suffix(".partial")
        partial.write_text("".join(json.dumps(op) + "\n" for op in ops))
        partial.replace(self.path)
