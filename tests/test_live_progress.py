"""A run you can watch: stage lines and a training bar on a terminal, step lines in a log, nothing but the summary
under --quiet; the Prefect UI gets a progress artifact and the MLflow link; MLflow gets every metric point."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from conftest import ROOT, cls_config, run_cli, write_config

pytestmark = pytest.mark.e2e
STEPS = 12
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
STAGES = ["validate", "track", "initialize", "train", "evaluate", "spectral", "register"]


def _config(tmp_path, tiny_bert, cls_data) -> Path:
    overrides = {"train.max_steps": STEPS, "train.log_every": 2, "train.checkpoint_every": STEPS}
    return write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **overrides))


def _run_in_pty(args: list[str], home: Path) -> list[tuple[float, str]]:
    """The CLI with a pseudo-terminal as stdin, stdout and stderr; what it wrote, chunk by chunk, with arrival times."""
    from prefect.settings import PREFECT_API_URL

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # rows, columns: the bar fits on a line
    env = dict(os.environ, ADAPTERFLOW_HOME=str(home), PREFECT_API_URL=PREFECT_API_URL.value() or "", TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    process = subprocess.Popen([sys.executable, "-m", "adapterflow.flows.cli", *args], cwd=ROOT, env=env,
                               stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other end has closed it
                break
            if not data:
                break
            chunks.append((time.monotonic(), data.decode(errors="replace")))
        assert process.wait(timeout=60) == 0, "".join(text for _, text in chunks)[-4000:]
    finally:
        process.kill()
        os.close(master)
    return chunks


def _position(text: str, pattern: str) -> int:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text[-6000:]}"
    return match.start()


def test_a_terminal_shows_stage_lines_in_order_and_a_live_training_bar(prefect_server, tmp_path, tiny_bert, cls_data):
    chunks = _run_in_pty(["run", str(_config(tmp_path, tiny_bert, cls_data))], tmp_path / "state")
    screen = ANSI.sub("", "".join(text for _, text in chunks)).replace("\r", "\n")
    starts = [_position(screen, rf"{stage}\s+started") for stage in STAGES]
    ends = [_position(screen, rf"{stage}\s+done in [\d.]+ s") for stage in STAGES]
    assert starts == sorted(starts) and all(start < end for start, end in zip(starts, ends))
    assert _position(screen, r"adapterflow: .*run\.yaml checked \(sequence_classification, init lora\); starting the flow") < _position(
        screen, r"adapterflow: tiny-cls from .*run\.yaml; Prefect flow run '") < starts[0]
    assert _position(screen, r"mlflow\s+run [0-9a-f]{32}: http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]{32} once `") < starts[2]
    assert re.search(r"validate\s+done in [\d.]+ s: 84 rows passed \d+ checks \(train 48, validation 18, test 18\)", screen)
    assert re.search(r"initialize\s+done in [\d.]+ s: lora in [\d.]+ s \(cache miss\)", screen)
    assert re.search(r"register\s+done in [\d.]+ s: tiny-cls-adapter version 1 @staging", screen)
    # The bar, with its step count and loss, is drawn while the run goes on: before evaluation starts.
    bar = _position(screen, rf"train .*\b{STEPS}/{STEPS}\b.*loss \d\.\d{{4}}")
    assert starts[3] < bar < starts[4]
    assert _position(screen, r"adapterflow: tiny-cls done in \d+ s") > ends[-1]  # the summary comes last


def test_without_a_terminal_the_log_gets_step_lines_and_stdout_the_summary_alone(
    prefect_server, tmp_path, tiny_bert, cls_data, monkeypatch
):
    from mlflow.tracking import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter, LogFilterFlowRunId

    home = tmp_path / "state"
    monkeypatch.delenv("PREFECT_LOGGING_LEVEL", raising=False)  # as a user's shell has it: the CLI sets its own default
    result = run_cli("run", str(_config(tmp_path, tiny_bert, cls_data)), home=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("\n== adapterflow: tiny-cls done in") and "started" not in result.stdout
    steps = re.findall(r"^\d\d:\d\d:\d\d train  step (\d+)/12 \((\d+)%\)  loss \d\.\d{4}  lr ", result.stderr, re.M)
    assert steps and steps[-1] == ("12", "100"), result.stderr
    assert [int(step) for step, _ in steps] == sorted(int(step) for step, _ in steps)
    assert re.search(r"^\d\d:\d\d:\d\d train\s+done in [\d.]+ s: 12 steps on cpu, loss", result.stderr, re.M), result.stderr
    assert "| INFO" not in result.stderr, result.stderr  # Prefect's own task-run chatter stays out of the default view

    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    run_id = re.search(r"mlflow run\s+([0-9a-f]{32})", result.stdout).group(1)
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [2, 4, 6, 8, 10, 12]  # every point shipped by the time the flow registered

    with get_client(sync_client=True) as prefect:
        keys = ArtifactFilter(key=ArtifactFilterKey(any_=["training-progress", "mlflow-run"]))
        artifacts = prefect.read_artifacts(artifact_filter=keys)
        (link,) = [a for a in artifacts if a.key == "mlflow-run" and f"/runs/{run_id}" in a.data]
        assert link.data.startswith("[MLflow run ") and link.flow_run_id is not None  # Prefect stores a link as markdown
        (progress,) = [a for a in artifacts if a.key == "training-progress" and a.flow_run_id == link.flow_run_id]
        assert progress.type == "progress" and float(progress.data) == 100.0
        logs = prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[link.flow_run_id])))
    said = [log.message for log in logs]  # the Prefect UI's log of the run moves as the terminal does
    assert any("train  step 12/12 (100%)" in line for line in said) and any(line.startswith("register") for line in said), said


def test_quiet_prints_the_summary_only(prefect_server, tmp_path, tiny_bert, cls_data):
    result = run_cli("run", "--quiet", str(_config(tmp_path, tiny_bert, cls_data)), home=tmp_path / "state")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("\n== adapterflow: tiny-cls done in")
    assert "started" not in result.stderr and "train  step" not in result.stderr and "done in" not in result.stderr, result.stderr


def test_the_init_race_reports_each_round(tiny_bert, cls_data, tmp_path, capsys):
    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.model_io import resolve_base

    init = {"method": "auto", "candidates": ["lora", "pissa"], "lr_multipliers": [0.1, 1.0], "budget": 0.1}
    config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": init, "train.max_steps": 80}))
    initialize_adapter(config, resolve_base(config.model), tmp_path / "run", tmp_path / "cache")
    rounds = re.findall(r"^\d\d:\d\d:\d\d init race  round (\d+) \(step (\d+)\): (\d) of 4 contenders still in; (.+)$",
                        capsys.readouterr().err, re.M)
    # 8 extra steps for the 3 that lose: round 1 gives each contender 1 step, round 2 (doubling, as far as they pay) 1 more.
    assert [(number, step) for number, step, _, _ in rounds][:2] == [("1", "1"), ("2", "2")]
    for _, _, alive, standings in rounds:
        losses = [float(entry.rsplit(" ", 1)[1].split("±")[0]) for entry in standings.split(", ")]
        assert len(losses) == int(alive) and losses == sorted(losses)  # the standings of those still in, best first


@pytest.mark.parametrize("init", [{"method": "eva"}, {"method": "lora_ga", "batches": 3}])
def test_the_initialize_stage_reports_its_calibration_batches(tiny_bert, cls_data, tmp_path, capsys, monkeypatch, init):
    """In the flow's process, as init_stage runs it: plain lines (no terminal here), the last one at the total."""
    from adapterflow.flows import progress
    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.model_io import resolve_base

    monkeypatch.setattr(progress, "CALIBRATION_EVERY_SECONDS", 0.0)  # every pass, not one per 2 s
    config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": init}))
    initialize_adapter(config, resolve_base(config.model), tmp_path / "run", tmp_path / "cache")
    lines = re.findall(r"^\d\d:\d\d:\d\d initialize calibration batch (.+)$", capsys.readouterr().err, re.M)
    if init["method"] == "lora_ga":
        assert lines == ["1/3 (lora_ga)", "2/3 (lora_ga)", "3/3 (lora_ga)"]
    else:  # EVA cycles its batches until its components converge: open-ended counts, then the total it took
        passes = len(lines) - 1
        assert passes >= 2 and lines == [f"{n} (eva, until converged)" for n in range(1, passes + 1)] + [f"{passes}/{passes} (eva)"]


def test_verbose_adds_the_libraries_logs(prefect_server, tmp_path, tiny_bert, cls_data):
    result = run_cli("run", "--verbose", str(_config(tmp_path, tiny_bert, cls_data)), home=tmp_path / "state")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\| INFO\s+\| Flow run '.+' - Finished in state Completed", result.stderr), result.stderr  # Prefect's own
    assert re.search(r"register\s+done in", result.stderr) and result.stdout.startswith("\n== adapterflow: tiny-cls done in")
