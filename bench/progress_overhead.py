"""Overhead of the live-progress plumbing on training throughput (issue 17: at most 1%).

"with": the journal callback in the training loop, and the flow's follower thread on the journal shipping
the metrics to MLflow (a SQLite store) and drawing plain progress lines. "without": neither (a no-op
callback in the journal's place). Training runs in the measuring process, as `launch.mode: in_process`
does: the harsher case, where the follower shares the interpreter with the training loop. The Prefect
progress artifact is left out (it needs a Prefect server; one HTTP call per 5 s). Fresh processes,
alternating, best of N and the median of the pairs' ratios; throughput is the Trainer's samples/s.
On a loaded machine the throughput ratio is noise; the plumbing's own time, measured inside each "with"
run as a share of its training time, is not (see _account_plumbing_time).

Usage: python bench/progress_overhead.py [--config configs/demo.yaml] [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def child(side: str, config_path: str, out_dir: str) -> None:
    from adapterflow.tasks.state import prepare_environment

    prepare_environment(offline=True)
    from transformers import TrainerCallback

    import adapterflow.tasks.train as train_module
    from adapterflow.flows.progress import PlainLines
    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.journal import JOURNAL_FILE, JournalFollower
    from adapterflow.tasks.metrics_shipper import MetricsShipper, ShipperSink
    from adapterflow.tasks.model_io import resolve_base

    config = load_config(config_path)
    base_ref = resolve_base(config.model)
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True)
    init = initialize_adapter(config, base_ref, run_dir)
    if side == "without":
        train_module.TrainingJournal = lambda path: TrainerCallback()
        result = train_module.train_adapter(config, base_ref, Path(init.init_dir), run_dir, quiet=True)
    else:
        from mlflow.tracking import MlflowClient  # imported before training, as in the flow

        uri = f"sqlite:///{run_dir / 'mlflow.db'}"
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("overhead")).info.run_id
        shipper = ShipperSink(MetricsShipper(run_dir, uri, run_id, print))
        sinks = [shipper, PlainLines(lambda line: print(line, file=sys.stderr))]
        spent = _account_plumbing_time()
        with JournalFollower(run_dir / JOURNAL_FILE, sinks):
            result = train_module.train_adapter(config, base_ref, Path(init.init_dir), run_dir, quiet=True)
        shipped = len(client.get_metric_history(run_id, "train/loss"))
        assert shipped == result.steps // config.train.log_every, f"{shipped} loss points shipped"
        print(json.dumps({**result.to_dict(), "plumbing": spent}))
        return
    print(json.dumps(result.to_dict()))


def _account_plumbing_time() -> dict:
    """Seconds the plumbing takes, measured where it runs, so machine load cancels out: the journal callbacks'
    wall time inside the training loop (they add to it directly) and the follower's CPU time on its thread (at
    most what it can take from the loop through the GIL; its final read and the sinks' close come after training)."""
    import time

    from adapterflow.tasks.journal import JournalFollower, TrainingJournal

    spent = {"callbacks": 0.0, "follower": 0.0}

    def timed(function, key: str, clock):
        def wrapper(*args, **kwargs):
            start = clock()
            try:
                return function(*args, **kwargs)
            finally:
                spent[key] += clock() - start

        return wrapper

    for name in ("on_train_begin", "on_step_end", "on_log", "on_train_end"):
        setattr(TrainingJournal, name, timed(getattr(TrainingJournal, name), "callbacks", time.perf_counter))
    JournalFollower._run = timed(JournalFollower._run, "follower", time.thread_time)
    return spent


def main() -> None:
    from throughput import bench_config, run_json

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    runs: dict[str, list[float]] = {"without": [], "with": []}
    shares = []
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(ROOT / args.config, args.steps, Path(tmp))
        for repeat in range(args.repeats):
            for side in ("without", "with"):
                result = run_json([sys.executable, __file__, "--child", side, str(config), f"{tmp}/{side}{repeat}"], env)
                runs[side].append(result["samples_per_second"])
                if side == "with":
                    shares.append((result["plumbing"]["callbacks"] + result["plumbing"]["follower"]) / result["seconds"])
    best = {side: max(values) for side, values in runs.items()}
    paired = sorted(w / wo for wo, w in zip(runs["without"], runs["with"]))
    print(f"config {args.config}, {args.steps} steps, best of {args.repeats}, device {result['device']}")
    print(f"samples/s without: {', '.join(f'{v:.2f}' for v in runs['without'])}   with: {', '.join(f'{v:.2f}' for v in runs['with'])}")
    print(f"ratio (best with / best without): {best['with'] / best['without']:.4f}x; paired ratios "
          f"{', '.join(f'{r:.4f}' for r in paired)}, median {statistics.median(paired):.4f}x (target >= 0.99)")
    print(f"plumbing time / training time (callbacks' wall + follower's CPU, measured in each run): "
          f"{', '.join(f'{100 * v:.3f}%' for v in shares)}; max {100 * max(shares):.3f}% (target <= 1%)")


if __name__ == "__main__":
    main()
