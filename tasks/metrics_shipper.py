"""Ship the training journal's metrics to MLflow from the flow process: an outage delays them, never loses them.

The byte offset of the journal already sent is kept beside it (`progress.shipped`), so a later
`adapterflow register RUN_DIR` sends only what is left. MLflow drops a metric point it already
has (same key, step, time and value), so a batch resent after a cut-off answer does no harm.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from adapterflow.redact import redact_uri
from adapterflow.tasks.journal import JOURNAL_FILE, read_records
from adapterflow.tasks.outages import OUTAGES, Outages, mlflow_answers

SHIPPED_FILE = "progress.shipped"
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


class MetricsShipper:
    """Sends every journal metric not yet sent; an outage is reported once when it starts and once when it ends
    (through `say` when given, else the process's outage report)."""

    def __init__(self, run_dir: Path, uri: str, run_id: str, say: Callable[[str], None] | None = None):
        self.journal, self.shipped_file = Path(run_dir) / JOURNAL_FILE, Path(run_dir) / SHIPPED_FILE
        self.uri, self.run_id = uri, run_id
        self.outages = Outages(say) if say else OUTAGES
        self.service = f"MLflow at {redact_uri(uri)}"
        self.offset = _read_offset(self.shipped_file)
        self._client = None

    def ship(self) -> bool:
        """True when everything written so far has reached MLflow; False while it does not answer."""
        records, end = read_records(self.journal, self.offset)
        for batch, batch_end in _batches(records, self.offset, end):
            if batch and not self._send(batch):
                return False
            self._advance(batch_end)
        return True

    def pending(self) -> bool:
        return read_records(self.journal, self.offset)[1] > self.offset

    def drain(self, seconds: float, poll: float = 1.0) -> bool:
        """Keep trying for up to `seconds`; True when nothing is left unsent."""
        deadline = time.monotonic() + seconds
        while not self.ship():
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True

    def _send(self, batch: list) -> bool:
        if not self._server_answers():
            self._outage(len(batch))
            return False
        try:
            self._mlflow().log_batch(self.run_id, metrics=batch)
        except Exception:  # any transport or server error: the points stay in the journal for the next try
            self._outage(len(batch))
            return False
        self._recovered()
        return True

    def _server_answers(self) -> bool:
        """A quick /health first: MLflow's client retries a dead server for minutes before it gives up."""
        return mlflow_answers(self.uri)

    def _outage(self, points: int) -> None:
        self.outages.down(self.service, f"training goes on; its metrics wait in {self.journal}")

    def _recovered(self) -> None:
        self.outages.up(self.service)

    def _advance(self, offset: int) -> None:
        self.offset = offset
        self.shipped_file.write_text(str(offset))

    def _mlflow(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client


def _batches(records: list[dict], start: int, end: int):
    """(metrics, offset after them) in batches of whole records; the last batch ends at `end`."""
    from mlflow.entities import Metric

    batch: list = []
    for record in records:
        if record.get("event") != "log":
            continue
        points = [Metric(key, float(value), int(record["time"] * 1000), int(record["step"])) for key, value in record["metrics"].items()]
        if batch and len(batch) + len(points) > MAX_METRICS_PER_BATCH:
            yield batch, start  # offsets of whole records are not tracked mid-chunk: resending is harmless
            batch = []
        batch.extend(points)
    yield batch, end


def _read_offset(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


class ShipperSink:
    """The shipper as a journal sink (tasks/journal.py JournalFollower): it ships as records arrive, backing off
    while the server is away so the other sinks are not slowed by its probes; at the end it keeps trying for
    `drain_seconds` at most, and what is still unsent stays in the journal for `adapterflow register`."""

    def __init__(self, shipper: MetricsShipper, drain_seconds: float = 5.0, max_backoff: float = 30.0):
        self.shipper, self.drain_seconds, self.max_backoff = shipper, drain_seconds, max_backoff
        self.backoff, self.next_try = 0.0, 0.0

    def records(self, records: list[dict]) -> None:
        if time.monotonic() < self.next_try or not (self.backoff or any(r.get("event") == "log" for r in records)):
            return  # waiting out a backoff, or only step records arrived: nothing new to send
        if self.shipper.ship():
            self.backoff = 0.0
        else:
            self.backoff = min(max(2 * self.backoff, 1.0), self.max_backoff)
            self.next_try = time.monotonic() + self.backoff

    def close(self) -> None:
        # In an outage one last try: waiting out the drain would only make the train stage end later (measured:
        # 5 s of a 17 s training), and registration ships what is left anyway.
        self.shipper.drain(0.0 if self.backoff else self.drain_seconds)
