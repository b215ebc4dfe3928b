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
    ratios = re.findall(r"ratio: throughput ([\d.]+)x \(target >= 0.97\), peak memory ([\d.]+)x", result.stdout)
    assert len(ratios) == 1 and float(ratios[0][0]) > 0 and float(ratios[0][1]) > 0, result.stdout
