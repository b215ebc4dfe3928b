"""The promotion gate's verdict, including the intruder-dimension tie-breaker, without a registry."""

from __future__ import annotations

import pytest
import torch
from conftest import cls_config

from adapterflow.tasks.config import RunConfig
from adapterflow.tasks.gate import _intruder_tie_break, _verdict


def _config(tiny_bert, cls_data, **promotion) -> RunConfig:
    return RunConfig.model_validate(cls_config(tiny_bert, cls_data, promotion={"metric": "accuracy", **promotion}))


def _adapter(tiny_bert, folder, scale: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * scale)
    model.save_pretrained(folder)
    return folder


def test_a_tie_goes_to_fewer_intruder_dimensions(tiny_bert, cls_data, tmp_path):
    from adapterflow.tasks.model_io import resolve_base

    config = _config(tiny_bert, cls_data, tie_breaker="intruder_dimensions", tie_margin=0.01)
    base_ref = resolve_base(config.model)
    gentle, violent = _adapter(tiny_bert, tmp_path / "gentle", 1e-3), _adapter(tiny_bert, tmp_path / "violent", 3.0)
    tie = _intruder_tie_break(config, base_ref, gentle, violent, improvement=-0.005)
    assert tie["candidate"] == 0 < tie["incumbent"]
    promoted, reason = _verdict(config, -0.005, 0.795, 0.8, "1", None, tie)
    assert promoted and "is a tie" in reason and "fewer, promoted" in reason
    reverse = _intruder_tie_break(config, base_ref, violent, gentle, improvement=0.005)
    promoted, reason = _verdict(config, 0.005, 0.805, 0.8, "1", None, reverse)
    assert not promoted and "not fewer, production stays" in reason
    assert _intruder_tie_break(config, base_ref, gentle, violent, improvement=0.02) is None  # outside the margin: no tie


def test_without_a_tie_breaker_the_metric_and_margins_decide(tiny_bert, cls_data):
    config = _config(tiny_bert, cls_data, min_improvement=0.01)
    assert _verdict(config, 0.02, 0.82, 0.80, "1", None, None)[0]
    promoted, reason = _verdict(config, 0.005, 0.805, 0.80, "1", None, None)
    assert not promoted and "less than promotion.min_improvement 0.01" in reason
    promoted, reason = _verdict(config, 0.0, 0.5, 0.5, None, None, None)
    assert not promoted and "does not beat the base model without adapter" in reason
    forgetting = {"drop": 0.2}
    config = _config(tiny_bert, cls_data, forgetting={"file": str(cls_data["test"]), "tolerance": 0.05})
    promoted, reason = _verdict(config, 0.1, 0.9, 0.8, "1", forgetting, None)
    assert not promoted and "drops by 0.2000" in reason


def test_the_tie_breaker_needs_the_intruder_report(tiny_bert, cls_data):
    with pytest.raises(ValueError, match="needs evaluate.intruders"):
        overrides = {"promotion": {"tie_breaker": "intruder_dimensions"}, "evaluate.intruders": None}
        RunConfig.model_validate(cls_config(tiny_bert, cls_data, **overrides))


def test_a_version_without_the_md5_of_its_evaluation_split_is_refused(tiny_bert, cls_data):
    from types import SimpleNamespace

    from adapterflow.errors import RegistryError
    from adapterflow.tasks.gate import _check_frozen_split

    config = _config(tiny_bert, cls_data)
    older = SimpleNamespace(version="4", tags={"data.train_md5": "0" * 32, "eval_split": "test"})  # no data.test_md5
    with pytest.raises(RegistryError) as info:
        _check_frozen_split(config, "tiny-cls-adapter", older)
    message = str(info.value)
    assert message.startswith("tiny-cls-adapter version 4 has no tag data.test_md5") and "nothing was promoted" in message
    assert "Retrain" in message and f"md5sum {cls_data['test']}" in message
