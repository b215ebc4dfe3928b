"""Pipeline overhead: the demo config through the whole flow vs the same training as a plain script.

Each runs as a fresh process, one after the other, on this machine: the flow on a fresh state
folder (databases and DVC repo created) once, then the plain script and the flow again on that
state (a scheduled retrain), alternating, N times. Target: flow <= 1.10x the plain script.
Usage: python bench/overhead.py [--config configs/demo.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, ADAPTERFLOW_HOME=f"{tmp}/state", HF_HUB_OFFLINE="1", PREFECT_HOME=f"{tmp}/state/prefect")
        env.pop("PREFECT_API_URL", None)
        cold, _ = timed([sys.executable, "-m", "adapterflow.flows.cli", "run", args.config], env)  # fresh state: DBs created
        plain, warm = [], []
        for repeat in range(args.repeats):
            seconds, plain_out = timed([sys.executable, "bench/plain_demo.py", args.config, f"{tmp}/plain{repeat}"], env)
            plain.append(seconds)
            # A retrain on the warm state; --force, or it would skip (same config and data as @staging).
            seconds, flow_out = timed([sys.executable, "-m", "adapterflow.flows.cli", "run", args.config, "--force"], env)
            warm.append(seconds)
    report(cold, plain, warm, plain_out, flow_out)


def report(cold: float, plain: list[float], warm: list[float], plain_out: str, flow_out: str) -> None:
    print(plain_out.strip().splitlines()[-1])
    print("\n".join(line for line in flow_out.splitlines() if line.startswith(("metrics", "stage seconds", "training"))))
    paired = sorted(w / p for p, w in zip(plain, warm))
    print(f"\nplain transformers+peft script     : {', '.join(f'{s:.1f}' for s in plain)} s")
    print(f"adapterflow run, second run (warm) : {', '.join(f'{s:.1f}' for s in warm)} s")
    print(f"adapterflow run, fresh state (cold): {cold:.1f} s   ratio to the median plain run {cold / statistics.median(plain):.3f}")
    print(f"warm ratio: best {min(warm) / min(plain):.3f} (best vs best), paired {', '.join(f'{r:.3f}' for r in paired)}, "
          f"median {statistics.median(paired):.3f}")
    print("target: ratio <= 1.10")


if __name__ == "__main__":
    main()
