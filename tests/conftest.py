"""Shared fixtures: an isolated state folder, tiny models built from config, tiny data, one Prefect harness."""

from __future__ import annotations

import json
import os
import random
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

_session_home = Path(os.environ.setdefault("ADAPTERFLOW_HOME", str(Path(__import__("tempfile").mkdtemp(prefix="adapterflow-tests-")))))
from adapterflow.tasks.state import prepare_environment  # noqa: E402

prepare_environment(offline=True)


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


def run_cli(*args: str, home: Path) -> "subprocess.CompletedProcess":
    """The CLI as a user runs it: a separate process, against the test Prefect server."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, ADAPTERFLOW_HOME=str(home), PREFECT_API_URL=PREFECT_API_URL.value() or "")
    return subprocess.run([sys.executable, "-m", "adapterflow.flows.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
