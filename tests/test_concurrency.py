"""Two runs at once, as a cron schedule and a manual run produce them: each process started beside the other.

What a version records is what it trained on: its md5 tags, its DVC md5s and its run folder's copy of
the data agree, whatever the other run or the user does to the files meanwhile. A live run's
checkpoints are never taken over; a dead run's are resumed. Fresh embedded stores are created once.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, classification_rows, cls_config, run_cli, wait_for, write_config, write_csv

MODEL_NAME = "tiny-cls-adapter"
SPLITS = ("train", "validation", "test")
ONE_THREAD = {"train.threads": 1}  # two runs share the machine's cores


def _md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _client(home: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _data(folder: Path, seed: int) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"train": 48, "validation": 18, "test": 18}
    return {split: write_csv(folder / f"{split}.csv", classification_rows(sizes[split], seed + i)) for i, split in enumerate(SPLITS)}


def _start_cli(*args: str, home: Path) -> subprocess.Popen:
    """`adapterflow` in its own process group (so a test can kill the flow and everything it started)."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, ADAPTERFLOW_HOME=str(home), PREFECT_API_URL=PREFECT_API_URL.value() or "")
    command = [sys.executable, "-m", "adapterflow.flows.cli", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate(timeout=60)


def _together(*commands: tuple[str, ...], home: Path) -> list[subprocess.CompletedProcess]:
    """The CLI commands started at the same moment, each in its own process; their results in order."""
    results, start = [None] * len(commands), threading.Barrier(len(commands))

    def run(index: int) -> None:
        start.wait()
        results[index] = run_cli(*commands[index], home=home)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(commands))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    from adapterflow.tasks.resume import complete_checkpoints

    return complete_checkpoints(run_dir / "checkpoints")


def _run_dir_of(client, version) -> Path:
    """The run folder a version was trained in: its dataset input names the run's copy of the train split."""
    dataset = client.get_run(version.run_id).inputs.dataset_inputs[0].dataset
    return Path(json.loads(dataset.source)["uri"].removeprefix("file://")).parents[1]


def _assert_records_what_it_trained_on(home: Path, client, version, run_dir: Path) -> dict[str, str]:
    """The version's md5 tags = md5 of the run folder's copy of each split = DVC's md5s of that version."""
    from adapterflow.tasks.registry_tags import VersionTags

    tags = VersionTags.from_tags(version.tags)
    trained_on = {split: _md5(run_dir / "data" / f"{split}.csv") for split in SPLITS}
    assert dict(tags.split_md5s) == trained_on
    run = client.get_run(version.run_id)
    assert run.data.tags["adapterflow.data_md5"] == tags.data_md5
    assert run.inputs.dataset_inputs[0].dataset.digest == trained_on["train"]
    import yaml

    pinned = yaml.safe_load((run_dir / "data" / "tiny-cls.dvc").read_text())["outs"][0]["md5"]
    assert pinned.removesuffix(".dir") == tags.data_md5
    manifest = home / "dvc" / "repo" / ".dvc" / "cache" / "files" / "md5" / pinned[:2] / pinned[2:]
    assert {Path(e["relpath"]).stem: e["md5"] for e in json.loads(manifest.read_text())} == trained_on
    return trained_on


@pytest.mark.e2e
def test_two_runs_of_one_name_with_different_files_each_record_the_bytes_they_trained_on(prefect_server, tmp_path, tiny_bert):
    """On a fresh state folder: both create the MLflow store and the DVC repo, and neither reports the other's data."""
    home = tmp_path / "state"
    first, second = _data(tmp_path / "first", seed=1), _data(tmp_path / "second", seed=11)
    configs = [write_config(tmp_path / f"{name}.yaml", cls_config(tiny_bert, data, **ONE_THREAD))
               for name, data in (("first", first), ("second", second))]
    results = _together(("run", str(configs[0])), ("run", str(configs[1])), home=home)
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "cannot be reached" not in result.stderr and "Traceback" not in result.stderr

    client = _client(home)
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert len(versions) == 2
    recorded = []
    for version in versions:
        run_dir = _run_dir_of(client, version)
        recorded.append(_assert_records_what_it_trained_on(home, client, version, run_dir)["train"])
    assert sorted(recorded) == sorted(_md5(data["train"]) for data in (first, second))


@pytest.mark.e2e
def test_a_file_changed_mid_run_changes_nothing_trained_or_recorded(prefect_server, tmp_path, tiny_bert):
    home = tmp_path / "state"
    data = _data(tmp_path / "data", seed=1)
    original = {split: _md5(path) for split, path in data.items()}
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, data, **ONE_THREAD))
    flow = _start_cli("run", str(config), home=home)
    try:
        # The run has copied its last split: from here on, the user's files are someone else's business.
        copied = data["test"].stat().st_size
        _wait_while_running(flow, lambda: any(p.stat().st_size == copied for p in home.glob("runs/*/data/test.csv")),
                            "the run's copy of its splits", interval=0.01)
        for i, path in enumerate(data.values()):
            write_csv(path, classification_rows(16, 100 + i))  # other rows, and a third of the train split's size
        out, err = flow.communicate(timeout=300)
    finally:
        if flow.poll() is None:
            _kill(flow)
    assert flow.returncode == 0, err
    assert all(_md5(path) != original[split] for split, path in data.items())

    client = _client(home)
    version = client.get_model_version_by_alias(MODEL_NAME, "staging")
    run_dir = _run_dir_of(client, version)
    assert _assert_records_what_it_trained_on(home, client, version, run_dir) == original
    report = json.loads((run_dir / "validation" / "validation_report.json").read_text())
    assert report["row_counts"] == {"train": 48, "validation": 18, "test": 18}  # validated: the copy, not the new files
    epochs = [entry["epoch"] for entry in json.loads((run_dir / "train_log.json").read_text()) if "epoch" in entry]
    assert epochs[-1] == pytest.approx(4 / 6, abs=0.01)  # 4 steps of 8 rows over 48 rows; the new 16 rows would be 2 epochs


@pytest.mark.e2e
def test_a_live_run_is_never_resumed_and_a_killed_one_is(prefect_server, tmp_path, tiny_bert, cls_data):
    """The reported race: a second run of the same config took over a live run's checkpoints, which the first rotated away."""
    from adapterflow.tasks.journal import JOURNAL_FILE, read_records
    from adapterflow.tasks.resume import KEY_FILE, interrupted_checkpoint, is_alive

    home = tmp_path / "state"
    endless = {**ONE_THREAD, "train.max_steps": 100_000, "train.checkpoint_every": 5}
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **endless))
    first = _start_cli("run", str(config), home=home)
    second = None
    try:
        first_dir = _wait_while_running(first, lambda: next(iter(_complete_checkpoints_in(home)), None),
                                        "the first run's first checkpoint").parents[1]
        second = _start_cli("run", str(config), home=home)  # the same config, data and base: the same resume key
        second_dir = _wait_while_running(
            second, lambda: next((d for d in (home / "runs").iterdir() if d != first_dir and _complete_checkpoints(d)), None),
            "the second run's first checkpoint",
        )
        assert first.poll() is None and second.poll() is None
        assert is_alive(first_dir) and is_alive(second_dir)
    finally:
        for process in (first, second):
            if process is not None:
                _kill(process)

    client = _client(home)
    assert len(client.search_runs([client.get_experiment_by_name("tiny-cls").experiment_id])) == 2
    for run_dir in (first_dir, second_dir):  # each trained from step 1: the second did not continue the first's checkpoints
        # The run's journal, not MLflow: a killed run's last metrics may not have been shipped yet.
        records, _ = read_records(run_dir / JOURNAL_FILE, 0)
        assert min(r["step"] for r in records if r["event"] == "log") == 1

    assert not is_alive(first_dir) and not is_alive(second_dir)  # SIGKILL: the OS released both locks
    rerun = home / "runs" / "tiny-cls-99991231-235959-rerun"  # a third run, after both died
    rerun.mkdir()
    key = json.loads((second_dir / KEY_FILE).read_text())
    resumed = interrupted_checkpoint(rerun, key, "tiny-cls")
    newest = max(_complete_checkpoints(second_dir), key=lambda c: int(c.name.split("-")[-1]))
    assert resumed == str(newest)  # the newest dead run with this key, from its last complete checkpoint


def _wait_while_running(process: subprocess.Popen, predicate, what: str, interval: float = 0.1):
    """`wait_for`, failing at once with the process's output if it ends first."""

    def found_or_ended():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the run ended (exit code {process.returncode}) before {what}:\n{err[-3000:]}")
        return predicate()

    return wait_for(found_or_ended, 240, what, interval=interval)


def _complete_checkpoints_in(home: Path) -> list[Path]:
    return [checkpoint for run_dir in home.glob("runs/*") for checkpoint in _complete_checkpoints(run_dir)]


def _script(setup: str, work: str, home: Path) -> subprocess.Popen:
    """A Python process that runs `setup` (imports), says "ready" and waits for a line on stdin, then runs `work`;
    on a state folder of its own, with no Prefect server configured."""
    code = (
        "import sys\n"
        "from adapterflow.tasks.state import prepare_environment\n"
        "prepare_environment(offline=True)\n"
        f"{setup}\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        f"{work}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(ADAPTERFLOW_HOME=str(home))
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _both(setup: str, work: str, home: Path) -> list[str]:
    """Two processes, their `work` started at the same moment once both have done their imports; their outputs."""
    processes = [_script(setup, work, home) for _ in range(2)]
    for process in processes:
        assert process.stdout.readline().strip() == "ready", process.communicate(timeout=60)[0]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = [process.communicate(timeout=240)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
    return outputs


@pytest.mark.slow
def test_two_processes_on_a_fresh_state_folder_create_the_mlflow_store_once(tmp_path):
    """Before the lock, one of the two failed 3 times in 3 with "table experiments already exists" or "duplicate column"."""
    home = tmp_path / "state"
    setup = "from adapterflow.tasks.server_health import check_reachable"
    work = f"check_reachable('sqlite:///{home}/mlflow/mlflow.db')\nprint('reachable')"
    for output in _both(setup, work, home):
        assert "reachable" in output and "cannot be reached" not in output


@pytest.mark.slow
def test_two_processes_on_a_fresh_state_folder_create_the_prefect_database_once(tmp_path):
    """Two ephemeral Prefect servers on one fresh database: without the lock one server's startup fails
    ("duplicate column name", "UNIQUE constraint failed") and prints its traceback before Prefect starts another."""
    home = tmp_path / "state"
    setup = (
        "import prefect.server.api.server\n"
        "from prefect import flow\n"
        "from adapterflow.tasks.embedded_store import prepare_prefect_store\n"
        "@flow(name='probe')\n"
        "def probe():\n"
        "    return 42"
    )
    work = "prepare_prefect_store()\nprint('result', probe())"
    for output in _both(setup, work, home):
        assert "result 42" in output
        assert "Traceback" not in output and "Application startup failed" not in output
    assert (home / "prefect" / "prefect.db.prepared").is_file()


def test_the_snapshot_is_hashed_as_it_is_copied_and_dvc_must_agree_with_it(tmp_path, cls_data):
    from adapterflow.errors import DataError
    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.version_data import _check_integrity, snapshot_splits

    config = RunConfig.model_validate(cls_config(tmp_path / "model", cls_data))
    run_dir = tmp_path / "runs" / "tiny-cls-1"
    run_dir.mkdir(parents=True)
    snapshot = snapshot_splits(config, run_dir)
    assert snapshot.md5s == {split: _md5(cls_data[split]) for split in SPLITS}
    assert {split: _md5(getattr(snapshot.config.data, split)) for split in SPLITS} == snapshot.md5s
    assert snapshot.config.data.train == str(run_dir / "data" / "train.csv") and config.data.train == str(cls_data["train"])
    assert snapshot.naming_sources(f"cannot parse {snapshot.config.data.test}: x") == f"cannot parse {cls_data['test']}: x"
    _check_integrity(dict(snapshot.md5s), snapshot.md5s, "tiny-cls")
    with pytest.raises(DataError, match="data integrity check failed for tiny-cls: .*train: DVC 0+, run "):
        _check_integrity({**snapshot.md5s, "train": "0" * 32}, snapshot.md5s, "tiny-cls")


def test_a_dvc_error_never_shows_a_credential(tmp_path):
    from adapterflow.errors import DataError
    from adapterflow.tasks.version_data import _dvc

    with pytest.raises(DataError) as failed:
        _dvc(tmp_path, "remote", "add", "-f", "-d", "adapterflow", "s3://key:SENTINEL-SECRET@minio.example/bucket")
    assert "SENTINEL-SECRET" not in str(failed.value) and "s3://key:***@minio.example/bucket" in str(failed.value)
