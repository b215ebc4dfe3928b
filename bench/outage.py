"""Training time with the MLflow server killed mid-training vs healthy, side by side in one run (issue 18: within 5%).

A real `mlflow server` (SQLite backend) serves both sides. "killed": once the training's journal reaches
a fifth of its steps the server gets SIGKILL, and it is started again `--outage` seconds later or once training
has ended, whichever is later (restarting it on the same cores mid-training would charge its start-up CPU to the
outage). The
number compared is the train stage's seconds as the run reports them. Pairs alternate in order
(healthy/killed, then killed/healthy, ...) so drift in the machine's load falls on both sides alike.
Also printed: whether each killed run registered without deferring, and the outage length it reported.

Usage: python bench/outage.py [--config configs/demo.yaml] [--outage 20] [--repeats 2]
  (default config: a tiny BERT built here, 2000 steps: ~30 s of training on 2 quiet cores)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a run config (its tracking.mlflow_uri is replaced by the bench's server)")
    parser.add_argument("--outage", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adapterflow-outage-bench-") as tmp:
        work = Path(tmp)
        server = Server(work / "mlflow")
        server.start()
        try:
            config = _config(work, args.config, server.uri)
            ratios = []
            for pair in range(args.repeats):
                order = ("healthy", "killed") if pair % 2 == 0 else ("killed", "healthy")
                seconds = {side: _run(side, config, work / f"home-{pair}-{side}", server, args.outage) for side in order}
                ratios.append(seconds["killed"] / seconds["healthy"])
                print(f"pair {pair + 1}: train seconds healthy {seconds['healthy']:.1f}, killed {seconds['killed']:.1f}, "
                      f"ratio {ratios[-1]:.3f}")
        finally:
            server.kill()
    print(f"median training-time ratio, server killed / healthy: {statistics.median(ratios):.3f} over {len(ratios)} pairs")


def _run(side: str, config: Path, home: Path, server: Server, outage: float) -> float:
    env = dict(os.environ, ADAPTERFLOW_HOME=str(home))
    env.pop("PREFECT_API_URL", None)
    # --force: both sides share one server, whose @staging would otherwise make every run after the first a skip.
    process = subprocess.Popen([str(BIN / "adapterflow"), "run", str(config), "--force"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, cwd=ROOT)
    if side == "killed":
        _wait_for_step(home, lambda step, total: step >= total // 5, process)
        server.kill()
        deadline = time.monotonic() + outage
        # Down for `outage` seconds and at least until training ends: a server restarting on the same 2 cores
        # takes CPU from training, which is this machine's layout, not the outage's cost.
        while time.monotonic() < deadline or not _ended(home):
            time.sleep(0.5)
        server.start()
    output = process.communicate()[0]
    if process.returncode != 0:
        raise SystemExit(f"{side} run failed ({process.returncode}):\n{output[-3000:]}")
    if side == "killed":
        reported = re.findall(r"is back after (\d+) s", output)
        print(f"  killed run: registered without deferring; outage reported as {reported} s")
    return float(re.search(r"train +done in ([\d.]+) s", output).group(1))


def _journal(home: Path) -> list[dict]:
    found = list((home / "runs").glob("*/progress.jsonl")) if (home / "runs").exists() else []
    return [json.loads(line) for line in found[0].read_text().splitlines()] if found else []


def _wait_for_step(home: Path, reached, process) -> int:
    while process.poll() is None:
        records = [r for r in _journal(home) if "step" in r and r.get("max_steps")]
        if records and reached(records[-1]["step"], records[-1]["max_steps"]):
            return records[-1]["max_steps"]
        time.sleep(0.2)
    raise SystemExit(f"the run ended before training reached the point to kill the server at:\n{process.communicate()[0][-3000:]}")


def _ended(home: Path) -> bool:
    return any(r.get("event") == "end" for r in _journal(home))


def _config(work: Path, given: str | None, uri: str) -> Path:
    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    if given:
        from adapterflow.tasks.config import load_config

        config = load_config(given).model_dump(mode="json", exclude_none=True)
    else:
        from conftest import classification_rows, cls_config, write_csv

        from adapterflow.tasks.tiny_models import make_tiny_bert

        model = make_tiny_bert(work / "tiny-bert")
        data = {split: write_csv(work / f"{split}.csv", classification_rows(count, seed))
                for seed, (split, count) in enumerate((("train", 48), ("validation", 18), ("test", 18)), 1)}
        config = cls_config(model, data, **{"train.max_steps": 2000, "train.log_every": 10, "train.checkpoint_every": 1000})
    config.setdefault("tracking", {})["mlflow_uri"] = uri
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Server:
    def __init__(self, folder: Path):
        folder.mkdir(parents=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.folder, self.uri, self.process = folder, f"http://127.0.0.1:{self.port}", None

    def start(self) -> None:
        command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                   "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1"]
        with open(self.folder / "server.log", "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)
        raise SystemExit("the mlflow server did not start")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


if __name__ == "__main__":
    main()
