"""Live training progress drawn from the training journal (tasks/journal.py), in three places.

- a terminal: a rich progress bar on stderr (step/total, loss, learning rate, samples/s, ETA);
- anywhere else (cron, CI, a Prefect worker): one plain line every tenth of the steps or every
  `every_seconds`, whichever comes first, so a log shows the run moving;
- the Prefect UI: a progress artifact that moves with training.
Each is a journal sink: `records(list)` and `close()`.

And the lines a run says as it goes (`say`): stage starts and ends, notices, and the calibration batches a
data-driven initializer runs before training (`calibration_display`, given to it as its progress hook). They go to stderr (stdout
keeps the summary scripts read) and to the Prefect run's log, through their own logger: Prefect's
own INFO chatter stays off (PREFECT_LOGGING_LEVEL=WARNING) while these lines pass.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar

PLAIN_EVERY_SECONDS = 30.0
CALIBRATION_EVERY_SECONDS = 2.0  # plain calibration lines: at most this often, and always the last
ARTIFACT_EVERY_SECONDS = 5.0
OUTPUT_ENV = "ADAPTERFLOW_OUTPUT"  # quiet | normal | verbose: `adapterflow run --quiet/--verbose`; served runs: normal
LOGGER_NAME = "adapterflow.progress"
# A sweep's trials share one terminal: each trial's lines start with its label, and no live bar is drawn.
LINE_PREFIX: ContextVar[str] = ContextVar("adapterflow_line_prefix", default="")


def output_mode() -> str:
    mode = os.environ.get(OUTPUT_ENV, "normal")
    return mode if mode in ("quiet", "normal", "verbose") else "normal"


def on_terminal() -> bool:
    return sys.stderr.isatty()


_terminal_console = None


def terminal_console():
    """One rich console on stderr for the bar and the lines: a line printed while the bar is live lands above it."""
    global _terminal_console
    if _terminal_console is None:
        from rich.console import Console

        _terminal_console = Console(stderr=True, highlight=False)
    return _terminal_console


class _UserLines(logging.Handler):
    """stderr: through the shared console on a terminal, else as a timestamped line (a log file, a Prefect worker's log)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if on_terminal():
                terminal_console().print(text, markup=False, soft_wrap=True)
            else:
                sys.stderr.write(f"{time.strftime('%H:%M:%S')} {text}\n")
                sys.stderr.flush()
        except Exception:
            self.handleError(record)


def progress_logger() -> logging.Logger:
    """The logger `say` writes to: the terminal's lines (warnings only under --quiet) and the Prefect run's log."""
    from adapterflow.redact import RedactingFilter

    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        logger.setLevel(logging.INFO)
        logger.propagate = False  # not also through Prefect's console handler on the root logger
        for handler in (_UserLines(), _PrefectRunLog()):
            handler.addFilter(RedactingFilter())
            logger.addHandler(handler)
    logger.handlers[0].setLevel(logging.WARNING if output_mode() == "quiet" else logging.INFO)
    return logger


class _PrefectRunLog(logging.Handler):
    """Prefect's API log handler for records that name their flow run; outside a run there is nowhere to send them."""

    def __init__(self):
        super().__init__()
        self.api = None

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, "flow_run_id", None):
            return
        if self.api is None:
            from prefect.logging.handlers import APILogHandler  # imported when a run speaks, not with the CLI

            self.api = APILogHandler()
        self.api.handle(record)


def say(text: str, level: int = logging.INFO, prefix: str | None = None) -> None:
    """`prefix`: the trial's label, given where the caller's thread may not carry the context (the journal's follower)."""
    progress_logger().log(level, (LINE_PREFIX.get() if prefix is None else prefix) + text, extra={"flow_run_id": _flow_run_id()})


def notice(text: str) -> None:
    """A notice (an outage, a stopped display): shown even under --quiet."""
    say(text, logging.WARNING)


def _flow_run_id():
    from prefect.context import FlowRunContext, TaskRunContext

    task_run = TaskRunContext.get()
    if task_run is not None:
        return task_run.task_run.flow_run_id
    flow_run = FlowRunContext.get()
    return flow_run.flow_run.id if flow_run is not None and flow_run.flow_run else None


def display_sink():
    """The live training display for this output mode: a bar on a terminal, plain lines elsewhere, none when quiet."""
    mode = output_mode()
    if mode == "quiet":
        return None
    prefix = LINE_PREFIX.get()  # read here, in the trial's thread: the journal's follower thread has no context
    if prefix:
        return PlainLines(lambda text: say(text, prefix=prefix))
    if on_terminal():
        return TerminalBar(terminal_console())
    return PlainLines(say)


def apply_verbosity() -> None:
    """--verbose: the libraries' own INFO logs as well (Prefect's, MLflow's, transformers', ...)."""
    if output_mode() != "verbose":
        return
    logging.getLogger().setLevel(logging.INFO)
    for name in ("prefect", "mlflow", "py.warnings", "transformers", "great_expectations", "accelerate"):
        logging.getLogger(name).setLevel(logging.INFO)


class TrainingProgress:
    """Step, total and the latest metrics, with the rate and ETA measured since training began here."""

    def __init__(self):
        self.step, self.max_steps, self.metrics, self.finished = 0, 0, {}, False
        self._start: tuple[float, int] | None = None

    def update(self, record: dict) -> None:
        self.step = int(record.get("step", self.step))
        self.max_steps = int(record.get("max_steps") or self.max_steps)
        if self._start is None or record["event"] == "begin":
            self._start = (float(record.get("time", time.time())), self.step)
        if record["event"] == "log":
            self.metrics = {**self.metrics, **record["metrics"]}
        self.finished = self.finished or record["event"] == "end"

    def eta_seconds(self, now: float | None = None) -> float | None:
        if self._start is None or self.step <= self._start[1] or not self.max_steps:
            return None
        elapsed = (now or time.time()) - self._start[0]
        return elapsed / (self.step - self._start[1]) * max(self.max_steps - self.step, 0)

    def stats(self) -> str:
        parts = []
        if "train/loss" in self.metrics:
            parts.append(f"loss {self.metrics['train/loss']:.4f}")
        if "train/learning_rate" in self.metrics:
            parts.append(f"lr {self.metrics['train/learning_rate']:.2e}")
        if "train/samples_per_second" in self.metrics:
            parts.append(f"{self.metrics['train/samples_per_second']:.1f} samples/s")
        if "eval/loss" in self.metrics:
            parts.append(f"eval loss {self.metrics['eval/loss']:.4f}")
        return "  ".join(parts)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class PlainLines:
    """A line per tenth of the steps or per `every_seconds`, whichever first; always one at the end."""

    def __init__(self, emit: Callable[[str], None], every_seconds: float = PLAIN_EVERY_SECONDS):
        self.emit, self.every_seconds, self.progress = emit, every_seconds, TrainingProgress()
        self._last: tuple[float, int] = (time.monotonic(), 0)

    def records(self, records: list[dict]) -> None:
        for record in records:
            self.progress.update(record)
        step, now = self.progress.step, time.monotonic()
        every_steps = max(1, self.progress.max_steps // 10)
        if step > self._last[1] and (step - self._last[1] >= every_steps or now - self._last[0] >= self.every_seconds):
            self._line()

    def close(self) -> None:
        if self.progress.step > self._last[1]:
            self._line()

    def _line(self) -> None:
        progress = self.progress
        share = f" ({100 * progress.step // progress.max_steps}%)" if progress.max_steps else ""
        parts = [f"train  step {progress.step}/{progress.max_steps or '?'}{share}", progress.stats()]
        if not progress.finished:
            parts.append(f"eta {duration(progress.eta_seconds())}")
        self.emit("  ".join(part for part in parts if part))
        self._last = (time.monotonic(), progress.step)


class TerminalBar:
    """rich's progress bar on stderr, redrawn as records arrive; the finished bar stays on screen."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.state = TrainingProgress()
        self.bar = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TextColumn("eta"),
            TimeRemainingColumn(), console=console or Console(stderr=True), transient=False,
        )
        self.task = None

    def records(self, records: list[dict]) -> None:
        for record in records:
            self.state.update(record)
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.state.max_steps or None, stats="")
        self.bar.update(self.task, completed=self.state.step, total=self.state.max_steps or None, stats=self.state.stats())

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


class PrefectProgressArtifact:
    """A Prefect progress artifact (0-100) updated at most every `every_seconds`, and at the end."""

    def __init__(self, key: str, description: str, every_seconds: float = ARTIFACT_EVERY_SECONDS):
        self.key, self.description, self.every_seconds = key, description, every_seconds
        self.progress, self.artifact_id, self._last = TrainingProgress(), None, 0.0

    def records(self, records: list[dict]) -> None:
        for record in records:
            self.progress.update(record)
        if self.artifact_id is None or time.monotonic() - self._last >= self.every_seconds or self.progress.finished:
            self._publish()

    def close(self) -> None:
        self._publish()

    def percent(self) -> float:
        progress = self.progress
        if progress.finished:
            return 100.0
        return round(100.0 * progress.step / progress.max_steps, 1) if progress.max_steps else 0.0

    def _publish(self) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(self.percent(), key=self.key, description=self.description)
        else:
            update_progress_artifact(self.artifact_id, self.percent(), description=self.description)
        self._last = time.monotonic()


class CalibrationLines:
    """`initialize calibration batch 3/8 (eva)`: at most one line per `every_seconds`, and always the last.

    The hook a data-driven initializer calls after each calibration pass with (done, total); total None is an
    open-ended pass (EVA runs until its components converge), which ends with a call (done, done).
    """

    def __init__(self, method: str, unit: str = "batch", emit: Callable[[str], None] = say,
                 every_seconds: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.method, self.unit, self.emit, self.clock = method, unit, emit, clock
        self.every_seconds = CALIBRATION_EVERY_SECONDS if every_seconds is None else every_seconds
        self._last_time, self._said, self._pending = clock(), 0, None

    def __call__(self, done: int, total: int | None) -> None:
        self._pending = (done, total)
        if done == total or self.clock() - self._last_time >= self.every_seconds:
            self._line()

    def close(self) -> None:
        if self._pending and self._pending[0] > self._said:
            self._line()

    def _line(self) -> None:
        done, total = self._pending
        self.emit(calibration_line(self.method, self.unit, done, total))
        self._last_time, self._said = self.clock(), done


PLURALS = {"batch": "batches", "sample": "samples"}


def calibration_line(method: str, unit: str, done: int, total: int | None) -> str:
    if total is None:  # open-ended: the method stops when its estimate converges
        return f"{'initialize':<10} calibration {unit} {done} ({method}, until converged)"
    return f"{'initialize':<10} calibration {unit} {done}/{total} ({method})"


class CalibrationBar:
    """The calibration passes as a rich bar on the terminal, redrawn in place; it stays on screen when done."""

    def __init__(self, method: str, unit: str = "batch", console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn(f"{'initialize':<10} calibration {PLURALS.get(unit, unit)}"),
            BarColumn(), MofNCompleteColumn(), TextColumn(f"({method})"), TimeElapsedColumn(),
            console=console or Console(stderr=True), transient=False,
        )
        self.task = None

    def __call__(self, done: int, total: int | None) -> None:
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("calibration", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


class _NoCalibrationDisplay:
    def __call__(self, done: int, total: int | None) -> None:
        pass

    def close(self) -> None:
        pass


class _Guarded:
    """A display that fails is dropped with one notice: it must never break the initializer it watches."""

    def __init__(self, display):
        self.display = display

    def __call__(self, done: int, total: int | None) -> None:
        self._call(self.display, done, total)

    def close(self) -> None:
        self._call(getattr(self.display, "close", None))

    def _call(self, function, *args) -> None:
        if function is None:
            return
        try:
            function(*args)
        except Exception as err:
            notice(f"progress: {type(self.display).__name__} stopped ({type(err).__name__}: {err})")
            self.display = _NoCalibrationDisplay()


def calibration_display(method: str, unit: str = "batch"):
    """The calibration hook for this output mode: a bar on a terminal, plain lines elsewhere, nothing when quiet.

    Call it (done, total) from the initializer; `close()` when the initializer returns or fails.
    """
    if output_mode() == "quiet":
        return _NoCalibrationDisplay()
    if on_terminal() and not LINE_PREFIX.get():
        return _Guarded(CalibrationBar(method, unit, terminal_console()))
    return _Guarded(CalibrationLines(method, unit))
