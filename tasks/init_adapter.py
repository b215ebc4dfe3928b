"""The initialize stage: run the configured initializer once and write its products to disk."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

PROBE_TEXTS = ["A short probe sentence for checking the adapter.", "Another probe, a little longer than the first one is."]
TASK_TYPES = {"sequence_classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


@dataclass(frozen=True)
class InitOutcome:
    init_dir: str
    report_path: str
    method: str
    seconds: float
    checks: dict

    def to_dict(self) -> dict:
        return asdict(self)


def lora_settings(config):
    from adapters import LoraSettings

    knobs = config.adapter.init.model_dump(exclude={"method"})
    modules = tuple(config.adapter.modules_to_save) if config.adapter.modules_to_save else None
    return LoraSettings(
        r=config.adapter.r, alpha=config.adapter.alpha, dropout=config.adapter.dropout,
        target_modules=tuple(config.adapter.target_modules), task_type=TASK_TYPES[config.task],
        modules_to_save=modules, knobs=knobs,
    )


def initialize_adapter(config, base_ref, run_dir: Path) -> InitOutcome:
    from transformers import set_seed

    from adapters import InitContext, export_init, get_initializer, initialize
    from tasks.model_io import load_model, load_tokenizer

    set_seed(config.train.seed)
    tokenizer = load_tokenizer(base_ref)
    model = load_model(base_ref, config.task, config.data.labels, config.model.dtype)
    method = config.adapter.init.method
    probe = tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt")
    peft_model, report = initialize(model, lora_settings(config), method, InitContext(probe=dict(probe)))
    init_dir = export_init(peft_model, run_dir / "init", method, get_initializer(method).mutates_base)
    report_path = run_dir / "init_report.json"
    report_path.write_text(json.dumps(report.to_dict(), indent=2))
    return InitOutcome(str(init_dir), str(report_path), method, report.seconds, report.checks)
