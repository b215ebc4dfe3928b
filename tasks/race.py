"""The `auto` initializer's race (its `is_race` flag): candidates × learning rates, decided on signal, inside the run.

Every contender trains on the run's own schedule (the config's max_steps, warmup and decay), paused at the end of each
round with a checkpoint; the round's survivors resume from theirs. The winner's last race checkpoint (adapter,
optimizer, scheduler, RNG and data position) goes into its init folder and the train stage continues it to max_steps:
its race steps are the first steps of the real run, bit for bit, and only the other contenders' steps are extra: what
the race needs to decide (STEPS_TO_DECIDE per loser), at most `budget` × max_steps (≤ 10%).

After each round every contender is scored on the validation split, example by example, and compared with the leader
in two ways:
- obviously worse: its loss exceeds the leader's by more than `sigmas` × √(σ_leader² + σ_contender²), each σ the
  standard error of one mean (sd / √n). That gap would survive drawing another validation sample for each loss: cut.
- consistently worse: the paired gap (the mean of the example-by-example differences) exceeds `sigmas` × its own
  standard error, in this round and the round before, and has not shrunk since, and it is at least RATE_SHARE of what
  the leader's loss fell since the first round. Pairing removes the examples' shared difficulty, so real gaps show
  after a few steps (on both convergence benches the LR arms' step-10 order was their step-60 order, at gaps well
  under the unpaired noise). One round is not enough: right after the init, contenders differ by tiny but consistent
  amounts on every example (twelve within 6e-4 after one step each) that say nothing about the final order. And a
  small gap that holds can still be a head start rather than a slower rate: PiSSA leads LoRA at the same LR early on
  both benches, by 17-29% of the leader's progress, and LoRA was ahead by step 330; an arm at half the LR lags by
  about half.
Otherwise it is tied and kept, and so is any contender at a lower LR than the leader's on a run of more than
TRUSTED_EPOCHS passes over the train split (an early lead cannot show a larger LR overfitting later). Rounds double
in length while the budget holds; a contender cut early leaves its steps to the tied ones. When the budget ends with
several still tied, the simplest method wins (registry family order, lora first, then the candidates' order) at the
learning rate nearest the user's.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from adapterflow.errors import ConfigError, TrainingError

CHECKPOINT = "race_checkpoint"  # in the winner's init folder: what the train stage continues
FIRST_ROUND_SHARE = 3  # the first round takes a third of the extra steps when nobody is cut; the rest pays for more
# Steps each losing contender needs before the race can cut on signal: on both convergence tasks (demo, docstrings;
# MiniLM, batch 16, six contenders) the paired comparison had cut all but one by step 9 to 11.
STEPS_TO_DECIDE = 9
# A paired gap smaller than this share of the leader's progress since the first round is a head start, not a slower
# rate: early on progress grows with the LR, so an arm at half the leader's LR lags by about half of it. On both
# convergence tasks the LR arms lagged by 52-88% and same-LR inits by 17-29%, an order gone by step 330.
RATE_SHARE = 0.4
# Early on a larger LR progresses faster, but over many passes over the same rows it may overfit more, which no early
# step shows: on the demo the 2e-3 arms trailed 4e-3 at step 9 both on a 2-epoch and on a 6-epoch run, and 4e-3 ended
# better at 2 epochs (eval loss 0.305 vs 0.354) and worse at 6 (test loss 0.414 vs 0.364); on the docstrings task it
# ended better at 2.5 epochs and worse at 6 (0.789 vs 0.772, one seed). The optimal LR shrinks as the training horizon
# grows (Bjorck et al., "Scaling Optimal LR Across Token Horizons", arXiv:2409.19913). So beyond this many epochs an
# arm at a lower LR than the leader's is never cut for trailing: the race can lower the LR there, not raise it.
TRUSTED_EPOCHS = 3.0
UNSEEN_OVERFITTING = "a larger LR's early lead does not show whether it overfits later"


@dataclass(frozen=True)
class RacePlan:
    contenders: int
    max_steps: int  # the run's optimizer steps; the winner trains exactly these
    extra_steps: int  # what the contenders that do not win may spend in all
    first_round: int


@dataclass(frozen=True)
class Score:
    loss: float  # mean over the validation examples; inf when the contender diverged
    noise: float  # standard error of that mean
    losses: object = None  # the per-example losses (a tensor), for the paired comparison


@dataclass
class Contender:
    method: str
    multiplier: float  # × train.learning_rate
    learning_rate: float
    init: object  # the candidate's init config
    simplicity: tuple  # lower is simpler: (family, not the default method, place among the candidates)
    steps: int = 0
    run_epochs: float = 0.0  # passes over the train split that the whole run (max_steps) makes
    init_seconds: float = 0.0
    init_dir: str = ""
    result: str = "tied"  # "winner" | "cut" | "tied" (still in when the budget ended)
    why: str = ""
    rounds: list[dict] = field(default_factory=list)  # {"round", "steps", "eval_loss", "noise", "verdict"}

    @property
    def label(self) -> str:
        return f"{self.method}@{self.learning_rate:g}"


def steps_to_decide(contenders: int) -> int:
    """The extra steps a race of this many contenders needs: STEPS_TO_DECIDE for each one that loses."""
    return STEPS_TO_DECIDE * (contenders - 1)


def plan_race(contenders: int, max_steps: int, budget: float) -> RacePlan | None:
    """None when the extra steps cannot give every contender but one a single step.

    The losers get what the race needs to decide, STEPS_TO_DECIDE each, and never more than `budget` × max_steps: on
    long runs a share of max_steps is far more than that, and more steps did not settle ties (at equal LR the early
    leader is a head start; on the 330-step demo bench the extra rounds turned one tie into the worse pick).
    """
    allowed = math.floor(budget * max_steps)
    if allowed < contenders - 1:
        return None
    extra = min(allowed, steps_to_decide(contenders))
    first = max(1, extra // (FIRST_ROUND_SHARE * (contenders - 1)))
    return RacePlan(contenders, max_steps, extra, min(first, max_steps))


def race_plan(config) -> RacePlan:
    """The plan, or a ConfigError naming the fix when the budget cannot give every contender a step."""
    from adapterflow.tasks.init_adapter import total_steps

    init, steps = config.adapter.init, total_steps(config)
    count = len(init.candidates) * len(init.lr_multipliers)
    plan = plan_race(count, steps, init.budget)
    if plan is None:
        raise ConfigError(
            f"adapter.init {init.method}: {count} contenders ({len(init.candidates)} candidates × {len(init.lr_multipliers)} "
            f"learning rates) need at least {count - 1} extra steps (one each for all but the winner), but budget "
            f"{init.budget} × {steps} training steps gives {math.floor(init.budget * steps)}. Raise train.max_steps to "
            f"{math.ceil((count - 1) / init.budget)} or more, or list fewer candidates / lr_multipliers."
        )
    return plan


def thin_race_warning(plan: RacePlan, config) -> str | None:
    """A race whose budget cannot separate its contenders ties, and the run is LoRA at the user's LR on fewer steps."""
    per_loser = plan.extra_steps // max(1, plan.contenders - 1)
    if per_loser >= STEPS_TO_DECIDE:
        return None
    init = config.adapter.init
    needed = math.ceil(steps_to_decide(plan.contenders) / init.budget)
    return (f"adapter.init {init.method}: its budget gives each of the {plan.contenders - 1} losing contenders about {per_loser} "
            f"step(s); contenders rarely separate beyond the noise in under {STEPS_TO_DECIDE}, so expect a tie, which trains "
            f"the simplest candidate at train.learning_rate. For a race that can decide, raise train.max_steps to {needed}"
            f"{_smaller_grid_hint(plan, init)}; or set train.learning_rate and an init method yourself.")


def many_epochs_warning(config) -> str | None:
    """Past TRUSTED_EPOCHS the race keeps every arm at a lower LR than the leader's, so multipliers above 1 win only when
    every arm at or below the user's LR is out (diverged): say so before the run pays for them. Counted in raw train
    rows; packing makes the real count higher, and the race itself counts the encoded rows."""
    init = config.adapter.init
    raised = [m for m in init.lr_multipliers if m > 1]
    if not raised or all(m > 1 for m in init.lr_multipliers):
        return None
    epochs, passes = _planned_passes(config)
    if epochs <= TRUSTED_EPOCHS:
        return None
    return (f"adapter.init {init.method}: this run makes {passes}, more than {TRUSTED_EPOCHS:g}; on such runs the race keeps "
            f"arms at a lower LR than the leader's ({UNSEEN_OVERFITTING}), so lr_multipliers above 1 "
            f"({', '.join(f'{m:g}' for m in raised)}) win only if every arm at or below train.learning_rate diverges. Drop them "
            f"to spend the race's steps on the rest, or train larger learning rates to the end with `adapterflow sweep CONFIG "
            f"--grid train.learning_rate=...`.")


def _planned_passes(config) -> tuple[float, str]:
    """The run's passes over the train split, and how to say them; the split is read only when max_steps sets the length."""
    from adapterflow.tasks.data_io import read_split

    train = config.train
    if not train.max_steps:
        return train.epochs, f"{train.epochs:g} passes over the train split"
    rows = len(read_split(config.data.train, "data.train"))
    epochs = train.max_steps * train.batch_size * train.grad_accumulation / max(1, rows)
    return epochs, f"about {epochs:.1f} passes over the {rows} train rows"


def _smaller_grid_hint(plan: RacePlan, init) -> str:
    """The largest grid these extra steps can decide (more learning rates first: the LR decided every bench race),
    taken from the user's own lists: the first candidates, the multipliers nearest 1."""
    affordable = 1 + plan.extra_steps // STEPS_TO_DECIDE
    shapes = [(c * m, m, c) for c in range(1, len(init.candidates) + 1) for m in range(1, len(init.lr_multipliers) + 1)
              if c * m <= affordable]
    size, lrs, candidates = max(shapes)
    if size < 2:
        return ""
    methods = [c.method for c in init.candidates[:candidates]]
    multipliers = sorted(sorted(init.lr_multipliers, key=lambda m: (abs(math.log(m)), m))[:lrs])
    return (f", or race at most {affordable} contenders at {plan.max_steps} steps, e.g. candidates [{', '.join(methods)}] × "
            f"lr_multipliers [{', '.join(f'{m:g}' for m in multipliers)}]")


def next_round_steps(plan: RacePlan, previous: int, alive: int, extra_spent: int, trained: int) -> int:
    """Twice the last round, as far as the extra steps left pay for every survivor but one; 0 ends the race."""
    affordable = (plan.extra_steps - extra_spent) // max(1, alive - 1)
    return max(0, min(2 * previous, affordable, plan.max_steps - trained))


def score(losses) -> Score:
    """Mean and standard error of per-example losses; inf when any is not finite (the contender diverged)."""
    import torch

    if losses is None or not bool(torch.isfinite(losses).all()):
        return Score(math.inf, math.inf)
    return Score(float(losses.mean()), _standard_error(losses), losses)


def _standard_error(values) -> float:
    return float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else math.inf


def judge(scores: dict[str, Score], sigmas: float, before: dict[str, Score] | None = None,
          first: dict[str, Score] | None = None, learning_rates: dict[str, float] | None = None,
          epochs: float = 0.0) -> dict[str, tuple[bool, str]]:
    """label -> (cut, why): cut when obviously worse than the leader now, or consistently worse (paired) in this round
    and in `before`, the previous round's scores, by a gap that is a real share of the leader's progress since `first`.
    On a run of more than TRUSTED_EPOCHS `epochs`, a contender at a lower learning rate than the leader's is kept."""
    leader = min(scores, key=lambda label: scores[label].loss)
    if not math.isfinite(scores[leader].loss):
        raise TrainingError("every contender of the init race diverged (non-finite loss). Lower train.learning_rate "
                            "or adapter.init.lr_multipliers, then run again.")
    verdicts = {}
    for label, own in scores.items():
        if label == leader:
            verdicts[label] = (False, "leads")
        elif not math.isfinite(own.loss):
            verdicts[label] = (True, "diverged (non-finite loss)")
        elif epochs > TRUSTED_EPOCHS and learning_rates and learning_rates[label] < learning_rates[leader]:
            verdicts[label] = (False, _late_verdict(label, leader, scores, learning_rates, epochs))
        else:
            verdicts[label] = _verdict(label, leader, scores, before or {}, sigmas, _progress(leader, scores, first or {}))
    return verdicts


def _verdict(label: str, leader: str, scores: dict[str, Score], before: dict[str, Score], sigmas: float,
             progress: float) -> tuple[bool, str]:
    own, best = scores[label], scores[leader]
    delta, margin = own.loss - best.loss, sigmas * math.hypot(own.noise, best.noise)
    if delta > margin:
        return True, f"worse than {leader} by Δ {delta:.4f} > {sigmas:g}σ {margin:.4f}"
    gap, gap_margin = _paired(own, best, sigmas)
    if not gap > gap_margin:
        return False, f"tied with {leader} by Δ {delta:.4f} ≤ {sigmas:g}σ {margin:.4f} (paired {gap:.4f} ≤ {gap_margin:.4f}); kept"
    paired = f"paired Δ {gap:.4f} > {sigmas:g}σ {gap_margin:.4f}"
    earlier, earlier_margin = _paired(before[label], before[leader], sigmas) if label in before and leader in before else (0.0, math.inf)
    if not (earlier > earlier_margin and gap >= earlier):
        return False, f"behind {leader} by {paired}, not yet in two rounds with a gap that holds; kept"
    held = f"{paired}, and {earlier:.4f} > {earlier_margin:.4f} a round before"
    if progress <= 0:
        return False, f"behind {leader} by {held}, but the leader has not improved since its first round; kept"
    if gap < RATE_SHARE * progress:
        return False, (f"behind {leader} by {held}, but {gap / progress:.0%} of the leader's progress ({progress:.4f}), under "
                       f"{RATE_SHARE:.0%}: a head start, not a slower rate; kept")
    return True, f"consistently worse than {leader}: {held}; {gap / progress:.0%} of the leader's progress"


def _late_verdict(label: str, leader: str, scores: dict[str, Score], learning_rates: dict[str, float], epochs: float) -> str:
    delta = scores[label].loss - scores[leader].loss
    return (f"behind {leader} by Δ {delta:.4f}, but at a lower LR ({learning_rates[label]:g} < {learning_rates[leader]:g}) on a "
            f"run of {epochs:.1f} epochs, over {TRUSTED_EPOCHS:g}: {UNSEEN_OVERFITTING}; kept")


def _progress(leader: str, scores: dict[str, Score], first: dict[str, Score]) -> float:
    """How far the leader's loss fell since its first round (0 when unknown or it rose)."""
    return max(0.0, first[leader].loss - scores[leader].loss) if leader in first else 0.0


def _paired(own: Score, best: Score, sigmas: float) -> tuple[float, float]:
    """The mean example-by-example gap and `sigmas` × its standard error; no gap without per-example losses."""
    if own.losses is None or best.losses is None or len(own.losses) != len(best.losses):
        return 0.0, math.inf
    differences = own.losses - best.losses
    return float(differences.mean()), sigmas * _standard_error(differences)


def simplest(tied: list[Contender]) -> Contender:
    """The tie's winner: the simplest method, at the learning rate nearest the user's (the lower one of two as near)."""
    return min(tied, key=lambda c: (c.simplicity, abs(math.log(c.multiplier)), c.multiplier))


def contenders_of(config) -> list[Contender]:
    from adapterflow.adapters.registry import DEFAULT_METHOD, FAMILIES, get_initializer

    init, lr = config.adapter.init, config.train.learning_rate
    contenders = []
    for place, candidate in enumerate(init.candidates):
        simplicity = (FAMILIES.index(get_initializer(candidate.method).family), candidate.method != DEFAULT_METHOD, place)
        contenders += [Contender(candidate.method, m, lr * m, candidate, simplicity) for m in init.lr_multipliers]
    return contenders


def run_race(config, base_ref, run_dir: Path, cache_root: Path | None, train_md5: str | None = None) -> dict:
    """Race the contenders; the winner's init folder (with its race checkpoint) is handed over at run_dir/init.

    Returns the winner, its init outcome (report, checks) and the race table.
    """
    plan, race_dir = race_plan(config), run_dir / "race"
    contenders = contenders_of(config)
    outcomes = _initialize(config, base_ref, contenders, race_dir, cache_root, train_md5)
    winner = _run_rounds(config, base_ref, contenders, plan, race_dir)
    _hand_over(winner, race_dir, run_dir)
    for contender in contenders:
        shutil.rmtree(race_dir / contender.label / "checkpoints", ignore_errors=True)
    table = race_table(contenders, plan, config.adapter.init.sigmas)
    return {"winner": winner, "outcome": outcomes[winner.label], "table": table}


def _initialize(config, base_ref, contenders: list[Contender], race_dir: Path, cache_root, train_md5) -> dict:
    """Each candidate's init once: LR arms whose init products have the same cache key share them (LoRA-SB's
    init follows the LR, so its arms differ; EVA, CorDA, LoRA-GA compute once for all their LRs)."""
    from adapterflow.adapters.cache import InitCache
    from adapterflow.tasks.init_adapter import cache_key_parts, initialize_adapter

    by_key, outcomes = {}, {}
    for contender in contenders:
        arm = _arm_config(config, contender)
        key = InitCache.key(cache_key_parts(arm, base_ref, train_md5))
        if key not in by_key:  # this arm pays for the init; the others with its key reuse it
            by_key[key] = initialize_adapter(arm, base_ref, race_dir / f"init-{len(by_key)}-{contender.method}", cache_root, train_md5)
            contender.init_seconds = by_key[key].seconds
        outcomes[contender.label] = by_key[key]
        contender.init_dir = by_key[key].init_dir
    return outcomes


def _run_rounds(config, base_ref, contenders: list[Contender], plan: RacePlan, race_dir: Path) -> Contender:
    alive, steps, number, before, first = list(contenders), plan.first_round, 0, {}, {}
    while steps:
        number += 1
        target = alive[0].steps + steps
        scores = {c.label: _advance(config, base_ref, c, target, race_dir) for c in alive}
        first = first or scores
        rates, epochs = {c.label: c.learning_rate for c in alive}, max(c.run_epochs for c in alive)
        verdicts = judge(scores, config.adapter.init.sigmas, before, first, rates, epochs)
        before = scores
        for contender in alive:
            own, (cut, why) = scores[contender.label], verdicts[contender.label]
            loss, noise = (value if math.isfinite(value) else None for value in (own.loss, own.noise))  # JSON has no inf
            contender.rounds.append({"round": number, "steps": target, "eval_loss": loss, "noise": noise, "verdict": why})
            if cut:
                contender.result, contender.why = "cut", f"round {number} (step {target}): {why}"
        alive = [c for c in alive if c.result != "cut"]
        _say_round(number, target, alive, scores, len(contenders))
        extra_spent = sum(c.steps for c in contenders) - target  # all but the eventual winner's steps
        steps = next_round_steps(plan, steps, len(alive), extra_spent, target) if len(alive) > 1 else 0
    return _crown(alive)


def _crown(alive: list[Contender]) -> Contender:
    winner = simplest(alive)
    winner.result = "winner"
    if len(alive) == 1:
        winner.why = "the last one left"
        return winner
    winner.why = f"tied with {len(alive) - 1} other(s) when the budget ended: the simplest method, LR nearest the user's"
    for other in alive:
        if other is not winner:
            other.why = f"tied when the budget ended; the tie went to {winner.label}"
    return winner


def _say_round(number: int, steps: int, alive: list[Contender], scores: dict[str, Score], total: int) -> None:
    from adapterflow.flows.progress import say

    standings = ", ".join(f"{c.label} {scores[c.label].loss:.4f}±{scores[c.label].noise:.4f}"
                          for c in sorted(alive, key=lambda c: scores[c.label].loss))
    say(f"{'init race':<10} round {number} (step {steps}): {len(alive)} of {total} contenders still in; {standings}")


def _with_init(config, init):
    return config.model_copy(update={"adapter": config.adapter.model_copy(update={"init": init})})


def _arm_config(config, contender: Contender):
    """The contender's run: the real run (same steps, schedule and global batch) with its init and LR, without periodic
    evaluation. It trains in this process: one process takes the whole global batch."""
    one_process = config.train.launch.model_copy(update={"mode": "in_process", "processes": 1})
    train = config.train.model_copy(update={"learning_rate": contender.learning_rate, "eval_every": None, "launch": one_process})
    return _with_init(config, contender.init).model_copy(update={"train": train})


def _advance(config, base_ref, contender: Contender, target: int, race_dir: Path) -> Score:
    """Train on to step `target` (from the contender's last checkpoint) and score it on the validation split."""
    from adapterflow.tasks.journal import JOURNAL_FILE
    from adapterflow.tasks.train import train_more

    arm_dir = race_dir / contender.label
    arm_dir.mkdir(parents=True, exist_ok=True)
    arm = _arm_config(config, contender)
    trainer = train_more(arm, base_ref, Path(contender.init_dir), arm_dir, target, arm_dir / JOURNAL_FILE)
    contender.steps = target
    if trainer is None:
        return score(None)
    contender.run_epochs = run_epochs(trainer)
    return score(validation_losses(trainer, arm, base_ref))


def run_epochs(trainer) -> float:
    """Passes over the (encoded, maybe packed) train split in the trainer's max_steps at its global batch."""
    args = trainer.args
    if args.max_steps <= 0:  # train.epochs set instead of max_steps
        return float(args.num_train_epochs)
    rows = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return rows / max(1, len(trainer.train_dataset))


def validation_losses(trainer, config, base_ref):
    """Per-example validation losses of the trainer's model: classification cross-entropy, or a causal LM's mean over
    each example's answer tokens. The race's noise estimate is their spread."""
    import torch
    from torch.utils.data import DataLoader

    from adapterflow.tasks.encode import collator
    from adapterflow.tasks.model_io import load_tokenizer

    pad = collator(config, load_tokenizer(base_ref), packed=False)  # one row per example, even when training packs
    batches = DataLoader(trainer.eval_dataset, batch_size=config.evaluate.batch_size, collate_fn=pad)
    model, losses = trainer.model.eval(), []
    with torch.no_grad():
        for batch in batches:
            batch = {key: value.to(trainer.args.device) for key, value in batch.items()}
            losses.append(_example_losses(model(**batch).logits.float(), batch["labels"], config.task).cpu())
    return torch.cat(losses)


def _example_losses(logits, labels, task: str):
    from torch.nn.functional import cross_entropy

    if task == "sequence_classification":
        return cross_entropy(logits, labels, reduction="none")
    targets = labels[:, 1:]
    per_token = cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return per_token.sum(1) / (targets != -100).sum(1).clamp(min=1)


def _hand_over(winner: Contender, race_dir: Path, run_dir: Path) -> None:
    """The winner's init products and race checkpoint to run_dir/init, its race-time log records to the run's journal
    (the MLflow run then shows the whole curve from step 1)."""
    from adapterflow.tasks.journal import JOURNAL_FILE

    init_dir = run_dir / "init"
    shutil.copytree(winner.init_dir, init_dir)
    checkpoints = sorted((race_dir / winner.label / "checkpoints").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[-1]))
    shutil.move(str(checkpoints[-1]), init_dir / CHECKPOINT)
    winner.init_dir = str(init_dir)
    journal = race_dir / winner.label / JOURNAL_FILE
    if journal.exists():
        (run_dir / JOURNAL_FILE).write_text("".join(_race_log_lines(journal)))


def _race_log_lines(journal: Path) -> list[str]:
    """The "log" records of the winner's race rounds, without each round's end-of-training summary."""
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    return [json.dumps(r) + "\n" for r in records
            if r.get("event") == "log" and not any(key.startswith("train/final_") for key in r["metrics"])]


def race_table(contenders: list[Contender], plan: RacePlan, sigmas: float) -> dict:
    winner = next(c for c in contenders if c.result == "winner")
    extra = sum(c.steps for c in contenders) - winner.steps
    rows = [{"method": c.method, "learning_rate": c.learning_rate, "lr_multiplier": c.multiplier, "init_seconds": c.init_seconds,
             "steps": c.steps, "result": c.result, "why": c.why, "rounds": c.rounds} for c in contenders]
    return {
        "max_steps": plan.max_steps, "extra_budget": plan.extra_steps, "extra_steps": extra, "total_steps": plan.max_steps + extra,
        "sigmas": sigmas, "run_epochs": round(max(c.run_epochs for c in contenders), 2), "winner": winner.label,
        "winner_race_steps": winner.steps, "contenders": rows,
    }


def write_race_table(table: dict, run_dir: Path) -> tuple[Path, Path]:
    """init_race.json (every round's steps, loss, noise and verdict) and init_race.md beside it."""
    json_path, markdown_path = run_dir / "init_race.json", run_dir / "init_race.md"
    json_path.write_text(json.dumps(table, indent=1))
    markdown_path.write_text(race_markdown(table))
    return json_path, markdown_path


def race_markdown(table: dict) -> str:
    lines = [
        f"{table['max_steps']} training steps + {table['extra_steps']} extra for the contenders that lost "
        f"(at most {table['extra_budget']}) = {table['total_steps']} optimizer steps; cut when worse than the leader by "
        f"more than {table['sigmas']:g}σ of the two losses' noise, or by more than {table['sigmas']:g}σ of the paired "
        f"(example-by-example) gap's noise in two rounds running with a gap that holds. {table['winner']} continues from its race step "
        f"{table['winner_race_steps']}.{_horizon_text(table.get('run_epochs', 0.0))}",
        "",
        "| contender | init s | steps | eval loss ± σ by round (step) | result | why |",
        "|---|---|---|---|---|---|",
    ]
    order = {"winner": 0, "tied": 1, "cut": 2}
    for row in sorted(table["contenders"], key=lambda r: (order[r["result"]], -r["steps"], _last_loss(r))):
        losses = " → ".join(_loss_text(r) for r in row["rounds"])
        contender = f"{row['method']} @ lr {row['learning_rate']:g}"
        lines.append(f"| {contender} | {row['init_seconds']:.2f} | {row['steps']} | {losses} | {row['result']} | {row['why']} |")
    return "\n".join(lines) + "\n"


def _horizon_text(epochs: float) -> str:
    if epochs <= TRUSTED_EPOCHS:
        return ""
    return (f" The run makes {epochs:.1f} passes over the train split, more than {TRUSTED_EPOCHS:g}: contenders at a lower LR "
            f"than the leader's were kept ({UNSEEN_OVERFITTING}).")


def _last_loss(row: dict) -> float:
    loss = row["rounds"][-1]["eval_loss"] if row["rounds"] else None
    return math.inf if loss is None else loss


def _loss_text(round_row: dict) -> str:
    if round_row["eval_loss"] is None:
        return f"diverged ({round_row['steps']})"
    noise = "?" if round_row["noise"] is None else f"{round_row['noise']:.4f}"
    return f"{round_row['eval_loss']:.4f}±{noise} ({round_row['steps']})"
