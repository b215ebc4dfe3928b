"""Convergence: does an init method reach a good adapter in fewer steps than vanilla LoRA?

On the demo task (configs/demo.yaml: MiniLM, Debian sections), every method is initialized, trained
and evaluated the way the flow does it (tasks.init_adapter / tasks.train / tasks.evaluate), once per
learning rate of a sweep. From each run it keeps the validation eval loss and accuracy every
--eval-every steps (the Trainer log) and the final test accuracy of the saved adapter. Per method the
best LR is the one with the lowest final eval loss. The target is vanilla LoRA's final eval loss at
LoRA's best LR; for each method it reports the first eval step at which its best-LR curve reaches that
loss, and the ratio to LoRA's own step count (< 1: faster than LoRA).
Honesty: one seed, one small task; losses within ~0.01 are noise-level here. A method that does not
reach LoRA's loss is printed as "not reached", and its Δ vs LoRA is shown with its sign.
On a shared machine pass --threads 1: oversubscribed BLAS threads made the full-SVD PiSSA init 10-80x slower.
Writes a PNG of the curves (best LR solid, other LRs faint) and a JSON of every run next to it.
Usage: python bench/convergence.py [--methods lora,orthogonal] [--lrs 5e-4,2e-3,8e-3] [--steps 60]
       [--eval-every 10] [--batch-size 16] [--threads N] [--out bench/results/convergence.png]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the Trainer's progress bar, per run

CHEAP_CALIBRATION = {"samples": 32, "batches": 4}  # set wherever a method's config has these knobs
NO_CHECKPOINTS = 1_000_000  # checkpoint_every past the end: the Trainer then saves only once, at the end


def trainable_methods() -> list[str]:
    """Every method that trains on the demo task as it is: no race, no CUDA or 4-bit base required."""
    from adapterflow.adapters.registry import initializers

    runnable = [i.name for i in initializers() if not i.is_race and i.cuda_only is None and i.needs_4bit_base is None]
    return sorted(runnable, key=lambda name: name != "lora")  # LoRA first: it sets the target


def cheap_init(method: str) -> dict:
    from adapterflow.adapters.registry import get_initializer

    fields = get_initializer(method).config.model_fields
    return {"method": method, **{knob: value for knob, value in CHEAP_CALIBRATION.items() if knob in fields}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    methods = trainable_methods()
    parser.add_argument("--methods", default=",".join(methods), help="comma list of init methods")
    parser.add_argument("--lrs", default="5e-4,2e-3,8e-3", help="comma list of learning rates")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "convergence.png"))
    parser.add_argument("--workdir", default=None, help="keep run folders here instead of a temp dir")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    unknown = sorted(set(args.methods) - set(methods))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(methods)}")
    return args


def run_config(base, method: str, lr: float, args):
    """The demo config with this run's method and training knobs (RunConfig is frozen: dump, edit, validate)."""
    from adapterflow.tasks.config import RunConfig

    raw = base.model_dump()  # paths are already absolute: load_config resolved them
    raw["adapter"]["init"] = cheap_init(method)
    raw["train"].update(
        learning_rate=lr, max_steps=args.steps, epochs=None, eval_every=args.eval_every,
        batch_size=args.batch_size, checkpoint_every=NO_CHECKPOINTS, threads=args.threads,
    )
    return RunConfig.model_validate(raw)


@contextlib.contextmanager
def quiet(log_path: Path):
    """Library chatter of one run goes to its own log file; the console keeps the progress lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def eval_curve(train_log: Path) -> list[dict]:
    history = json.loads(train_log.read_text())
    return [
        {"step": entry["step"], "eval_loss": entry["eval_loss"], "eval_accuracy": entry.get("eval_accuracy")}
        for entry in history if "eval_loss" in entry
    ]


def train_one(config, ref, run_dir: Path, cache_root: Path) -> dict:
    """Init (cached), train, evaluate on test: one point of the sweep."""
    from adapterflow.tasks.evaluate import evaluate_adapter
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.train import train_adapter

    run_dir.mkdir(parents=True, exist_ok=True)
    with quiet(run_dir / "output.log"):
        init = initialize_adapter(config, ref, run_dir, cache_root)
        trained = train_adapter(config, ref, Path(init.init_dir), run_dir)
        start = time.perf_counter()
        test = evaluate_adapter(config, ref, Path(trained.adapter_dir), "test")
    curve = eval_curve(run_dir / "train_log.json")
    return {
        "init_seconds": init.seconds, "init_cache": init.cache, "train_seconds": trained.seconds,
        "test_seconds": time.perf_counter() - start, "train_loss": trained.train_loss, "curve": curve,
        "final_eval_loss": curve[-1]["eval_loss"] if curve else float("nan"), "test": test,
    }


def sweep(args, base, ref, workdir: Path) -> list[dict]:
    runs, total, count = [], len(args.methods) * len(args.lrs), 0
    for method in args.methods:
        for lr in args.lrs:
            count += 1
            run = {"method": method, "lr": lr}
            start = time.perf_counter()
            try:
                run.update(train_one(run_config(base, method, lr, args), ref, workdir / f"{method}_lr{lr:g}", workdir / "init_cache"))
            except Exception as err:  # a diverged or failing run is a result too: record it, go on
                run["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            run["seconds"] = time.perf_counter() - start
            runs.append(run)
            print(progress_line(count, total, run), flush=True)
    return runs


def progress_line(count: int, total: int, run: dict) -> str:
    head = f"[{count:>2}/{total}] {run['method']:<8} lr {run['lr']:<7g} {run['seconds']:6.1f} s"
    if "error" in run:
        return f"{head}  FAILED {run['error']}"
    return (f"{head}  (init {run['init_seconds']:.1f} s {run['init_cache']}, train {run['train_seconds']:.1f} s)"
            f"  final eval loss {run['final_eval_loss']:.4f}  test acc {run['test']['accuracy']:.3f}")


def first_step_at_or_below(curve: list[dict], target: float) -> int | None:
    return next((point["step"] for point in curve if point["eval_loss"] <= target), None)


def best_runs(runs: list[dict]) -> dict[str, dict]:
    """Per method, the successful run with the lowest final eval loss."""
    best: dict[str, dict] = {}
    for run in runs:
        if "error" not in run and (run["method"] not in best or run["final_eval_loss"] < best[run["method"]]["final_eval_loss"]):
            best[run["method"]] = run
    return best


def init_seconds(runs: list[dict], method: str) -> float | None:
    """Mean uncached init time of a method (later LRs of most methods are cache hits)."""
    misses = [r["init_seconds"] for r in runs if r["method"] == method and r.get("init_cache") == "miss"]
    return sum(misses) / len(misses) if misses else None


def summarize(args, runs: list[dict]) -> dict:
    best = best_runs(runs)
    lora = best.get("lora")
    target = lora["final_eval_loss"] if lora else None
    lora_steps = first_step_at_or_below(lora["curve"], target) if lora else None
    rows = []
    for method in args.methods:
        run = best.get(method)
        row = {"method": method, "init_seconds": init_seconds(runs, method), "best": run}
        if run and target is not None:
            reach = {r["lr"]: first_step_at_or_below(r["curve"], target) for r in runs if r["method"] == method and "error" not in r}
            fastest = min(((s, lr) for lr, s in reach.items() if s is not None), default=None)
            steps = reach[run["lr"]]
            row.update(steps=steps, ratio=steps / lora_steps if steps and lora_steps else None, fastest=fastest)
        rows.append(row)
    return {"target": target, "lora_steps": lora_steps, "rows": rows}


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(args, summary: dict, runs: list[dict]) -> None:
    target = summary["target"]
    print(f"\nconvergence on the demo task: {args.steps} steps, batch {args.batch_size}, eval every {args.eval_every}, "
          f"LRs {', '.join(f'{lr:g}' for lr in args.lrs)}; best LR per method = lowest final eval loss")
    if target is None:
        print("(no successful lora run: no target, so no steps-to-target columns)")
    else:
        print(f"target: vanilla LoRA's final eval loss at its best LR = {target:.4f}, reached by LoRA at step {summary['lora_steps']}")
    header = (f"{'method':<9}{'best lr':>9}{'final eval':>11}{'Δ vs lora':>10}{'test acc':>9}{'best eval (step)':>18}"
              f"{'steps to target':>16}{'ratio':>7}{'fastest any lr':>17}{'init s':>8}")
    print(header + "\n" + "-" * len(header))
    for row in summary["rows"]:
        print(table_row(row, target))
    print(f"ratio = steps to target / LoRA's steps (< 1: faster), resolved to --eval-every ({args.eval_every}) steps. "
          "'not reached': the curve never got to LoRA's final loss.")
    edge = [row["method"] for row in summary["rows"] if row["best"] and row["best"]["lr"] in (min(args.lrs), max(args.lrs))]
    if edge and len(args.lrs) > 1:
        print(f"note: best LR at the edge of the sweep for {', '.join(edge)}: the optimum may lie outside it; widen --lrs.")
    print_per_lr(runs)


def table_row(row: dict, target: float | None) -> str:
    run = row["best"]
    if run is None:
        return f"{row['method']:<9}{'all LRs failed':>29}"
    lowest = min(run["curve"], key=lambda p: p["eval_loss"])
    delta = run["final_eval_loss"] - target if target is not None else None
    steps = "not reached" if target is not None and row.get("steps") is None else fmt(row.get("steps"), "d")
    fastest = row.get("fastest")
    fastest_text = f"{fastest[0]} (lr {fastest[1]:g})" if fastest else ("not reached" if target is not None else "-")
    return (f"{row['method']:<9}{run['lr']:>9g}{run['final_eval_loss']:>11.4f}{fmt(delta, '+.4f'):>10}{run['test']['accuracy']:>9.3f}"
            f"{lowest['eval_loss']:>11.4f} ({lowest['step']:>3}){steps:>16}{fmt(row.get('ratio'), '.2f'):>7}{fastest_text:>17}"
            f"{fmt(row['init_seconds'], '.1f'):>8}")


def print_per_lr(runs: list[dict]) -> None:
    print(f"\nevery run:\n{'method':<9}{'lr':>9}{'final eval':>11}{'eval acc':>9}{'test acc':>9}{'macro f1':>9}{'train s':>9}  status")
    for run in runs:
        if "error" in run:
            print(f"{run['method']:<9}{run['lr']:>9g}{'':>56}  {run['error']}")
            continue
        accuracy = run["curve"][-1].get("eval_accuracy") if run["curve"] else None
        print(f"{run['method']:<9}{run['lr']:>9g}{run['final_eval_loss']:>11.4f}{fmt(accuracy, '.3f'):>9}{run['test']['accuracy']:>9.3f}"
              f"{run['test']['macro_f1']:>9.3f}{run['train_seconds']:>9.1f}  ok")


def plot(args, summary: dict, runs: list[dict], path: Path) -> None:
    """Eval loss and accuracy vs step: each method's best LR solid, its other LRs faint and dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = {row["method"]: row["best"] for row in summary["rows"] if row["best"]}
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(13, 5))
    for index, method in enumerate(args.methods):
        color = plt.cm.tab10(index % 10)
        for run in (r for r in runs if r["method"] == method and "error" not in r):
            steps = [p["step"] for p in run["curve"]]
            is_best = run is best.get(method)
            style = {"color": color, "linewidth": 2.2 if is_best else 1, "alpha": 1.0 if is_best else 0.3,
                     "linestyle": "-" if is_best else "--", "marker": "o" if is_best else None, "markersize": 3,
                     "label": f"{method} (lr {run['lr']:g})" if is_best else None}
            loss_axis.plot(steps, [p["eval_loss"] for p in run["curve"]], **style)
            if all(p["eval_accuracy"] is not None for p in run["curve"]):
                acc_axis.plot(steps, [p["eval_accuracy"] for p in run["curve"]], **style)
    if summary["target"] is not None:
        loss_axis.axhline(summary["target"], color="black", linestyle=":", linewidth=1, label=f"LoRA's final loss {summary['target']:.3f}")
    loss_axis.set(xlabel="step", ylabel="validation loss", title="eval loss (best LR solid, other LRs faint)")
    acc_axis.set(xlabel="step", ylabel="validation accuracy", title="eval accuracy")
    loss_axis.legend(fontsize=8)
    for axis in (loss_axis, acc_axis):
        axis.grid(alpha=0.3)
    figure.suptitle(f"demo task, {args.steps} steps, batch {args.batch_size}, LRs {', '.join(f'{lr:g}' for lr in args.lrs)}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def portable(value):
    """Paths relative to the repository, or just their name: results must not record this machine's folders."""
    if not isinstance(value, str) or not value.startswith("/"):
        return value
    path = Path(value)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def save(args, summary: dict, runs: list[dict], wall: float) -> Path:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(args, summary, runs, out)
    rows = [{**{k: v for k, v in row.items() if k != "best"}, "best_lr": row["best"]["lr"] if row["best"] else None}
            for row in summary["rows"]]
    record = {"settings": {k: portable(v) for k, v in vars(args).items()}, "wall_seconds": wall, "target": summary["target"],
              "lora_steps": summary["lora_steps"], "summary": rows, "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    return out


def main() -> None:
    import torch

    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.model_io import resolve_base

    args = parse_args()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)  # init and test eval too; train_adapter sets it from train.threads
    base = load_config(args.config)
    ref = resolve_base(base.model)
    print(f"{len(args.methods)} methods x {len(args.lrs)} LRs, {args.steps} steps each, torch threads {torch.get_num_threads()}",
          flush=True)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="convergence-")))
        runs = sweep(args, base, ref, workdir)
    wall = time.perf_counter() - start
    summary = summarize(args, runs)
    print_table(args, summary, runs)
    out = save(args, summary, runs, wall)
    print(f"\nwall time {wall / 60:.1f} min; plot {out}, data {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
