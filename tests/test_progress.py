"""Progress from the journal: plain lines at a steady pace, a bar with step counts, percentages for Prefect."""

import io

from rich.console import Console

from adapterflow.flows.progress import PlainLines, PrefectProgressArtifact, TerminalBar, duration


def _records(steps: int, total: int = 100, start: float = 1000.0):
    yield {"event": "begin", "step": 0, "max_steps": total, "time": start}
    for step in range(1, steps + 1):
        metrics = {"train/loss": 2.0 / step, "train/learning_rate": 5e-4, "train/samples_per_second": 30.0}
        yield {"event": "log", "step": step, "max_steps": total, "time": start + step, "metrics": metrics}


def test_plain_lines_come_every_tenth_of_the_steps_with_loss_and_eta():
    lines = []
    sink = PlainLines(lines.append, every_seconds=3600)
    for record in _records(35):
        sink.records([record])
    sink.close()
    assert [line.split()[2] for line in lines] == ["10/100", "20/100", "30/100", "35/100"]
    assert "loss 0.2000" in lines[0] and "lr 5.00e-04" in lines[0] and "30.0 samples/s" in lines[0] and "eta" in lines[0]


def test_plain_lines_also_come_on_a_clock_when_steps_are_slow():
    lines = []
    sink = PlainLines(lines.append, every_seconds=0.0)
    for record in _records(3):
        sink.records([record])
    assert [line.split()[2] for line in lines] == ["1/100", "2/100", "3/100"]


def test_terminal_bar_shows_step_counts_and_loss():
    out = io.StringIO()
    bar = TerminalBar(Console(file=out, force_terminal=True, width=160))
    bar.records(list(_records(40)))
    bar.close()
    text = out.getvalue()
    assert "40/100" in text and "loss 0.0500" in text


def test_prefect_percentages_reach_100_at_the_end(monkeypatch):
    published = []
    monkeypatch.setattr(PrefectProgressArtifact, "_publish", lambda self: published.append(self.percent()))
    sink = PrefectProgressArtifact("training-progress", "demo", every_seconds=0.0)
    sink.records(list(_records(50)))
    sink.records([{"event": "end", "step": 100, "max_steps": 100, "time": 2000.0}])
    assert published[0] == 50.0 and published[-1] == 100.0


def test_durations_read_as_people_write_them():
    assert [duration(s) for s in (None, 7, 95, 3725)] == ["?", "7s", "1m35s", "1h02m"]
