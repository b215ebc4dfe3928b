"""The initialize stage: run the configured initializer once and write its products to disk."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
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
    learning_rate: float | None = None  # a race's winner's learning rate, used for the real run
    race_path: str | None = None  # a race's table (markdown)
    race_contenders: int | None = None
    race_extra_steps: int | None = None  # what the losers trained, beyond the winner's run

    def to_dict(self) -> dict:
        return asdict(self)


def lora_settings(config):
    from adapterflow.adapters import LoraSettings

    modules = tuple(config.adapter.modules_to_save) if config.adapter.modules_to_save else None
    return LoraSettings(
        r=config.adapter.r, alpha=config.adapter.alpha, dropout=config.adapter.dropout,
        target_modules=tuple(config.adapter.target_modules), task_type=TASK_TYPES[config.task],
        modules_to_save=modules, init=init_for_run(config), variant=config.adapter.variant,
        rank_pattern=dict(config.adapter.rank_pattern), alpha_pattern=dict(config.adapter.alpha_pattern),
    )


def init_for_run(config):
    """The init config with the knobs it leaves to the run (its `run_defaults`) filled in."""
    init = config.adapter.init
    missing = {field: source for field, source in init.run_defaults.items() if getattr(init, field) is None}
    return init.model_copy(update={field: RUN_VALUES[source](config) for field, source in missing.items()})


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


RUN_VALUES = {"first_step_lr": first_step_lr}  # what an init config's run_defaults may name


def configured_initializer(config):
    from adapterflow.adapters import get_initializer

    return get_initializer(config.adapter.init.method)


def initialize_adapter(config, base_ref, run_dir: Path, cache_root: Path | None = None, train_md5: str | None = None) -> InitOutcome:
    """Products from the init cache when their key matches, otherwise computed (and stored).

    `train_md5`: the run's digest of the train split, hashed once when the run started (else hashed here).
    """
    if configured_initializer(config).is_race:
        return _race_winner(config, base_ref, run_dir, cache_root, train_md5)
    from adapterflow.adapters.cache import InitCache
    from adapterflow.tasks.init_plots import plot_spectra

    start = time.perf_counter()
    init_dir, report_path = run_dir / "init", run_dir / "init_report.json"
    cache = InitCache(cache_root) if cache_root and config.adapter.cache_init else None
    key = InitCache.key(cache_key_parts(config, base_ref, train_md5)) if cache else None
    report = cache.fetch(key, init_dir) if cache else None
    status = "hit" if report is not None else ("miss" if cache else "off")
    if report is None:
        report = _compute(config, base_ref, init_dir)
        if cache:
            cache.store(key, init_dir, report)
    report = dict(report, cache=status, seconds=time.perf_counter() - start, compute_seconds=report["seconds"])
    report_path.write_text(json.dumps(report, indent=2))
    plot = plot_spectra(report.get("spectra", {}), report["method"], run_dir / "init_spectrum.png")
    return InitOutcome(str(init_dir), str(report_path), report["method"], report["seconds"], report["checks"], status,
                       str(plot) if plot else None)


def check_init_plan(config) -> None:
    """What the init stage will need, checked before any compute (a race's step budget); a race too short to decide
    is a warning on stderr, not an error: it still trains as much as a plain run would."""
    if configured_initializer(config).is_race:
        import sys

        from adapterflow.tasks.race import many_epochs_warning, race_plan, thin_race_warning

        for warning in (thin_race_warning(race_plan(config), config), many_epochs_warning(config)):
            if warning:
                print(f"warning: {warning}", file=sys.stderr)


def _race_winner(config, base_ref, run_dir: Path, cache_root: Path | None, train_md5: str | None) -> InitOutcome:
    from adapterflow.tasks.race import run_race, write_race_table

    start = time.perf_counter()
    race = run_race(config, base_ref, run_dir, cache_root, train_md5)
    winner, outcome, table = race["winner"], race["outcome"], race["table"]
    report = json.loads(Path(outcome.report_path).read_text())
    seconds = time.perf_counter() - start
    report.update(race=table, chosen_learning_rate=winner.learning_rate, seconds=seconds)
    report["notes"].append(f"{config.adapter.init.method}: {winner.method} at lr {winner.learning_rate:g} won a race of "
                           f"{len(table['contenders'])} contenders ({winner.why}); training continues its race checkpoint "
                           f"at step {winner.steps}; {table['extra_steps']} extra steps, {table['total_steps']} in all")
    report_path = run_dir / "init_report.json"
    report_path.write_text(json.dumps(report, indent=2))
    _, race_path = write_race_table(table, run_dir)
    return InitOutcome(winner.init_dir, str(report_path), winner.method, seconds, outcome.checks, outcome.cache,
                       outcome.plot_path, winner.learning_rate, str(race_path), len(table["contenders"]), table["extra_steps"])


def cache_key_parts(config, base_ref, train_md5: str | None = None) -> dict:
    """Everything the init products depend on; the seed fixes the new classifier head."""
    from importlib.metadata import version

    parts = {
        "base": base_ref.identity, "dtype": config.model.dtype, "quantization": config.model.quantization, "task": config.task,
        "labels": config.data.labels, "seed": config.train.seed, "adapter": adapter_key(config.adapter),
        "peft": version("peft"), "torch": version("torch"),
    }
    initializer, init = configured_initializer(config), config.adapter.init
    if initializer.needs_data:
        train_md5 = train_md5 or file_md5(Path(config.data.train))
        parts.update(train_md5=train_md5, max_length=config.data.max_length, batch_size=config.train.batch_size)
    if initializer.needs_grad:  # knobs a gradient method leaves to the run derive from the train section
        parts["knobs"] = init_for_run(config).model_dump(exclude={"method"})
    for field in init.path_fields:
        if getattr(init, field):
            parts[f"{field}_md5"] = file_md5(Path(getattr(init, field)))
    return parts


# Keys added to the adapter section later, left out at their defaults so existing cache entries still match.
LATER_ADAPTER_KEYS = {"variant": "lora", "rank_pattern": {}, "alpha_pattern": {}}


def adapter_key(adapter) -> dict:
    """The adapter section as the init products depend on it: LoRA+ only changes the optimizer, so it is left out."""
    dumped = adapter.model_dump(mode="json", exclude={"cache_init", "loraplus_lr_ratio"})
    return {key: value for key, value in dumped.items() if LATER_ADAPTER_KEYS.get(key, object()) != value}


def calibration_data(config, tokenizer):
    """In the form the method takes: single samples or batches (labelled for gradient methods)."""
    initializer = configured_initializer(config)
    if initializer.calibration == "samples":
        return calibration_samples(config, tokenizer)
    return calibration_batches(config, tokenizer, labelled=initializer.needs_grad)


def calibration_samples(config, tokenizer) -> list[dict]:
    """Single unpadded samples, from the train split or from the data file the init config names."""
    import torch

    source = config.adapter.init.sample_source()
    if source.file_field:
        rows = _file_samples(config, tokenizer, source)
    else:
        from adapterflow.tasks.encode import encode_split

        rows = list(encode_split(config, tokenizer, "train"))
    rows = rows[: source.limit]
    return [{"input_ids": torch.tensor([r["input_ids"]]), "attention_mask": torch.tensor([r["attention_mask"]])} for r in rows]


def _file_samples(config, tokenizer, source) -> list[dict]:
    from adapterflow.tasks.data_io import read_split

    init = config.adapter.init
    path, column = getattr(init, source.file_field), getattr(init, source.text_field)
    frame = read_split(path, f"adapter.init.{source.file_field}")
    if column not in frame.columns:
        from adapterflow.errors import DataError

        raise DataError(f"adapter.init.{source.file_field} {path} has no column {column!r}; set adapter.init.{source.text_field}.")
    return [tokenizer(text, truncation=True, max_length=config.data.max_length) for text in frame[column].astype(str).tolist()]


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
    return DataLoader(dataset, batch_size=config.train.batch_size, shuffle=True, generator=generator,
                      collate_fn=lambda rows: dict(pad(rows)))


def _compute(config, base_ref, init_dir: Path) -> dict:
    from transformers import set_seed

    from adapterflow.adapters import InitContext, export_init, initialize
    from adapterflow.tasks.model_io import load_model, load_tokenizer

    if config.train.threads:  # the SVDs and calibration passes use the same thread budget as training
        import torch

        torch.set_num_threads(config.train.threads)
    set_seed(config.train.seed)
    tokenizer = load_tokenizer(base_ref)
    method = config.adapter.init.method
    in_full_precision = bool(config.model.quantization) and runs_in_full_precision(method)
    quantization = None if in_full_precision else config.model.quantization
    model = load_model(base_ref, config.task, config.data.labels, config.model.dtype, quantization)
    probe = tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt")
    initializer = configured_initializer(config)
    if not initializer.needs_data:
        peft_model, report = initialize(model, lora_settings(config), method, InitContext(probe=dict(probe)))
    else:
        with calibration_progress(method, initializer.calibration) as progress:
            context = InitContext(probe=dict(probe), calibration=calibration_data(config, tokenizer), progress=progress)
            peft_model, report = initialize(model, lora_settings(config), method, context)
    export_init(peft_model, init_dir, method, init_for_run(config))
    if in_full_precision:
        report.notes.append(f"computed on the full-precision base; training quantizes the residual ({config.model.quantization})")
    return report.to_dict()


@contextmanager
def calibration_progress(method: str, calibration: str):
    """The hook that shows the initializer's calibration passes (flows/progress.py), closed however init ends."""
    from adapterflow.flows.progress import calibration_display

    display = calibration_display(method, "sample" if calibration == "samples" else "batch")
    try:
        yield display
    finally:
        display.close()


def runs_in_full_precision(method: str) -> bool:
    """Methods that cannot work on quantized weights (decomposing W, taking its gradient) get the full-precision base."""
    from adapterflow.adapters import get_initializer

    return not get_initializer(method).supports_quantized
