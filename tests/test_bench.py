"""The GPU benchmark rows run end to end on CPU (`--dry-run`), so `make gpu-check` works on its first GPU."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.e2e


def test_the_gpu_throughput_4bit_row_runs_on_cpu_as_a_dry_run():
    # The 4-bit row only: it runs every step the bf16 row does, plus quantization (both rows take ~100 s here).
    command = [sys.executable, "bench/throughput.py", "--gpu", "--dry-run", "--rows", "nf4"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "config tiny Llama (dry run), nf4" in result.stdout
    (ratios,) = re.findall(r"ratio: throughput ([\d.]+)x \(target >= 0.97\), peak memory ([\d.]+)x", result.stdout)
    (plain,) = re.findall(r"plain transformers \+ peft Trainer\s+([\d.]+)\s+(\d+)", result.stdout)
    (ours,) = re.findall(r"adapterflow train step\s+([\d.]+)\s+(\d+)", result.stdout)
    # The printed ratios are the two sides' own measurements divided, not placeholders.
    assert float(ratios[0]) == pytest.approx(float(ours[0]) / float(plain[0]), abs=2e-3), result.stdout
    assert float(ratios[1]) == pytest.approx(int(ours[1]) / int(plain[1]), rel=2e-2), result.stdout
    assert float(plain[0]) > 0 and int(plain[1]) > 100, result.stdout  # a process that imported torch holds > 100 MB
