"""adapter.variant (DoRA, rsLoRA), LoRA+ and per-layer rank/alpha patterns: trained, saved, reloaded with plain peft."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import LABELS, cls_config, write_config

from adapterflow.errors import ConfigError, InitError
from adapterflow.tasks.config import RunConfig, load_config

PROBE = {"input_ids": torch.randint(5, 2000, (3, 12), generator=torch.Generator().manual_seed(0))}
QUERY_0 = "layer.0.attention.self.query"


def _config(tiny_bert, cls_data, **overrides) -> RunConfig:
    return RunConfig.model_validate(cls_config(tiny_bert, cls_data, **overrides))


def _base(config):
    from adapterflow.tasks.model_io import load_model, resolve_base

    return load_model(resolve_base(config.model), config.task, LABELS)


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**PROBE).logits


def _train(config, run_dir: Path):
    """Init and train in this process; returns the result and the trained model rebuilt from its last checkpoint."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from adapterflow.adapters import apply_init
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.model_io import resolve_base
    from adapterflow.tasks.train import train_adapter

    base_ref = resolve_base(config.model)
    outcome = initialize_adapter(config, base_ref, run_dir, None)
    result = train_adapter(config, base_ref, Path(outcome.init_dir), run_dir, quiet=True)
    trained = apply_init(_base(config), Path(outcome.init_dir))
    last = run_dir / "checkpoints" / f"checkpoint-{result.steps}" / "adapter_model.safetensors"
    set_peft_model_state_dict(trained, load_file(last))
    return result, trained


def _reloaded(config, adapter_dir: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(config), adapter_dir)


CASES = {
    # name: (adapter section, what adapter_config.json must say)
    "dora": ({"variant": "dora"}, {"use_dora": True, "use_rslora": False}),
    "dora_eva": ({"variant": "dora", "init": {"method": "eva"}}, {"use_dora": True}),
    # PiSSA rewrites the base: the registered adapter is the rank-2r delta, so r doubles and rsLoRA's alpha grows by √2.
    "rslora_pissa": ({"variant": "rslora", "init": {"method": "pissa"}}, {"use_rslora": True, "r": 8, "lora_alpha": 8 * 2**0.5}),
    "patterns": ({"rank_pattern": {QUERY_0: 2}, "alpha_pattern": {"value": 3.0}},
                 {"rank_pattern": {QUERY_0: 2}, "alpha_pattern": {"value": 3.0}}),
    # The combination peft documents as breaking its own conversion of base-rewriting inits.
    "rslora_patterns_pissa": ({"variant": "rslora", "init": {"method": "pissa"}, "rank_pattern": {QUERY_0: 2},
                               "alpha_pattern": {"value": 3.0}},
                              {"use_rslora": True, "rank_pattern": {QUERY_0: 4}, "alpha_pattern": {"value": 3.0 * 2**0.5}}),
    "rslora_patterns_lora_ga": ({"variant": "rslora", "init": {"method": "lora_ga", "batches": 2}, "rank_pattern": {QUERY_0: 2},
                                 "alpha_pattern": {"value": 3.0}}, {"use_rslora": True, "r": 8, "rank_pattern": {QUERY_0: 4}}),
    "dora_orthogonal": ({"variant": "dora", "init": {"method": "orthogonal"}}, {"use_dora": True}),  # B ≠ 0 from the start
    "loraplus": ({"loraplus_lr_ratio": 16.0}, {"use_dora": False, "use_rslora": False}),
    "loraplus_8bit_dora": ({"loraplus_lr_ratio": 16.0, "variant": "dora"}, {"use_dora": True}),
}
OPTIMIZERS = {"loraplus_8bit_dora": "adamw_8bit"}  # bitsandbytes' 8-bit AdamW through the LoRA+ param groups


@pytest.mark.parametrize("case", CASES)
def test_a_variant_trains_and_its_saved_adapter_reloads_with_plain_peft(case, tiny_bert, cls_data, tmp_path):
    adapter, expected = CASES[case]
    overrides = {f"adapter.{key}": value for key, value in adapter.items()}
    config = _config(tiny_bert, cls_data, **overrides, **{"train.optimizer": OPTIMIZERS.get(case, "adamw_torch_fused")})
    result, trained = _train(config, tmp_path / "run")
    assert result.steps == 4 and math.isfinite(result.train_loss)
    saved = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
    for key, value in expected.items():  # approx: rsLoRA's converted alphas are multiples of √2
        assert saved[key] == (pytest.approx(value) if not isinstance(value, dict) else {k: pytest.approx(v) for k, v in value.items()})
    reloaded = _reloaded(config, result.adapter_dir)
    assert not torch.allclose(_outputs(trained), _outputs(_base(config)), atol=1e-4)  # training moved it
    assert torch.allclose(_outputs(reloaded), _outputs(trained), atol=1e-5)


def test_patterns_set_each_matching_layer_own_rank_and_scaling(tiny_bert, cls_data, tmp_path):
    from adapterflow.adapters.layers import lora_layers

    config = _config(tiny_bert, cls_data, **{"adapter.rank_pattern": {QUERY_0: 2}, "adapter.alpha_pattern": {"value": 3.0},
                                              "adapter.variant": "rslora"})
    result, _ = _train(config, tmp_path / "run")
    layers = {name.removeprefix("base_model.model."): module for name, module in lora_layers(_reloaded(config, result.adapter_dir))}
    query_0, query_1 = layers[f"bert.encoder.{QUERY_0}"], layers["bert.encoder.layer.1.attention.self.query"]
    value_1 = layers["bert.encoder.layer.1.attention.self.value"]
    assert (query_0.r["default"], query_1.r["default"], value_1.r["default"]) == (2, 4, 4)
    assert query_0.scaling["default"] == pytest.approx(8 / 2**0.5) and value_1.scaling["default"] == pytest.approx(3.0 / 2)


@pytest.mark.parametrize("optimizer, kind", [("adamw_torch_fused", "torch.AdamW"), ("adamw_torch", "torch.AdamW"),
                                             ("adamw_8bit", "bitsandbytes.AdamW")])
def test_loraplus_gives_b_ratio_times_the_learning_rate(optimizer, kind, tiny_bert, cls_data, tmp_path):
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.model_io import resolve_base
    from adapterflow.tasks.train import _build_trainer

    config = _config(tiny_bert, cls_data, **{"adapter.loraplus_lr_ratio": 16.0, "train.optimizer": optimizer,
                                              "train.weight_decay": 0.01})
    base_ref, run_dir = resolve_base(config.model), tmp_path / "run"
    outcome = initialize_adapter(config, base_ref, run_dir, None)
    trainer, _ = _build_trainer(config, base_ref, Path(outcome.init_dir), run_dir, [], quiet=True)
    optimizer_used = trainer.create_optimizer()  # what train() uses: the LoRA+ optimizer handed to the Trainer
    group_of = {id(p): group for group in optimizer_used.param_groups for p in group["params"]}
    names = {name: param for name, param in trainer.model.named_parameters() if param.requires_grad}
    lrs = {name: group_of[id(param)]["lr"] for name, param in names.items()}
    lr = config.train.learning_rate
    assert {lrs[n] for n in names if "lora_B" in n} == {16 * lr} and {lrs[n] for n in names if "lora_A" in n} == {lr}
    assert f"{type(optimizer_used).__module__.split('.')[0]}.{type(optimizer_used).__name__}" == kind
    assert {group_of[id(names[n])]["weight_decay"] for n in names if "lora_A" in n} == {0.01}
    if optimizer == "adamw_torch_fused":
        assert optimizer_used.defaults["fused"]
    if optimizer == "adamw_8bit":
        assert optimizer_used.args.optim_bits == 8


def test_the_intruder_report_reads_a_dora_layer_as_the_weight_it_computes(tiny_bert, cls_data):
    from peft import get_peft_model

    from adapterflow.adapters.layers import lora_layers
    from adapterflow.adapters.spectral import _base_weight, _delta
    from adapterflow.tasks.init_adapter import lora_settings

    config = _config(tiny_bert, cls_data, **{"adapter.variant": "dora"})
    model = get_peft_model(_base(config), lora_settings(config).lora_config(True))
    torch.manual_seed(0)
    for _, module in lora_layers(model):  # as after training: B moved, magnitudes no longer the base's norms
        torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
        module.lora_magnitude_vector["default"].weight.data.mul_(torch.rand_like(module.lora_magnitude_vector["default"].weight) + 0.5)
    for name, module in lora_layers(model):
        x = torch.randn(5, module.in_features)
        with torch.no_grad():
            expected = x @ (_base_weight(module) + _delta(module, name)).T + module.base_layer.bias
            assert not torch.allclose(expected, module.base_layer(x) + module.scaling["default"] * module.lora_B["default"](
                module.lora_A["default"](x)), atol=1e-3)  # not plain LoRA's W + s·BA
            assert torch.allclose(module.eval()(x), expected, atol=1e-5)


def test_without_loraplus_the_trainer_builds_its_own_optimizer(tiny_bert, cls_data):
    from adapterflow.tasks.train import loraplus_optimizer

    assert loraplus_optimizer(_config(tiny_bert, cls_data), model=None, args=None) is None


def test_a_pattern_that_matches_no_adapted_layer_is_refused(tiny_bert, cls_data, tmp_path):
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.model_io import resolve_base

    config = _config(tiny_bert, cls_data, **{"adapter.rank_pattern": {"layer.7.attention.self.query": 2}})
    with pytest.raises(InitError, match=r"keys \['layer.7.attention.self.query'\] match none of the adapted layers"):
        initialize_adapter(config, resolve_base(config.model), tmp_path / "run", None)


REFUSED = {
    "rank_pattern_eva": ({"rank_pattern": {"query": 2}, "init": {"method": "eva"}}, "method eva, which sets every layer's rank itself"),
    "dora_pissa": ({"variant": "dora", "init": {"method": "pissa"}}, "init method pissa: it rewrites the base"),
    "dora_milora": ({"variant": "dora", "init": {"method": "milora"}}, "init method milora: it rewrites the base"),
    "dora_olora": ({"variant": "dora", "init": {"method": "olora"}}, "init method olora: it rewrites the base"),
    "dora_corda": ({"variant": "dora", "init": {"method": "corda"}}, "init method corda: it rewrites the base"),
    "dora_lora_ga": ({"variant": "dora", "init": {"method": "lora_ga"}}, "init method lora_ga: it rewrites the base"),
    "dora_loftq": ({"variant": "dora", "init": {"method": "loftq"}}, "init method loftq: it rewrites the base"),
    "dora_lora_sb": ({"variant": "dora", "init": {"method": "lora_sb"}}, "with init method lora_sb, which trains only an r×r matrix"),
    "loraplus_lora_sb": ({"loraplus_lr_ratio": 16, "init": {"method": "lora_sb"}}, "its A is frozen"),
    "dora_auto": ({"variant": "dora", "init": {"method": "auto"}}, "untouched base; remove pissa from adapter.init.candidates"),
    "odd_pattern_rank_orthogonal": ({"rank_pattern": {"query": 3}, "init": {"method": "orthogonal"}},
                                    "adapter.rank_pattern query: 3: init method orthogonal splits r rows"),
    "regex_key": ({"rank_pattern": {"query|value": 2}}, "pattern keys are module names or their ends"),
    "ratio_below_one": ({"loraplus_lr_ratio": 0.5}, "loraplus_lr_ratio: Input should be greater than or equal to 1"),
    "unknown_variant": ({"variant": "vera"}, "variant: Input should be 'lora', 'dora' or 'rslora'"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_combination_the_run_cannot_honour_is_one_config_error(case, tiny_bert, cls_data, tmp_path):
    adapter, message = REFUSED[case]
    path = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **{f"adapter.{k}": v for k, v in adapter.items()}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "1 problem(s)" in str(err.value) and message in str(err.value)


def test_a_method_that_assigns_ranks_refuses_a_rank_pattern_and_takes_an_alpha_pattern():
    from dataclasses import replace

    from adapterflow.adapters.registry import get_initializer
    from adapterflow.adapters.settings import variant_problem

    ranking = replace(get_initializer("lora"), name="ranking", assigns_ranks=True)
    refusal = variant_problem(ranking, "lora", loraplus=False, rank_pattern=True)
    assert "init method ranking, which sets every layer's rank itself" in refusal.reason
    assert "remove adapter.rank_pattern" in refusal.instead
    assert variant_problem(ranking, "dora", loraplus=True, rank_pattern=False) is None


def test_loraplus_under_fsdp_is_refused(tiny_bert, cls_data, tmp_path):
    launch = {"mode": "accelerate", "processes": 2, "strategy": "fsdp"}
    config = cls_config(tiny_bert, cls_data, **{"adapter.loraplus_lr_ratio": 16, "train.launch": launch})
    with pytest.raises(ConfigError, match="set train.launch.strategy: ddp or remove adapter.loraplus_lr_ratio"):
        load_config(write_config(tmp_path / "run.yaml", config))


def test_races_and_base_rewriting_inits_take_the_variants_they_can_convert(tiny_bert, cls_data):
    allowed = [{"variant": "rslora", "init": {"method": "auto"}},
               {"variant": "dora", "init": {"method": "auto", "candidates": ["lora", "eva"]}},
               {"variant": "rslora", "rank_pattern": {"query": 2}, "init": {"method": "lora_ga"}},
               {"alpha_pattern": {"query": 2.0}, "init": {"method": "eva"}}, {"loraplus_lr_ratio": 4, "init": {"method": "pissa"}}]
    for adapter in allowed:
        _config(tiny_bert, cls_data, **{f"adapter.{k}": v for k, v in adapter.items()})


def test_the_init_cache_key_ignores_loraplus_and_the_new_keys_at_their_defaults(tiny_bert, cls_data):
    from adapterflow.tasks.init_adapter import cache_key_parts
    from adapterflow.tasks.model_io import resolve_base

    plain = _config(tiny_bert, cls_data)
    ref = resolve_base(plain.model)
    key = cache_key_parts(plain, ref)["adapter"]
    new_keys = {"variant", "loraplus_lr_ratio", "rank_pattern", "alpha_pattern", "cache_init"}
    assert key == plain.adapter.model_dump(mode="json", exclude=new_keys)  # what entries stored before these keys hold
    assert cache_key_parts(_config(tiny_bert, cls_data, **{"adapter.loraplus_lr_ratio": 16}), ref)["adapter"] == key
    for changed in ({"adapter.variant": "dora"}, {"adapter.rank_pattern": {"query": 2}}, {"adapter.alpha_pattern": {"query": 2.0}}):
        assert cache_key_parts(_config(tiny_bert, cls_data, **changed), ref)["adapter"] != key


def test_configs_without_the_new_keys_keep_their_digest(tiny_bert, cls_data):
    plain = _config(tiny_bert, cls_data)
    explicit = _config(tiny_bert, cls_data, **{"adapter.variant": "lora", "adapter.rank_pattern": {}, "adapter.loraplus_lr_ratio": None})
    assert plain.digest() == explicit.digest() != _config(tiny_bert, cls_data, **{"adapter.variant": "dora"}).digest()


@pytest.mark.e2e
def test_a_dora_run_registers_an_adapter_plain_peft_loads_on_the_untouched_base(prefect_server, tmp_path, monkeypatch, tiny_bert,
                                                                                 cls_data, capsys):
    """The whole flow once, through registration: the version says dora and its adapter reproduces the trained model."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from adapterflow.adapters import apply_init
    from adapterflow.flows.cli import main

    state = tmp_path / "state"
    monkeypatch.setenv("ADAPTERFLOW_HOME", str(state))
    raw = cls_config(tiny_bert, cls_data, **{"adapter.variant": "dora", "tracking.system_metrics_seconds": 0})
    path = write_config(tmp_path / "run.yaml", raw)
    assert main(["check", str(path)]) == 0
    assert main(["run", str(path)]) == 0
    assert "registered       tiny-cls-adapter version 1" in capsys.readouterr().out
    uri = f"sqlite:///{state / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("tiny-cls-adapter", "staging")
    assert version.tags["variant"] == "dora" and client.get_run(version.run_id).data.params["adapter.variant"] == "dora"
    source = client.get_model_version_download_uri("tiny-cls-adapter", version.version)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "dl"), tracking_uri=uri))
    adapter = folder / "artifacts" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True

    config = load_config(path)
    run_dir = next((state / "runs").iterdir())
    trained = apply_init(_base(config), run_dir / "init")
    set_peft_model_state_dict(trained, load_file(run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))
    assert torch.allclose(_outputs(_reloaded(config, str(adapter))), _outputs(trained), atol=1e-5)
