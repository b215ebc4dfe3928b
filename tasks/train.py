"""Training: apply the init products to the base model, fine-tune with the HF Trainer, save a plain adapter."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import TrainerCallback

from adapterflow.errors import ConfigError, TrainingError
from adapterflow.tasks.checkpoint_merge import CheckpointSnapshots
from adapterflow.tasks.journal import JOURNAL_FILE, TrainingJournal


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: str
    steps: int
    train_loss: float
    seconds: float
    samples_per_second: float
    device: str
    merged_adapter_dir: str | None = None  # train.checkpoint_merge: the MWA candidate beside the final adapter
    merge: dict | None = None
    resumed_from: str | None = None  # the checkpoint an interrupted run's rerun continued from
    processes: int = 1
    peak_memory_mb: float = 0.0  # this process: CUDA memory allocated on a GPU, resident memory on CPU

    def to_dict(self) -> dict:
        return asdict(self)


def train_adapter(config, base_ref, init_dir: Path, run_dir: Path, resume_from: str | None = None, quiet: bool = False) -> TrainResult:
    """Fine-tune from `init_dir` (or resume a checkpoint); progress and step metrics go to the run's journal only.

    Under torch distributed every rank trains and rank 0 alone writes the adapter and the journal.
    `quiet`: no Trainer progress bar or log prints (in the flow's process, which draws its own from the journal).
    """
    from adapterflow.adapters import save_trained_adapter

    run_dir.mkdir(parents=True, exist_ok=True)  # the journal is written from the first step, before any checkpoint
    snapshots = CheckpointSnapshots(config.train.checkpoint_merge.checkpoints) if config.train.checkpoint_merge else None
    callbacks = [NonFiniteLossGuard(), TrainingJournal(run_dir / JOURNAL_FILE), ThisRunsIntervals()]
    callbacks += [snapshots] if snapshots else []
    trainer, device = _build_trainer(config, base_ref, init_dir, run_dir, callbacks, quiet)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from or race_checkpoint(init_dir))
    seconds = time.perf_counter() - start
    merged_dir = merge = None
    if trainer.is_world_process_zero():
        if snapshots:
            snapshots.take(trainer.model, trainer.state)  # the final weights, if the last step saved no checkpoint
        save_trained_adapter(trainer.model, run_dir / "adapter", init_dir)
        (run_dir / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        if snapshots:
            merged_dir, merge = _save_merged(trainer.model, list(snapshots.snapshots), config, run_dir, init_dir)
    return TrainResult(
        str(run_dir / "adapter"), trainer.state.global_step, float(output.training_loss), seconds,
        float(output.metrics.get("train_samples_per_second", 0.0)), device, merged_dir, merge,
        resumed_from=resume_from, processes=trainer.args.world_size, peak_memory_mb=peak_memory_mb(device),
    )


def peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _save_merged(model, snapshots: list, config, run_dir: Path, init_dir: Path) -> tuple[str, dict]:
    """After the final adapter is saved (parametrizations folded): load the MWA average and save it too."""
    from adapterflow.adapters import save_trained_adapter
    from adapterflow.tasks.checkpoint_merge import load_tensors, merge_report, mwa_weights, weighted_average

    spec = config.train.checkpoint_merge
    weights = mwa_weights(snapshots, spec.penalty, spec.weight_by)
    load_tensors(model, weighted_average(snapshots, weights))
    merged_dir = save_trained_adapter(model, run_dir / "adapter_merged", init_dir)
    return str(merged_dir), merge_report(snapshots, weights, spec)


def race_checkpoint(init_dir: Path) -> str | None:
    """An `auto` winner's init folder holds its race checkpoint: training continues it (an interrupted run's wins)."""
    from adapterflow.tasks.race import CHECKPOINT

    folder = Path(init_dir) / CHECKPOINT
    return str(folder) if folder.is_dir() else None


class PauseAt(TrainerCallback):
    """Ends training after step `step` with a checkpoint there; the schedule stays the full run's, so a resumed run
    goes on exactly as if it had never stopped."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = control.should_training_stop = True


def train_more(config, base_ref, init_dir: Path, run_dir: Path, pause_at: int, journal: Path | None = None):
    """Train on the run's own schedule until step `pause_at`, resuming `run_dir`'s last checkpoint; returns the trainer
    (its model at that step, a checkpoint saved there), or None when the loss became non-finite.

    For the init race: a contender that diverges is out instead of stopping the run.
    """
    callbacks = [NonFiniteLossGuard(), PauseAt(pause_at)] + ([TrainingJournal(journal)] if journal else [])
    trainer, _ = _build_trainer(config, base_ref, init_dir, run_dir, callbacks, quiet=True)
    try:
        trainer.train(resume_from_checkpoint=any((run_dir / "checkpoints").glob("checkpoint-*")) or None)
    except TrainingError:
        return None
    return trainer


def _build_trainer(config, base_ref, init_dir: Path, run_dir: Path, callbacks: list, quiet: bool = False):
    import torch
    from transformers import set_seed

    from adapterflow.adapters import apply_init
    from adapterflow.tasks.encode import collator, encode_split
    from adapterflow.tasks.model_io import load_tokenizer
    from adapterflow.tasks.regularized_trainer import trainer_class

    device = pick_device(config.train.device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    set_seed(config.train.seed)
    tokenizer = load_tokenizer(base_ref)
    base, full_precision = _base_for_training(config, base_ref)
    model = apply_init(base, init_dir, full_precision)
    train_set, eval_set = encode_split(config, tokenizer, "train"), encode_split(config, tokenizer, "validation")
    classification = config.task == "sequence_classification"
    args = _training_args(config, run_dir, device, quiet)
    trainer = trainer_class(init_dir, args.learning_rate)(  # a method's regularizer (KaSA, SORSA) joins the loss
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=collator(config, tokenizer), callbacks=callbacks, optimizers=(loraplus_optimizer(config, model, args), None),
        compute_metrics=eval_accuracy if classification else None,
        preprocess_logits_for_metrics=(lambda logits, labels: logits.argmax(-1)) if classification else None,
    )
    if quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # without a progress bar the Trainer prints every log line
    return trainer, device


def loraplus_optimizer(config, model, args):
    """LoRA+: B's learning rate is adapter.loraplus_lr_ratio × A's (peft's param groups); None: the Trainer builds its own.

    The optimizer class and its arguments are the Trainer's own for train.optimizer, so every optimizer name keeps its
    meaning (fused AdamW, bitsandbytes' 8-bit and paged ones); the scheduler scales each group's rate alike.
    """
    ratio = config.adapter.loraplus_lr_ratio
    if ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs.pop("lr", None)  # given as lr= below
    return create_loraplus_optimizer(model, optimizer_cls, lr=args.learning_rate, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=args.weight_decay, **kwargs)


def eval_accuracy(prediction) -> dict:
    """Accuracy beside eval loss in every periodic evaluation (the dashboards' metric over steps)."""
    import numpy as np

    return {"accuracy": float(np.mean(prediction.predictions == prediction.label_ids))}


def _base_for_training(config, base_ref):
    """The base model (quantized when configured) and, for a quantized base, its full-precision weights."""
    from adapterflow.tasks.model_io import full_precision_lookup, load_model

    quantization, labels = config.model.quantization, config.data.labels
    model = load_model(base_ref, config.task, labels, config.model.dtype, quantization, training=True)  # never CPU-packed
    if not quantization:
        return model, None
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, full_precision_lookup(base_ref, config.task, labels, config.model.dtype)


def pick_device(requested: str) -> str:
    import torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        from adapterflow.tasks.hardware import NO_CUDA

        raise ConfigError(NO_CUDA)
    return "cuda" if requested != "cpu" and available else "cpu"


def _training_args(config, run_dir: Path, device: str, quiet: bool = False):
    from transformers import TrainingArguments

    train = config.train
    length = {"max_steps": train.max_steps} if train.max_steps else {"num_train_epochs": train.epochs}
    evaluate_periodically = {"eval_strategy": "steps", "eval_steps": train.eval_every} if train.eval_every else {"eval_strategy": "no"}
    precision = resolve_precision(train.precision, device)
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        **length,
        **evaluate_periodically,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        per_device_train_batch_size=train.batch_size // train.launch.processes,  # batch_size is the global batch
        per_device_eval_batch_size=config.evaluate.batch_size,
        gradient_accumulation_steps=train.grad_accumulation,
        seed=train.seed,
        save_strategy="steps",
        save_steps=train.checkpoint_every,
        save_total_limit=2,
        logging_steps=train.log_every,
        logging_nan_inf_filter=False,  # the default hides NaN losses from the logs
        report_to=[],
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        optim=train.optimizer,
        label_names=["labels"],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # transformers multiplies the loss by the process count whenever forward takes **kwargs (peft's
        # does), expecting a token-normalized loss; the classification loss is a per-batch mean, so that
        # doubled its gradients under DDP. Causal LM losses do use num_items_in_batch.
        average_tokens_across_devices=config.task == "causal_lm",
        ddp_find_unused_parameters=False,  # frozen base weights never get gradients; the search costs a graph walk a step
        disable_tqdm=quiet or None,
    )


def resolve_precision(requested: str, device: str) -> str:
    """auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (CPU autocast only when asked)."""
    if requested != "auto":
        return requested
    if device != "cuda":
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class ThisRunsIntervals(TrainerCallback):
    """The run's own logging, evaluation and save intervals, also when it continues a checkpoint. transformers
    restores them from the checkpoint's trainer state: an `auto` winner continued its race run, whose contenders the
    Trainer never evaluated, and lost every periodic evaluation of `train.eval_every`."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)


class NonFiniteLossGuard(TrainerCallback):
    """Stop at the first logged NaN/inf loss: a diverged run must never be registered."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                # Not "rerun to resume": a rerun of the unchanged config continues from this run's checkpoints into the
                # same divergence; a changed learning rate or data set is a new config and trains from scratch.
                raise TrainingError(
                    f"training diverged: {key} became {value} at step {state.global_step}. Nothing was registered. "
                    f"Lower train.learning_rate (now {args.learning_rate}) or check the data, then run again: the changed "
                    "config trains from scratch, without this run's checkpoints."
                )
