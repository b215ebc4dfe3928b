"""Shared fixtures: an isolated state folder, tiny models built from config, tiny data, one Prefect harness;
and the process helpers tests that start servers share (free ports, waiting, stopping a process group)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["games", "science", "sound"]
WORDS = {
    "games": "play level player arcade puzzle board score adventure".split(),
    "science": "physics chemistry molecule simulation data astronomy lab".split(),
    "sound": "audio music mixer synth volume midi playback".split(),
}

_LIBRARY_HOMES = ("PREFECT_HOME", "HF_HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")  # prepare_environment's


def _worker_home() -> None:
    """Under pytest-xdist each worker gets a state folder of its own: the workers inherit the environment this
    module set in the controller (one ADAPTERFLOW_HOME, PREFECT_HOME, ...), and must not share those folders."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = os.environ.get("ADAPTERFLOW_HOME")
    if not worker or not shared or os.environ.get("ADAPTERFLOW_TESTS_WORKER") == worker:
        return
    own = Path(shared) / f"xdist-{worker}"
    for key in _LIBRARY_HOMES:  # set from the shared home in the controller: recomputed from this worker's
        if os.environ.get(key, "").startswith(str(Path(shared).resolve())):
            del os.environ[key]
    os.environ.update(ADAPTERFLOW_HOME=str(own), ADAPTERFLOW_TESTS_WORKER=worker)


_worker_home()
_session_home = Path(os.environ.setdefault("ADAPTERFLOW_HOME", str(Path(__import__("tempfile").mkdtemp(prefix="adapterflow-tests-")))))
from adapterflow.tasks.state import prepare_environment  # noqa: E402

prepare_environment(offline=True)


SLOW_FIXTURES = {"prefect_server"}  # a test that starts the Prefect harness pays its ~20 s boot


KERNEL_FLAGS = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")  # they pick bitsandbytes' CPU kernels


def pytest_report_header(config) -> str:
    """Which CPU the suite ran on: bitsandbytes takes another 4-bit path where AVX512-BF16 is present."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "cpu flags: unknown (no /proc/cpuinfo)"
    present = [flag for flag in KERNEL_FLAGS if flag in flags]
    return f"cpu flags: {' '.join(present) or 'none of ' + ', '.join(KERNEL_FLAGS)}"


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook, which names the groups where it can
def pytest_collection_modifyitems(config, items):
    """Whole-flow tests and tests on the Prefect harness are slow whether or not they say so.
    On pytest-xdist workers the slow tests come first, so no long test starts last while the other workers idle."""
    for item in items:
        if item.get_closest_marker("e2e") or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts its collection alike: the controller compares them
        _name_xdist_groups(config, items)
        items.sort(key=_start_order)


def _name_xdist_groups(config, items) -> None:
    """--dist loadgroup keeps a group on one worker by the '@group' suffix pytest-xdist gives its tests' node ids. xdist 3.8
    writes the suffix to a field pytest 9.2 no longer reads, so the groups were silently split over the workers
    (pytest-dev/pytest-xdist#1386, fix pending in #1388); here the suffix goes where pytest 9.2 reads a node id.
    A test without its suffix (an xdist or pytest that already does this) is left as it is."""
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # a pytest before 9.2: xdist's own suffix works
        return
    if not config.getvalue("loadgroup"):
        return
    for item in items:
        groups = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                         for mark in item.iter_markers("xdist_group")})
        already = item.nodeid.rfind("@") > item.nodeid.rfind("]")
        if groups and not already and isinstance(getattr(item, "_id", None), NodeId):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")


# The longest tests, longest first (seconds measured on 3 workers on 2 busy cores); then the other e2e tests, then the slow ones.
LONGEST_FIRST = (
    "test_infra.py::test_retrain_against_native_servers",  # ~300 s, and ~25 s for the services' start
    "test_secrets.py::",  # ~300 s
    "test_mlflow_ui.py::",  # ~190 s
    "test_launch.py::test_killed_training",  # ~190 s
    "test_promote.py::test_promotion_lifecycle",  # ~150 s
    "test_bench.py::",  # ~120 s
    "test_concurrency.py::test_a_live_run",  # ~95 s
    "test_live_progress.py::test_verbose",  # ~90 s
    "test_promote.py::test_a_crash_during_registration",  # ~85 s
)


# Not marked slow, yet as long as many e2e tests (training and calibration in the test's own process): started with them.
LONG_UNMARKED = (
    "test_adapters.py::test_corda_depends", "test_adapters.py::test_init_preserves_outputs_and_adapter_reloads_on_untouched_base[eva",
    "test_adapters.py::test_init_preserves_outputs_and_adapter_reloads_on_untouched_base[corda", "test_race.py::test_race_trains",
    "test_bnb_cpu_paths.py::test_training_resumes", "test_bnb_cpu_paths.py::test_the_final_evaluation",
    "test_quantized.py::test_quantized_base_trains", "test_gradient_inits.py::test_gradient_inits_train",
)


def _start_order(item) -> int:
    name = item.nodeid.split("/")[-1]
    for rank, prefix in enumerate(LONGEST_FIRST):
        if name.startswith(prefix):
            return rank
    if item.get_closest_marker("e2e") or name.startswith(LONG_UNMARKED):
        return len(LONGEST_FIRST)
    return len(LONGEST_FIRST) + (1 if item.get_closest_marker("slow") else 2)


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """A test's own mlflow.set_tracking_uri() must not reach the next test's subprocesses."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from adapterflow.tasks.tiny_models import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from adapterflow.tasks.tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def folders(tiny_bert, tiny_llama) -> dict[str, Path]:
    """The tiny models by architecture name (tests/tiny_inits.ARCHS)."""
    return {"bert": tiny_bert, "llama": tiny_llama}


def classification_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = LABELS[i % len(LABELS)]
        words = rng.choices(WORDS[label], k=8)
        rows.append({"text": f"{' '.join(words)} item {seed}-{i}", "label": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def cls_data(tmp_path) -> dict[str, Path]:
    return {
        "train": write_csv(tmp_path / "train.csv", classification_rows(48, 1)),
        "validation": write_csv(tmp_path / "validation.csv", classification_rows(18, 2)),
        "test": write_csv(tmp_path / "test.csv", classification_rows(18, 3)),
    }


def cls_config(model_dir: Path, data: dict[str, Path], **overrides) -> dict:
    config = {
        "name": "tiny-cls",
        "task": "sequence_classification",
        "model": {"path": str(model_dir)},
        "data": {
            "train": str(data["train"]), "validation": str(data["validation"]), "test": str(data["test"]),
            "labels": LABELS, "max_length": 24, "checks": {"min_rows": 10},
        },
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"], "init": {"method": "lora"}},
        # In the flow's process: the accelerate subprocess costs ~10 s of imports per run, paid only by
        # the tests that exercise it (test_launch.py, the main e2e test).
        "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 0.01, "checkpoint_every": 2, "log_every": 1,
                  "launch": {"mode": "in_process"}},
        "evaluate": {"split": "test", "batch_size": 16},
        "registry": {"model_name": "tiny-cls-adapter"},
    }
    for dotted, value in overrides.items():
        target = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    return config


def sft_config(model_dir: Path, train: Path, max_length: int = 64, **data):
    """A validated causal-LM config reading `train` for both splits, for encoding tests (no run)."""
    from adapterflow.tasks.config import RunConfig

    return RunConfig.model_validate({
        "name": "sft", "task": "causal_lm", "model": {"path": str(model_dir)},
        "data": {"train": str(train), "validation": str(train), "max_length": max_length, **data},
        "train": {"max_steps": 1}, "evaluate": {"split": "validation"}, "registry": {"model_name": "m"},
    })


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: a separate process, against the test Prefect server."""
    import sys

    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, ADAPTERFLOW_HOME=str(home), PREFECT_API_URL=PREFECT_API_URL.value() or "")
    command = [sys.executable, "-m", "adapterflow.flows.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def free_ports(count: int = 1) -> list[int]:
    """Distinct free loopback ports: all held open at once while the OS picks them."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll until `predicate()` returns something truthy (an OSError counts as not yet); return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            found = predicate()
            if found:
                return found
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_process_group(process: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the process's group (servers fork workers), SIGKILL whatever outlives the grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=grace)
