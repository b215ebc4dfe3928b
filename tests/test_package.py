"""One installable package: everything imports as adapterflow.*, nothing as a bare flows/tasks/adapters."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, cls_config, write_config

DECOYS = ("adapters", "tasks", "flows")


@pytest.mark.slow  # starts a fresh interpreter
def test_the_wheel_installs_only_the_adapterflow_package(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("adapterflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"adapterflow"}
    for module in ("flows/cli.py", "tasks/config.py", "adapters/registry.py", "adapters/methods/pissa.py"):
        assert f"adapterflow/{module}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "adapterflow = adapterflow.flows.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _decoy_path(tmp_path: Path) -> Path:
    """Top-level modules named like ours, as AdapterHub's `adapters` would be: importing one fails loudly."""
    folder = tmp_path / "decoys"
    for name in DECOYS:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('the decoy top-level {name!r} was imported')\n")
    return folder


@pytest.mark.slow
def test_cli_and_flow_work_with_decoy_top_level_modules_first_on_the_path(prefect_server, tmp_path, tiny_bert, cls_data):
    from prefect.settings import PREFECT_API_URL

    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **{"train.max_steps": 2, "evaluate.intruders": None}))
    env = dict(os.environ, PYTHONPATH=str(_decoy_path(tmp_path)), ADAPTERFLOW_HOME=str(tmp_path / "state"),
               PREFECT_API_URL=PREFECT_API_URL.value() or "")
    probe = subprocess.run([sys.executable, "-c", "import adapters"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "decoy top-level 'adapters' was imported" in probe.stderr  # the decoys really are first

    for args in (["check", str(config)], ["run", str(config)]):
        result = subprocess.run([sys.executable, "-m", "adapterflow", *args], capture_output=True, text=True, env=env,
                                cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "decoy" not in result.stdout + result.stderr
    assert "registered       tiny-cls-adapter version 1  alias @staging" in result.stdout
