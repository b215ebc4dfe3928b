"""Convergence: does an init method, or the `auto` race, reach a better adapter than vanilla LoRA at equal compute?

On the demo task (configs/demo.yaml: MiniLM, Debian sections; --config for another, e.g. configs/docstrings.yaml),
every (method, LR) pair of a grid is initialized,
trained and evaluated the way the flow does it (tasks.init_adapter / tasks.train / tasks.evaluate), once per seed.
`auto` in --methods races the grid's other methods over the same LRs (as lr_multipliers of --user-lr) and trains its
winner: at equal total optimizer steps, because its race's extra steps count (its max_steps is --steps less its
budget's worst case, so its total never exceeds --steps; the total it used is reported).
Per (method, LR) over --seeds: mean ± std of the final validation loss and accuracy (the saved adapter evaluated on
the validation split) and the test accuracy, and the steps each run needs to reach LoRA's mean final eval loss at the
user's LR (resolved to --eval-every; auto's count its race's extra steps). For auto: its winner on each seed, its
Δ to LoRA at the user's LR and to the best single pair of the grid (in that pair's std).
Honesty: one small task; a difference under one std of the seeds is noise. A run that does not reach the target is
"not reached".
On a shared machine pass --threads 1: oversubscribed BLAS threads made the full-SVD PiSSA init 10-80x slower.
Writes a PNG of the seed-mean validation curves and a JSON of every run next to it.
Usage: python bench/convergence.py [--methods lora,pissa,auto] [--user-lr 2e-3] [--lr-multipliers 0.25,0.5,1,2,4]
       [--steps 60] [--seeds 3] [--eval-every 10] [--batch-size 16] [--budget 0.1] [--threads N]
       [--out bench/results/convergence.png] [--only auto --merge earlier.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
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
RACE = "auto"


def trainable_methods() -> list[str]:
    """Every method that trains on the demo task as it is (no CUDA or 4-bit base required), and the race."""
    from adapterflow.adapters.registry import initializers

    runnable = [i.name for i in initializers() if not i.is_race and i.cuda_only is None and i.needs_4bit_base is None]
    return sorted(runnable, key=lambda name: name != "lora") + [RACE]  # LoRA first: it sets the target


def cheap_init(method: str) -> dict:
    from adapterflow.adapters.registry import get_initializer

    fields = get_initializer(method).config.model_fields
    return {"method": method, **{knob: value for knob, value in CHEAP_CALIBRATION.items() if knob in fields}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    methods = trainable_methods()
    parser.add_argument("--methods", default="lora,pissa,eva,lora_ga,auto", help=f"comma list of {', '.join(methods)}")
    parser.add_argument("--user-lr", type=float, default=None, help="the LR a user would set (default: the config's)")
    parser.add_argument("--lr-multipliers", default="0.25,0.5,1,2,4", help="× --user-lr: the grid, and auto's lr_multipliers")
    parser.add_argument("--steps", type=int, default=60, help="total optimizer steps of every run, auto's race included")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.1, help="auto's budget: share of its max_steps the losers may add")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "convergence.png"))
    parser.add_argument("--workdir", default=None, help="keep run folders here instead of a temp dir")
    parser.add_argument("--only", default=None, help="comma list of --methods to run (e.g. auto after a change to the race; "
                        "empty: none), the rest of the grid coming from --merge")
    parser.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                        help="earlier results (same settings) whose runs join this one's; a later file or this run wins a "
                             "(method, LR, seed) they share")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.multipliers = [float(v) for v in args.lr_multipliers.split(",") if v.strip()]
    # --only= (empty) runs nothing: the summary and plot of the --merge files alone
    args.only = [m.strip() for m in args.only.split(",") if m.strip()] if args.only is not None else list(args.methods)
    if set(args.only) - set(args.methods):
        parser.error(f"--only {sorted(set(args.only) - set(args.methods))}: not in --methods")
    unknown = sorted(set(args.methods) - set(methods))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(methods)}")
    if RACE in args.methods and len(args.methods) < 3:
        parser.error("auto races the other methods in --methods: list at least two besides it")
    return args


def race_max_steps(total: int, budget: float, contenders: int) -> int:
    """The largest max_steps whose worst-case race (max_steps + the plan's extra steps) fits in `total`."""
    from adapterflow.tasks.race import plan_race

    steps = total
    while (plan := plan_race(contenders, steps, budget)) and steps + plan.extra_steps > total:
        steps -= 1
    return steps


def run_config(base, method: str, lr: float, seed: int, args):
    """The demo config with this run's method and training knobs (RunConfig is frozen: dump, edit, validate)."""
    from adapterflow.tasks.config import RunConfig

    raw = base.model_dump()  # paths are already absolute: load_config resolved them
    steps = args.steps
    if method == RACE:
        candidates = [cheap_init(m) for m in args.methods if m != RACE]
        raw["adapter"]["init"] = {"method": RACE, "candidates": candidates, "lr_multipliers": args.multipliers, "budget": args.budget}
        steps = race_max_steps(args.steps, args.budget, len(candidates) * len(args.multipliers))
    else:
        raw["adapter"]["init"] = cheap_init(method)
    raw["train"].update(
        learning_rate=lr, max_steps=steps, epochs=None, eval_every=args.eval_every, seed=seed,
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
    """Init (cached; a race for auto), train, evaluate the saved adapter on validation and test: one point of the grid."""
    from adapterflow.tasks.evaluate import evaluate_adapter
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.train import train_adapter

    run_dir.mkdir(parents=True, exist_ok=True)
    with quiet(run_dir / "output.log"):
        init = initialize_adapter(config, ref, run_dir, cache_root)
        if init.learning_rate is not None:  # a race's winner trains on at its own LR, as the flow does
            config = config.model_copy(update={"train": config.train.model_copy(update={"learning_rate": init.learning_rate})})
        trained = train_adapter(config, ref, Path(init.init_dir), run_dir)
        final = evaluate_adapter(config, ref, Path(trained.adapter_dir), "validation")
        test = evaluate_adapter(config, ref, Path(trained.adapter_dir), "test")
    race = json.loads(Path(init.report_path).read_text()).get("race")
    extra = race["extra_steps"] if race else 0
    return {
        "init_seconds": init.seconds, "init_cache": init.cache, "train_seconds": trained.seconds, "train_loss": trained.train_loss,
        "curve": eval_curve(run_dir / "train_log.json"), "final_eval_loss": final["eval_loss"], "final_eval_accuracy": final["accuracy"],
        "test": test, "total_steps": trained.steps + extra, "extra_steps": extra,
        "winner": race["winner"] if race else None,
    }


def pairs_to_run(args) -> list[tuple[str, float]]:
    return [(method, lr) for method, lr in grid(args) if method in args.only]


def grid(args) -> list[tuple[str, float]]:
    pairs = [(m, args.user_lr * k) for m in args.methods if m != RACE for k in args.multipliers]
    return pairs + ([(RACE, args.user_lr)] if RACE in args.methods else [])


def sweep(args, base, ref, workdir: Path) -> list[dict]:
    runs, pairs = [], pairs_to_run(args)
    total, count = len(pairs) * args.seeds, 0
    for seed in range(base.train.seed, base.train.seed + args.seeds):
        for method, lr in pairs:
            count += 1
            run = {"method": method, "lr": lr, "seed": seed}
            start = time.perf_counter()
            try:
                folder = workdir / f"{method}_lr{lr:g}_seed{seed}"
                run.update(train_one(run_config(base, method, lr, seed, args), ref, folder, workdir / "init_cache"))
            except Exception as err:  # a diverged or failing run is a result too: record it, go on
                run["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            run["seconds"] = time.perf_counter() - start
            runs.append(run)
            print(progress_line(count, total, run), flush=True)
    return runs


def progress_line(count: int, total: int, run: dict) -> str:
    head = f"[{count:>3}/{total}] {run['method']:<8} lr {run['lr']:<8g} seed {run['seed']} {run['seconds']:6.1f} s"
    if "error" in run:
        return f"{head}  FAILED {run['error']}"
    winner = f"  winner {run['winner']}, {run['extra_steps']} extra steps" if run["winner"] else ""
    return (f"{head}  {run['total_steps']} steps  final eval loss {run['final_eval_loss']:.4f}  eval acc "
            f"{run['final_eval_accuracy']:.3f}  test acc {run['test']['accuracy']:.3f}{winner}")


def first_step_at_or_below(run: dict, target: float) -> int | None:
    """Optimizer steps spent when the run's validation loss first reached `target` (a race's extra steps included)."""
    step = next((point["step"] for point in run["curve"] if point["eval_loss"] <= target), None)
    return None if step is None else step + run["extra_steps"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(args, runs: list[dict]) -> dict:
    """Per (method, LR): seed means ± stds; the target is LoRA's mean final eval loss at the user's LR."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["lr"]), []).append(run)
    baseline = [r for r in groups.get(("lora", args.user_lr), []) if "error" not in r]
    target = statistics.fmean(r["final_eval_loss"] for r in baseline) if baseline else None
    rows = [summary_row(method, lr, group, target) for (method, lr), group in groups.items()]
    pairs = [row for row in rows if row["method"] != RACE and row["ok"]]
    best = min(pairs, key=lambda row: row["eval_loss"][0], default=None)
    return {"target": target, "rows": rows, "best": best, "auto": auto_verdict(rows, best, target)}


def summary_row(method: str, lr: float, group: list[dict], target: float | None) -> dict:
    ok = [r for r in group if "error" not in r]
    row = {"method": method, "lr": lr, "ok": len(ok), "failed": len(group) - len(ok)}
    if not ok:
        return row
    reach = [first_step_at_or_below(r, target) for r in ok] if target is not None else []
    reached = [s for s in reach if s is not None]
    row.update(
        eval_loss=mean_std([r["final_eval_loss"] for r in ok]), eval_accuracy=mean_std([r["final_eval_accuracy"] for r in ok]),
        test_accuracy=mean_std([r["test"]["accuracy"] for r in ok]), total_steps=mean_std([r["total_steps"] for r in ok]),
        reach=statistics.fmean(reached) if reached else None, reached=len(reached), winners=[r["winner"] for r in ok if r["winner"]],
    )
    return row


def auto_verdict(rows: list[dict], best: dict | None, target: float | None) -> dict | None:
    """The issue's targets: below LoRA at the user's LR, within one std of the best pair, one winner on most seeds."""
    auto = next((row for row in rows if row["method"] == RACE and row["ok"]), None)
    if auto is None:
        return None
    loss = auto["eval_loss"][0]
    winners = [w.split(" ")[0] for w in auto["winners"]]
    common = max(set(winners), key=winners.count)
    return {
        "vs_lora_at_user_lr": None if target is None else loss - target,
        "vs_best_pair": None if best is None else loss - best["eval_loss"][0],
        "best_pair": None if best is None else f"{best['method']} @ {best['lr']:g}",
        "within_best_std": None if best is None else loss - best["eval_loss"][0] <= best["eval_loss"][1],
        "most_common_winner": common, "its_seeds": winners.count(common), "seeds": len(winners),
    }


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def pm(pair, spec: str) -> str:
    return f"{pair[0]:{spec}} ± {pair[1]:{spec}}"


def print_table(args, summary: dict) -> None:
    target = summary["target"]
    print(f"\nconvergence on {Path(args.config).name}: {args.steps} total optimizer steps per run (auto's race included), batch "
          f"{args.batch_size}, {args.seeds} seed(s), user LR {args.user_lr:g} × {', '.join(f'{k:g}' for k in args.multipliers)}")
    if target is None:
        print("(no successful lora run at the user's LR: no target, so no steps-to-target column)")
    else:
        print(f"target: LoRA's mean final eval loss at the user's LR = {target:.4f}")
    header = (f"{'method':<9}{'lr':>9}{'final eval loss':>20}{'eval acc':>16}{'test acc':>16}{'steps':>8}"
              f"{'steps to target':>17}  auto's winners")
    print(header + "\n" + "-" * len(header))
    for row in sorted(summary["rows"], key=lambda r: (r["method"] == RACE, r["method"], r["lr"])):
        if not row["ok"]:
            print(f"{row['method']:<9}{row['lr']:>9g}  all {row['failed']} seed(s) failed")
            continue
        reach = "not reached" if target is not None and row["reach"] is None else fmt(row["reach"], ".0f")
        reach += f" ({row['reached']}/{row['ok']})" if row["reach"] is not None else ""
        print(f"{row['method']:<9}{row['lr']:>9g}{pm(row['eval_loss'], '.4f'):>20}{pm(row['eval_accuracy'], '.3f'):>16}"
              f"{pm(row['test_accuracy'], '.3f'):>16}{row['total_steps'][0]:>8.0f}{reach:>17}  {', '.join(row['winners'])}")
    verdict = summary["auto"]
    if verdict:
        print(f"\nauto vs LoRA at the user's LR: Δ mean eval loss {fmt(verdict['vs_lora_at_user_lr'], '+.4f')}; vs the best "
              f"pair ({verdict['best_pair']}): {fmt(verdict['vs_best_pair'], '+.4f')} (within its std: "
              f"{verdict['within_best_std']}); most common winner {verdict['most_common_winner']} on "
              f"{verdict['its_seeds']}/{verdict['seeds']} seeds")


def plot(args, summary: dict, runs: list[dict], path: Path) -> None:
    """Seed-mean validation loss and accuracy vs optimizer step, per (method, LR); auto's curve shifted by its extra steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(13, 5))
    for index, row in enumerate(r for r in summary["rows"] if r["ok"]):
        curves = [r for r in runs if (r["method"], r["lr"]) == (row["method"], row["lr"]) and "error" not in r and r["curve"]]
        if not curves:
            continue
        points: dict[int, list[dict]] = {}
        for run in curves:
            for point in run["curve"]:
                points.setdefault(point["step"] + run["extra_steps"], []).append(point)
        steps = sorted(points)
        style = {"color": plt.cm.tab20(index % 20), "linewidth": 2.4 if row["method"] == RACE else 1.2, "marker": "o", "markersize": 3,
                 "label": f"{row['method']} (lr {row['lr']:g})"}
        loss_axis.plot(steps, [statistics.fmean(p["eval_loss"] for p in points[s]) for s in steps], **style)
        if all(p["eval_accuracy"] is not None for s in steps for p in points[s]):
            acc_axis.plot(steps, [statistics.fmean(p["eval_accuracy"] for p in points[s]) for s in steps], **style)
    if summary["target"] is not None:
        loss_axis.axhline(summary["target"], color="black", linestyle=":", linewidth=1, label="LoRA at the user's LR, final")
    loss_axis.set(xlabel="optimizer steps", ylabel="validation loss", title=f"eval loss, mean of {args.seeds} seed(s)")
    acc_axis.set(xlabel="optimizer steps", ylabel="validation accuracy", title="eval accuracy")
    loss_axis.legend(fontsize=7)
    for axis in (loss_axis, acc_axis):
        axis.grid(alpha=0.3)
    figure.suptitle(f"{Path(args.config).stem} task, {args.steps} total steps, batch {args.batch_size}, user LR {args.user_lr:g}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def portable(value):
    """Paths relative to the repository, or just their name: results must not record this machine's folders."""
    if isinstance(value, list):
        return [portable(item) for item in value]
    if not isinstance(value, str) or not value.startswith("/"):
        return value
    path = Path(value)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def save(args, summary: dict, runs: list[dict], wall: float) -> Path:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(args, summary, runs, out)
    record = {"settings": {k: portable(v) for k, v in vars(args).items()}, "wall_seconds": wall, **summary, "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    return out


def merged(paths: list[str], runs: list[dict]) -> list[dict]:
    """The runs of earlier result files and these, one per (method, LR, seed): the later one wins."""
    by_key = {}
    for run in [r for path in paths for r in json.loads(Path(path).read_text())["runs"]] + runs:
        by_key[(run["method"], run["lr"], run["seed"])] = run
    return list(by_key.values())


def main() -> None:
    import torch

    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.model_io import resolve_base

    args = parse_args()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)  # init and test eval too; train_adapter sets it from train.threads
    base = load_config(args.config)
    args.user_lr = args.user_lr or base.train.learning_rate
    ref = resolve_base(base.model)
    print(f"{len(pairs_to_run(args))} (method, LR) pairs x {args.seeds} seed(s), {args.steps} steps each, torch threads "
          f"{torch.get_num_threads()}", flush=True)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="convergence-")))
        runs = sweep(args, base, ref, workdir)
    wall = time.perf_counter() - start
    runs = merged(args.merge, runs)
    summary = summarize(args, runs)
    print_table(args, summary)
    out = save(args, summary, runs, wall)
    print(f"\nwall time {wall / 60:.1f} min; plot {out}, data {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
