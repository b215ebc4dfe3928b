"""Pipeline overhead: the demo config through the whole flow vs the same training as a plain script.

Each runs as a fresh process, one after the other, on this machine: the plain script, the flow on a
fresh state folder (databases and DVC repo created), and the flow again on that state (a retrain).
Target: flow <= 1.10x the plain script. Usage: python bench/overhead.py [configs/demo.yaml]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "configs/demo.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, ADAPTERFLOW_HOME=f"{tmp}/state", HF_HUB_OFFLINE="1", PREFECT_HOME=f"{tmp}/state/prefect")
        env.pop("PREFECT_API_URL", None)
        plain, plain_out = timed([sys.executable, "bench/plain_demo.py", config, f"{tmp}/plain"], env)
        cold, _ = timed([sys.executable, "-m", "flows.cli", "run", config], env)  # fresh state: DBs created
        # A retrain on the warm state; --force, or it would skip (same config and data as @staging).
        warm, flow_out = timed([sys.executable, "-m", "flows.cli", "run", config, "--force"], env)
    print(plain_out.strip().splitlines()[-1])
    print("\n".join(line for line in flow_out.splitlines() if line.startswith(("metrics", "stage seconds", "training"))))
    print(f"\nplain transformers+peft script     : {plain:7.1f} s")
    print(f"adapterflow run, fresh state (cold): {cold:7.1f} s   ratio {cold / plain:.3f}   overhead {cold - plain:+.1f} s")
    print(f"adapterflow run, second run (warm) : {warm:7.1f} s   ratio {warm / plain:.3f}   overhead {warm - plain:+.1f} s")
    print("target: ratio <= 1.10")


if __name__ == "__main__":
    main()
