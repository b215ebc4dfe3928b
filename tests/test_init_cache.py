"""The init cache: a second run on the same key reuses the products; any change recomputes; corruption is loud."""

from __future__ import annotations

import pytest
from conftest import cls_config

from adapterflow.errors import InitError
from adapterflow.tasks.config import RunConfig
from adapterflow.tasks.init_adapter import initialize_adapter
from adapterflow.tasks.model_io import resolve_base


def _init(tiny_bert, cls_data, run_dir, cache, **overrides):
    config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "pissa"}, **overrides}))
    return initialize_adapter(config, resolve_base(config.model), run_dir, cache)


def _weights(outcome):
    from pathlib import Path

    return (Path(outcome.init_dir) / "adapter_model.safetensors").read_bytes()


def test_second_run_hits_and_gets_identical_products(tiny_bert, cls_data, tmp_path):
    first = _init(tiny_bert, cls_data, tmp_path / "run1", tmp_path / "cache")
    second = _init(tiny_bert, cls_data, tmp_path / "run2", tmp_path / "cache")
    assert (first.cache, second.cache) == ("miss", "hit")
    assert _weights(first) == _weights(second)
    assert second.checks == first.checks
    assert first.plot_path and second.plot_path.endswith("init_spectrum.png")


@pytest.mark.parametrize(
    "change", [{"adapter.r": 2}, {"adapter.init": {"method": "milora"}}, {"train.seed": 7}, {"adapter.target_modules": ["query"]}]
)
def test_a_changed_key_recomputes(tiny_bert, cls_data, tmp_path, change):
    _init(tiny_bert, cls_data, tmp_path / "run1", tmp_path / "cache")
    assert _init(tiny_bert, cls_data, tmp_path / "run2", tmp_path / "cache", **change).cache == "miss"


def test_cache_can_be_turned_off(tiny_bert, cls_data, tmp_path):
    _init(tiny_bert, cls_data, tmp_path / "run1", tmp_path / "cache")
    assert _init(tiny_bert, cls_data, tmp_path / "run2", tmp_path / "cache", **{"adapter.cache_init": False}).cache == "off"


def test_corrupt_entry_is_refused_with_the_fix(tiny_bert, cls_data, tmp_path):
    _init(tiny_bert, cls_data, tmp_path / "run1", tmp_path / "cache")
    entry = next(p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    weights = entry / "init" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    with pytest.raises(InitError, match=r"init cache entry .* is corrupt .* Delete it \(rm -r"):
        _init(tiny_bert, cls_data, tmp_path / "run2", tmp_path / "cache")


def test_half_written_entry_is_never_a_hit(tiny_bert, cls_data, tmp_path):
    _init(tiny_bert, cls_data, tmp_path / "run1", tmp_path / "cache")
    entry = next(p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    entry.rename(tmp_path / "cache" / f".tmp-{entry.name}-crashed")  # what a crash mid-write leaves
    assert _init(tiny_bert, cls_data, tmp_path / "run2", tmp_path / "cache").cache == "miss"


def test_data_driven_init_is_keyed_by_the_train_data(tiny_bert, cls_data, tmp_path):
    from conftest import classification_rows, write_csv

    eva = {"adapter.init": {"method": "eva"}}
    first = _init(tiny_bert, cls_data, tmp_path / "run1", tmp_path / "cache", **eva)
    assert first.checks["rank_budget"] == 4 * 4 and _init(tiny_bert, cls_data, tmp_path / "run2", tmp_path / "cache", **eva).cache == "hit"
    write_csv(cls_data["train"], classification_rows(48, 99))
    assert _init(tiny_bert, cls_data, tmp_path / "run3", tmp_path / "cache", **eva).cache == "miss"


def test_the_key_holds_data_file_digests_and_knobs_the_run_fills_in(tiny_bert, cls_data, tmp_path):
    from adapterflow.digests import file_md5
    from adapterflow.tasks.init_adapter import cache_key_parts, first_step_lr

    knowledge = tmp_path / "facts.csv"
    knowledge.write_text("text\nthe sky is blue\n")
    corda = RunConfig.model_validate(cls_config(tiny_bert, cls_data,
                                                **{"adapter.init": {"method": "corda", "mode": "kpm", "knowledge": str(knowledge)}}))
    ref = resolve_base(corda.model)
    assert cache_key_parts(corda, ref)["knowledge_md5"] == file_md5(knowledge)
    assert "knobs" not in cache_key_parts(corda, ref)  # no gradients: the adapter section already holds every knob
    sb = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "lora_sb"}, "train.warmup_ratio": 0.5}))
    assert cache_key_parts(sb, ref)["knobs"] == {"batches": 8, "update_lr": first_step_lr(sb)}
    assert first_step_lr(sb) == pytest.approx(0.01 / 2)  # lr / ceil(0.5 × 4 warmup steps)
