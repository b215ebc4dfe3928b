"""Overhead of the live-progress plumbing on training (issue 17: at most 1%), measured side by side in one run.

"with": the journal callback in the training loop, and the flow's follower thread on the journal shipping
the metrics to MLflow (a SQLite store) and drawing plain progress lines. "without": neither (a no-op
callback in the journal's place). Training runs in the measuring process, as `launch.mode: in_process`
does: the harsher case, where the follower shares the interpreter with the training loop. The Prefect
progress artifact is left out (it needs a Prefect server; one HTTP call per 5 s).

Fresh processes, interleaved and alternating in order (without/with, then with/without, ...), so drift in
the machine's load falls on both sides alike. Printed: the median of the pairs' ratios of training time
(with / without; 1.01 would be 1% slower), of training CPU seconds and of samples/s, and the plumbing's own time measured inside
each "with" run as a share of its training time (see _account_plumbing_time): on a loaded machine the
ratios carry the load's noise, the share does not. A config whose init is data-driven (e.g.
configs/demo_eva.yaml) also compares the init's seconds with the calibration-progress hook (flows/progress.py's
lines) against a no-op hook.

Usage: python bench/progress_overhead.py [--config configs/demo.yaml] [--steps 40] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def child(side: str, config_path: str, out_dir: str) -> None:
    from adapterflow.tasks.state import prepare_environment

    prepare_environment(offline=True)
    import prefect.context  # noqa: F401  (loaded in the flow before init: `say` would import it on its first line)
    from transformers import TrainerCallback

    import adapterflow.tasks.train as train_module
    from adapterflow.flows.progress import PlainLines
    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.init_adapter import configured_initializer, initialize_adapter
    from adapterflow.tasks.journal import JOURNAL_FILE, JournalFollower
    from adapterflow.tasks.metrics_shipper import MetricsShipper, ShipperSink
    from adapterflow.tasks.model_io import resolve_base

    config = load_config(config_path)
    base_ref = resolve_base(config.model)
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True)
    if side == "without":
        _silence_calibration_progress()
    init = initialize_adapter(config, base_ref, run_dir)
    extra = {"init_seconds": init.seconds, "calibration": configured_initializer(config).needs_data}
    if side == "without":
        train_module.TrainingJournal = lambda path: TrainerCallback()
        cpu = time.process_time()
        result = train_module.train_adapter(config, base_ref, Path(init.init_dir), run_dir, quiet=True)
        extra["cpu_seconds"] = time.process_time() - cpu
    else:
        from mlflow.tracking import MlflowClient  # imported before training, as in the flow

        uri = f"sqlite:///{run_dir / 'mlflow.db'}"
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("overhead")).info.run_id
        shipper = ShipperSink(MetricsShipper(run_dir, uri, run_id, print))
        sinks = [shipper, PlainLines(lambda line: print(line, file=sys.stderr))]
        spent = _account_plumbing_time()
        cpu = time.process_time()
        with JournalFollower(run_dir / JOURNAL_FILE, sinks):  # its CPU time counts, up to its last shipment
            result = train_module.train_adapter(config, base_ref, Path(init.init_dir), run_dir, quiet=True)
        extra["cpu_seconds"] = time.process_time() - cpu
        shipped = len(client.get_metric_history(run_id, "train/loss"))
        assert shipped == result.steps // config.train.log_every, f"{shipped} loss points shipped"
        print(json.dumps({**result.to_dict(), "plumbing": spent, **extra}))
        return
    print(json.dumps({**result.to_dict(), **extra}))


def _silence_calibration_progress() -> None:
    """The initializer's calibration hook left at its no-op default (adapters/context.py)."""
    from contextlib import contextmanager

    import adapterflow.tasks.init_adapter as init_module
    from adapterflow.adapters.context import no_progress

    @contextmanager
    def silent(method, calibration):
        yield no_progress

    init_module.calibration_progress = silent


def _account_plumbing_time() -> dict:
    """Seconds the plumbing takes, measured where it runs, so machine load cancels out: the journal callbacks'
    wall time inside the training loop (they add to it directly) and the follower's CPU time on its thread (at
    most what it can take from the loop through the GIL; its final read and the sinks' close come after training)."""
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    runs: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(ROOT / args.config, args.steps, Path(tmp))
        for repeat in range(args.repeats):
            pair = {}
            for side in ("without", "with") if repeat % 2 == 0 else ("with", "without"):
                pair[side] = run_json([sys.executable, __file__, "--child", side, str(config), f"{tmp}/{side}{repeat}"], env)
            runs.append(pair)
            print(f"pair {repeat + 1}/{args.repeats}: training {pair['without']['seconds']:.2f} s without, "
                  f"{pair['with']['seconds']:.2f} s with", file=sys.stderr)
    print(report(runs, args.config, args.steps))


def report(runs: list[dict[str, dict]], config: str, steps: int) -> str:
    """The side-by-side numbers: medians of the pairs' ratios, and the plumbing's own share of training time."""
    def ratios(key: str) -> list[float]:
        return sorted(pair["with"][key] / pair["without"][key] for pair in runs)

    def listed(values, form="{:.4f}") -> str:
        return ", ".join(form.format(v) for v in values)

    time_ratios, rate_ratios = ratios("seconds"), ratios("samples_per_second")
    shares = [(p["with"]["plumbing"]["callbacks"] + p["with"]["plumbing"]["follower"]) / p["with"]["seconds"] for p in runs]
    lines = [
        f"config {config}, {steps} steps, {len(runs)} interleaved pairs (order alternating), device {runs[0]['with']['device']}",
        f"training seconds without: {listed([p['without']['seconds'] for p in runs], '{:.2f}')}",
        f"training seconds with:    {listed([p['with']['seconds'] for p in runs], '{:.2f}')}",
        f"training with progress plumbing / without: median {statistics.median(time_ratios):.4f}x "
        f"(pairs {listed(time_ratios)}; target <= 1.01)",
        f"training CPU seconds (all threads) with / without: median {statistics.median(ratios('cpu_seconds')):.4f}x "
        f"(pairs {listed(ratios('cpu_seconds'))}; less sensitive to other processes' load than wall time)",
        f"samples/s with / without: median {statistics.median(rate_ratios):.4f}x (pairs {listed(rate_ratios)}; target >= 0.99)",
        f"plumbing time / training time (callbacks' wall + follower's CPU, measured in each run): "
        f"{listed([100 * v for v in shares], '{:.3f}%')}; median {100 * statistics.median(shares):.3f}%, "
        f"max {100 * max(shares):.3f}% (target <= 1%)",
    ]
    if runs[0]["with"]["calibration"]:
        init_ratios = ratios("init_seconds")
        lines.append(f"init with calibration-progress hook / without: median {statistics.median(init_ratios):.4f}x "
                     f"(pairs {listed(init_ratios)})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
