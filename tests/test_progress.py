"""Progress from the journal: plain lines at a steady pace, a bar with step counts, percentages for Prefect."""

import io
import re

from rich.console import Console

from adapterflow.flows import progress
from adapterflow.flows.progress import (
    CalibrationBar,
    CalibrationLines,
    PlainLines,
    PrefectProgressArtifact,
    TerminalBar,
    calibration_display,
    duration,
)


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


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_calibration_lines_come_every_two_seconds_and_always_the_last():
    lines, clock = [], _Clock()
    hook = CalibrationLines("lora_ga", emit=lines.append, clock=clock)
    for done in range(1, 9):
        clock.now += 0.7
        hook(done, 8)
    hook.close()
    assert lines == [f"initialize calibration batch {n}/8 (lora_ga)" for n in (3, 6, 8)]  # 2.1 s, 4.2 s, the last


def test_open_ended_calibration_counts_until_converged_then_ends_at_its_total():
    lines, clock = [], _Clock()
    hook = CalibrationLines("eva", emit=lines.append, clock=clock)
    for done in range(1, 6):
        clock.now += 1.0
        hook(done, None)
    hook(5, 5)
    hook.close()
    assert lines == ["initialize calibration batch 2 (eva, until converged)", "initialize calibration batch 4 (eva, until converged)",
                     "initialize calibration batch 5/5 (eva)"]


def test_calibration_close_says_where_an_interrupted_pass_stopped():
    lines = []
    hook = CalibrationLines("corda", "sample", emit=lines.append, clock=_Clock())
    hook(1, 128)
    hook(2, 128)
    hook.close()
    assert lines == ["initialize calibration sample 2/128 (corda)"]


def test_calibration_bar_draws_counts_in_place():
    out = io.StringIO()
    bar = CalibrationBar("eva", console=Console(file=out, force_terminal=True, width=160))
    for done in range(1, 4):
        bar(done, None)
    bar(3, 3)
    bar.close()
    text = out.getvalue()
    assert "initialize calibration batches" in text and "3/3" in text and "(eva)" in text


def test_calibration_display_follows_the_output_mode(monkeypatch, capsys):
    monkeypatch.setattr(progress, "CALIBRATION_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    for mode, expected in (("quiet", []), ("normal", ["1/2", "2/2"])):
        monkeypatch.setenv(progress.OUTPUT_ENV, mode)
        display = calibration_display("lora_sb")
        display(1, 2)
        display(2, 2)
        display.close()
        assert re.findall(r"initialize calibration batch (\S+) \(lora_sb\)$", capsys.readouterr().err, re.M) == expected


def test_a_failing_calibration_display_is_dropped_with_one_notice(monkeypatch, capsys):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(CalibrationLines, "__call__", lambda self, done, total: 1 / 0)
    display = calibration_display("eva")
    display(1, None)
    display(2, None)
    display.close()
    assert capsys.readouterr().err.count("progress: CalibrationLines stopped (ZeroDivisionError") == 1


def test_accelerate_startup_says_it_starts_then_every_five_seconds_until_the_first_journal_record(tmp_path):
    from adapterflow.tasks.launch import WorkerStartup

    journal = tmp_path / "progress.jsonl"
    journal.write_text('{"event": "end", "step": 4, "time": 1.0}\n')  # a resumed run's journal: old records do not count
    lines, clock = [], _Clock()
    startup = WorkerStartup(journal, 2, lines.append, clock=clock)
    seen = []
    for _ in range(25):  # 12.5 s of polls every 0.5 s; the workers' first record after 11 s
        clock.now += 0.5
        if clock.now == 11.0:
            with open(journal, "a") as handle:
                handle.write('{"event": "begin", "step": 0, "max_steps": 8, "time": 2.0}\n')
        seen.append(startup.poll())
    assert lines == ["train      starting 2 accelerate workers…", "train      still starting 2 accelerate workers (5 s so far)",
                     "train      still starting 2 accelerate workers (10 s so far)"]
    assert seen.index(True) == 21 and all(seen[21:])


def test_a_fast_accelerate_startup_says_one_line(tmp_path):
    import subprocess
    import sys

    from adapterflow.tasks.launch import WorkerStartup, wait_reporting_startup

    lines = []
    startup = WorkerStartup(tmp_path / "progress.jsonl", 1, lines.append)
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert wait_reporting_startup(process, startup, interval=0.05) == 3
    assert lines == ["train      starting 1 accelerate worker…"]
