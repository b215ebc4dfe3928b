"""The initialize stage: run the configured initializer once and write its products to disk."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from adapterflow.digests import file_md5

PROBE_TEXTS = ["A short probe sentence for checking the adapter.", "Another probe, a little longer than the first one is."]
TASK_TYPES = {"sequence_classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


@dataclass(frozen=True)
class InitOutcome:
    init_dir: str
    report_path: str
    method: str
    seconds: float
    checks: dict
    cache: str  # "hit" | "miss" | "off"
    plot_path: str | None = None
    learning_rate: float | None = None  # auto: the race winner's learning rate, used for the real run
    race_path: str | None = None  # auto: the race table (markdown)

    def to_dict(self) -> dict:
        return asdict(self)


def lora_settings(config):
    from adapterflow.adapters import LoraSettings

    knobs = config.adapter.init.model_dump(exclude={"method"})
    if config.adapter.init.method == "lora_sb" and knobs["update_lr"] is None:
        knobs["update_lr"] = first_step_lr(config)
    modules = tuple(config.adapter.modules_to_save) if config.adapter.modules_to_save else None
    return LoraSettings(
        r=config.adapter.r, alpha=config.adapter.alpha, dropout=config.adapter.dropout,
        target_modules=tuple(config.adapter.target_modules), task_type=TASK_TYPES[config.task],
        modules_to_save=modules, knobs=knobs,
    )


def first_step_lr(config) -> float:
    """The learning rate of the first step that moves the weights: HF's linear warmup starts at 0, then lr/warmup."""
    import math

    train = config.train
    if not train.warmup_ratio:
        return train.learning_rate
    return train.learning_rate / max(1, math.ceil(train.warmup_ratio * total_steps(config)))


def total_steps(config) -> int:
    import math

    from adapterflow.tasks.data_io import read_split

    if config.train.max_steps:
        return config.train.max_steps
    per_epoch = math.ceil(len(read_split(config.data.train, "data.train")) / (config.train.batch_size * config.train.grad_accumulation))
    return math.ceil(per_epoch * config.train.epochs)


def initialize_adapter(config, base_ref, run_dir: Path, cache_root: Path | None = None) -> InitOutcome:
    """Products from the init cache when their key matches, otherwise computed (and stored)."""
    if config.adapter.init.method == "auto":
        return _race_winner(config, base_ref, run_dir, cache_root)
    from adapterflow.adapters.cache import InitCache
    from adapterflow.tasks.init_plots import plot_spectra

    start = time.perf_counter()
    init_dir, report_path = run_dir / "init", run_dir / "init_report.json"
    cache = InitCache(cache_root) if cache_root and config.adapter.cache_init else None
    key = InitCache.key(cache_key_parts(config, base_ref)) if cache else None
    report = cache.fetch(key, init_dir) if cache else None
    status = "hit" if report is not None else ("miss" if cache else "off")
    if report is None:
        report = _compute(config, base_ref, init_dir)
        if cache:
            cache.store(key, init_dir, report)
    report = dict(report, cache=status, seconds=time.perf_counter() - start, compute_seconds=report["seconds"])
    report_path.write_text(json.dumps(report, indent=2))
    plot = plot_spectra(report.get("spectra", {}), report["method"], run_dir / "init_spectrum.png")
    return InitOutcome(str(init_dir), str(report_path), report["method"], report["seconds"], report["checks"], status, str(plot) if plot else None)


def check_init_plan(config) -> None:
    """What the init stage will need, checked before any compute (an auto race's step budget)."""
    if config.adapter.init.method == "auto":
        from adapterflow.tasks.race import race_plan

        race_plan(config)


def _race_winner(config, base_ref, run_dir: Path, cache_root: Path | None) -> InitOutcome:
    from adapterflow.tasks.race import race_markdown, run_race

    start = time.perf_counter()
    race = run_race(config, base_ref, run_dir, cache_root)
    winner, outcome = race["winner"], race["outcome"]
    report = json.loads(Path(outcome.report_path).read_text())
    seconds = time.perf_counter() - start
    race_steps = sum(row["steps"] for row in race["table"])
    report.update(race=race["table"], chosen_learning_rate=winner.learning_rate, seconds=seconds, race_steps=race_steps)
    report["notes"].append(f"auto: {winner.method} at lr {winner.learning_rate:g} won a race of {len(race['table'])} "
                           f"contenders over {len(race['schedule'])} rounds ({race_steps} training steps in all)")
    report_path, race_path = run_dir / "init_report.json", run_dir / "init_race.md"
    report_path.write_text(json.dumps(report, indent=2))
    race_path.write_text(race_markdown(race["table"]))
    return InitOutcome(outcome.init_dir, str(report_path), winner.method, seconds, outcome.checks, outcome.cache,
                       outcome.plot_path, winner.learning_rate, str(race_path))


def cache_key_parts(config, base_ref) -> dict:
    """Everything the init products depend on; the seed fixes the new classifier head."""
    from importlib.metadata import version

    from adapterflow.adapters import get_initializer

    parts = {
        "base": base_ref.identity, "dtype": config.model.dtype, "quantization": config.model.quantization, "task": config.task, "labels": config.data.labels,
        "seed": config.train.seed, "adapter": config.adapter.model_dump(mode="json", exclude={"cache_init"}),
        "peft": version("peft"), "torch": version("torch"),
    }
    initializer = get_initializer(config.adapter.init.method)
    if initializer.needs_data:
        parts.update(train_md5=file_md5(Path(config.data.train)), max_length=config.data.max_length, batch_size=config.train.batch_size)
    if initializer.needs_grad:
        parts["knobs"] = lora_settings(config).knobs  # LoRA-SB's update_lr derives from the train section
    knowledge = getattr(config.adapter.init, "knowledge", None)
    if knowledge:
        parts["knowledge_md5"] = file_md5(Path(knowledge))
    return parts


def calibration_data(config, tokenizer):
    """CorDA hooks expect one sample per forward; gradient methods need labels; EVA takes inputs only."""
    from adapterflow.adapters import get_initializer

    if config.adapter.init.method == "corda":
        return calibration_samples(config, tokenizer)
    return calibration_batches(config, tokenizer, labelled=get_initializer(config.adapter.init.method).needs_grad)


def calibration_samples(config, tokenizer) -> list[dict]:
    """Single unpadded samples: the task's train texts (IPM) or the knowledge file's (KPM)."""
    import torch

    from adapterflow.tasks.data_io import read_split

    init = config.adapter.init
    if init.mode == "kpm":
        frame = read_split(init.knowledge, "adapter.init.knowledge")
        if init.knowledge_field not in frame.columns:
            from adapterflow.errors import DataError

            raise DataError(f"adapter.init.knowledge {init.knowledge} has no column {init.knowledge_field!r}; set adapter.init.knowledge_field.")
        texts = frame[init.knowledge_field].astype(str).tolist()
        rows = [tokenizer(t, truncation=True, max_length=config.data.max_length) for t in texts]
    else:
        from adapterflow.tasks.encode import encode_split

        rows = list(encode_split(config, tokenizer, "train"))
    rows = rows[: init.samples]
    return [{"input_ids": torch.tensor([r["input_ids"]]), "attention_mask": torch.tensor([r["attention_mask"]])} for r in rows]


def calibration_batches(config, tokenizer, labelled: bool = False):
    """Train-split batches in seeded order; without labels for methods that only look at activations."""
    import torch
    from torch.utils.data import DataLoader

    from adapterflow.tasks.encode import collator, encode_split

    dataset = encode_split(config, tokenizer, "train")
    if not labelled:
        dataset = dataset.remove_columns(["labels"])
    generator = torch.Generator().manual_seed(config.train.seed)
    pad = collator(config, tokenizer)
    # peft's EVA accepts plain dicts only, not the collator's BatchEncoding.
    return DataLoader(dataset, batch_size=config.train.batch_size, shuffle=True, generator=generator, collate_fn=lambda rows: dict(pad(rows)))


def _compute(config, base_ref, init_dir: Path) -> dict:
    from transformers import set_seed

    from adapterflow.adapters import InitContext, export_init, get_initializer, initialize
    from adapterflow.tasks.model_io import load_model, load_tokenizer

    if config.train.threads:  # the SVDs and calibration passes use the same thread budget as training
        import torch

        torch.set_num_threads(config.train.threads)
    set_seed(config.train.seed)
    tokenizer = load_tokenizer(base_ref)
    method = config.adapter.init.method
    in_full_precision = bool(config.model.quantization) and runs_in_full_precision(method)
    model = load_model(base_ref, config.task, config.data.labels, config.model.dtype, None if in_full_precision else config.model.quantization)
    probe = tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt")
    calibration = calibration_data(config, tokenizer) if get_initializer(method).needs_data else None
    peft_model, report = initialize(model, lora_settings(config), method, InitContext(probe=dict(probe), calibration=calibration))
    export_init(peft_model, init_dir, method)
    if in_full_precision:
        report.notes.append(f"computed on the full-precision base; training quantizes the residual ({config.model.quantization})")
    return report.to_dict()


def runs_in_full_precision(method: str) -> bool:
    """Base-rewriting methods decompose W itself (QPiSSA); gradient methods take gradients of a full-precision copy."""
    from adapterflow.adapters import get_initializer

    initializer = get_initializer(method)
    return initializer.mutates_base or initializer.needs_grad
