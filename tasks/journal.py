"""The training journal: what the training process reports, as JSON lines in the run folder.

The training process never talks to a server. Rank 0 appends one line per event to
`progress.jsonl`; the flow process follows the file to draw progress and to ship the metrics to
MLflow on its own thread. A file, not a pipe or MLflow's in-memory async queue: it survives an
outage of any length and a crash of either process, so `adapterflow register RUN_DIR` can still
ship what was never sent.

Records: {"event": "begin", "max_steps", "time"}, {"event": "step", "step", "max_steps", "time"}
(at most one a second, between logs), {"event": "log", "step", "metrics", "time"} (metric names
as MLflow shows them: train/loss, eval/loss, ...), {"event": "end", "step", "time"}.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

JOURNAL_FILE = "progress.jsonl"
STOP_FILE = "stop.request"  # written beside the journal by a sweep pruning the trial: training stops at its next step
STEP_RECORD_SECONDS = 1.0


class TrainingJournal(TrainerCallback):
    """Appends the training's events to the journal, on rank 0 only; a line is flushed as it is written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.last_step_record = 0.0
        self.last_time, self.last_step = time.perf_counter(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_step = time.perf_counter(), state.global_step
        self._write(state, {"event": "begin", "step": state.global_step, "max_steps": state.max_steps})

    def on_step_end(self, args, state, control, **kwargs):
        if (self.path.parent / STOP_FILE).exists():
            control.should_training_stop = True
        now = time.monotonic()
        if now - self.last_step_record >= STEP_RECORD_SECONDS:
            self.last_step_record = now
            self._write(state, {"event": "step", "step": state.global_step, "max_steps": state.max_steps})

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {metric_name(k): float(v) for k, v in (logs or {}).items() if _finite_number(v)}
        now, step = time.perf_counter(), state.global_step
        if step > self.last_step and "train/loss" in values:
            samples = (step - self.last_step) * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            values["train/samples_per_second"] = samples / max(now - self.last_time, 1e-9)
            self.last_time, self.last_step = now, step
        if values:
            self._write(state, {"event": "log", "step": step, "max_steps": state.max_steps, "metrics": values})

    def on_train_end(self, args, state, control, **kwargs):
        self._write(state, {"event": "end", "step": state.global_step, "max_steps": state.max_steps})

    def _write(self, state, record: dict) -> None:
        if not state.is_world_process_zero:
            return
        with open(self.path, "a") as journal:
            journal.write(json.dumps({**record, "time": time.time()}) + "\n")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_name(key: str) -> str:
    if key.startswith("eval_"):
        return "eval/" + key.removeprefix("eval_")
    if key.startswith("train_"):  # the end-of-training summary (mean loss, runtime)
        return "train/final_" + key.removeprefix("train_")
    return "train/" + key


def read_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """The complete lines after byte `offset`, and the offset after the last complete one.

    A line still being written (no newline yet) is left for the next read.
    """
    try:
        with open(path, "rb") as journal:
            journal.seek(offset)
            chunk = journal.read()
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    records = [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]
    return records, offset + end


class JournalFollower:
    """Reads new journal records every `interval` seconds on a thread and hands them to each sink.

    A sink has `records(list[dict])` and `close()`. A failing sink is dropped with one notice; it
    never stops the others or the training it watches.
    """

    def __init__(self, path: Path, sinks: list, interval: float = 0.5, say=print):
        import contextvars
        import threading

        self.path, self.sinks, self.interval, self.say = Path(path), list(sinks), interval, say
        self.offset = 0
        self._stop = threading.Event()
        # The caller's context (Prefect's run context): what the sinks publish is attached to the run that follows.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name="journal-follower", daemon=True)

    def __enter__(self) -> "JournalFollower":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # what was written after the last poll
        for sink in list(self.sinks):
            self._call(sink, "close")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        records, self.offset = read_records(self.path, self.offset)
        if records:
            for sink in list(self.sinks):
                self._call(sink, "records", records)

    def _call(self, sink, method: str, *args) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as err:  # a progress display or dashboard must never break training
            if sink in self.sinks:
                self.sinks.remove(sink)
            self.say(f"progress: {type(sink).__name__} stopped ({type(err).__name__}: {err})")
