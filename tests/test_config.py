"""Config loading: every shipped config loads; every kind of mistake gets one clear message and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, cls_config, write_config

from adapterflow.errors import ConfigError
from adapterflow.flows.cli import main
from adapterflow.tasks.config import load_config


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    config = load_config(path)
    assert config.name and config.registry.model_name
    assert Path(config.data.train).is_absolute()


def test_demo_config_passes_check(capsys):
    assert main(["check", str(ROOT / "configs" / "demo.yaml")]) == 0
    assert "ok:" in capsys.readouterr().out


def test_relative_paths_resolve_against_the_config_folder(tmp_path, tiny_bert, cls_data):
    config = cls_config(tiny_bert, cls_data)
    config["data"]["train"] = "train.csv"
    loaded = load_config(write_config(tmp_path / "c.yaml", config))
    assert loaded.data.train == str((tmp_path / "train.csv").resolve())


def test_equal_configs_have_equal_digests(tmp_path, tiny_bert, cls_data):
    a = load_config(write_config(tmp_path / "a.yaml", cls_config(tiny_bert, cls_data)))
    b = load_config(write_config(tmp_path / "b.yaml", cls_config(tiny_bert, cls_data)))
    c = load_config(write_config(tmp_path / "c.yaml", cls_config(tiny_bert, cls_data, **{"adapter.r": 8})))
    assert a.digest() == b.digest() != c.digest()


def _check(tmp_path, capsys, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    err = _check(tmp_path, capsys, "name: x\ntask: [unclosed\n")
    assert "invalid YAML" in err and "line" in err


def _bad(tmp_path, tiny_bert, cls_data, mutate) -> str:
    config = cls_config(tiny_bert, cls_data)
    mutate(config)
    import yaml

    return yaml.safe_dump(config)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["train"].update(lerning_rate=0.1), "train.lerning_rate: unknown key"),
        (lambda c: c["adapter"].update(r="eight"), "adapter.r"),
        (lambda c: c["adapter"].update(r=0), "adapter.r: Input should be greater than or equal to 1"),
        (lambda c: c["adapter"].update(dropout=1.5), "adapter.dropout"),
        (lambda c: c["adapter"].update(r=3, init={"method": "orthogonal"}), "use an even adapter.r, not 3"),
        (lambda c: c["adapter"].update(r=3, init={"method": "auto", "candidates": ["lora", "orthogonal"]}), "use an even adapter.r, not 3"),
        (lambda c: c["adapter"]["init"].update(method="fancy"), "unknown init method 'fancy'"),
        (lambda c: c["adapter"]["init"].update(method="pissa", niter=-1), "adapter.init.pissa.niter"),
        (lambda c: c["train"].update(epochs=1), "exactly one of train.max_steps or train.epochs"),
        (lambda c: c["model"].update(hub_id="org/name"), "exactly one of model.bundled"),
        (lambda c: c["data"].update(labels=None), "needs data.labels"),
        (lambda c: c["data"].update(train="train.txt"), "data files must end in one of"),
        (lambda c: c.pop("registry"), "registry: required key is missing"),
        (lambda c: c["adapter"].update(init={"method": "corda", "mode": "kpm"}), "corda mode kpm needs adapter.init.knowledge"),
        (lambda c: c["adapter"].update(init={"method": "eva", "rho": 0.5}), "adapter.init.eva.rho"),
        (lambda c: c["adapter"].update(init={"method": "eva", "tau": 0}), "adapter.init.eva.tau"),
        (lambda c: c["adapter"].update(init={"method": "eva", "tau": 1.5}), "adapter.init.eva.tau"),
        (lambda c: c["adapter"].update(init={"method": "lora_ga", "direction": "BA"}), "adapter.init.lora_ga.direction"),
        (lambda c: c["adapter"].update(init={"method": "lora_ga", "batches": 0}), "adapter.init.lora_ga.batches"),
        (lambda c: c["adapter"].update(init={"method": "lora_sb", "update_lr": -1}), "adapter.init.lora_sb.update_lr"),
        (lambda c: c["train"].update(checkpoint_merge={"checkpoints": 3}),
         "with checkpoint_every 2 save only 2; lower train.checkpoint_every to at most 1"),
        (lambda c: c["train"].update(checkpoint_merge={"checkpoints": 2}, log_every=3),
         "some checkpoints have no loss; lower train.log_every"),
        (lambda c: c["train"].update(checkpoint_merge={"checkpoints": 1}), "train.checkpoint_merge.checkpoints"),
    ],
    ids=["unknown-key", "wrong-type", "rank-zero", "dropout-range", "odd-rank-orthogonal", "odd-rank-race-candidate",
         "unknown-method", "negative-niter",
         "steps-and-epochs", "two-model-sources", "labels-missing", "data-format", "missing-section",
         "kpm-without-knowledge", "rho-below-1", "tau-zero", "tau-above-1", "ga-direction", "ga-no-batches", "sb-negative-lr",
         "merge-too-few-checkpoints", "merge-unlogged-loss", "merge-one-checkpoint"],
)
def test_bad_config_gets_one_clear_error(tmp_path, capsys, tiny_bert, cls_data, mutate, expected):
    err = _check(tmp_path, capsys, _bad(tmp_path, tiny_bert, cls_data, mutate))
    assert expected in err


def test_missing_model_path_is_refused(tmp_path, capsys, cls_data):
    err = _check(tmp_path, capsys, _bad(tmp_path, tmp_path / "no-such-model", cls_data, lambda c: None))
    assert "model.path does not exist" in err


def test_missing_data_file_is_refused(tmp_path, capsys, tiny_bert, cls_data):
    cls_data["validation"].unlink()
    path = write_config(tmp_path / "c.yaml", cls_config(tiny_bert, cls_data))
    assert main(["check", str(path)]) == 3
    assert "data.validation: file not found" in capsys.readouterr().err


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_prefect_yaml_deployments_point_at_the_flow_and_valid_configs():
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["deployments"]
    for deployment in spec["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        # As a Prefect worker loads it: the file by path, from the project folder.
        assert load_flow_from_entrypoint(f"{ROOT / path}:{name}").name == "adapterflow-retrain"
        load_config(ROOT / deployment["parameters"]["config_path"])
        assert set(deployment["parameters"]) == {"config_path", "force"}


def _throwaway_method(**flags):
    """A registered method `throwaway` with one knob, in the schema for the `with` block only."""
    import contextlib
    from typing import Literal

    from pydantic import Field

    from adapterflow.adapters.registry import InitConfig, Initializer, registered
    from adapterflow.tasks.config import build_init_schema

    class ThrowawayInit(InitConfig):
        method: Literal["throwaway"]
        knob: int = Field(3, ge=1)

    defaults = dict(family="random", apply=lambda *a: None, mutates_base=False, needs_data=False, needs_grad=False,
                    supports_quantized=True, preserves_outputs=True)
    initializer = Initializer(name="throwaway", config=ThrowawayInit, **{**defaults, **flags})

    @contextlib.contextmanager
    def scope():
        try:
            with registered(initializer):
                build_init_schema()
                yield initializer
        finally:
            build_init_schema()

    return scope()


def test_a_registered_method_joins_the_schema_and_leaves_it_when_unregistered(tmp_path, capsys, tiny_bert, cls_data):
    from adapterflow.tasks.config import RunConfig

    throwaway = cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "throwaway", "knob": 5}})
    race = cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "auto", "candidates": ["lora", "throwaway"]}})
    with _throwaway_method():
        assert RunConfig.model_validate(throwaway).adapter.init.knob == 5
        assert [c.method for c in RunConfig.model_validate(race).adapter.init.candidates] == ["lora", "throwaway"]
        zero_knob = lambda c: c["adapter"].update(init={"method": "throwaway", "knob": 0})
        assert "adapter.init.throwaway.knob" in _check(tmp_path, capsys, _bad(tmp_path, tiny_bert, cls_data, zero_knob))
    err = _check(tmp_path, capsys, _bad(tmp_path, tiny_bert, cls_data, lambda c: c["adapter"].update(init={"method": "throwaway"})))
    assert "unknown init method 'throwaway'; choose one of: auto, corda" in err
    with pytest.raises(Exception, match="does not match any of the expected tags"):
        RunConfig.model_validate(race)


def test_a_method_that_needs_a_4bit_base_is_refused_on_another(tiny_bert, cls_data):
    from pydantic import ValidationError

    from adapterflow.tasks.config import RunConfig

    with _throwaway_method(needs_4bit_base="method lora for an unquantized base"):
        with pytest.raises(ValidationError, match="adapter.init.method throwaway initializes for a 4-bit base, but model.quantization "
                                                  "is 'int8'; set model.quantization: nf4, or use method lora for an unquantized base"):
            RunConfig.model_validate(cls_config(tiny_bert, cls_data,
                                                **{"adapter.init": {"method": "throwaway"}, "model.quantization": "int8"}))
        nf4 = RunConfig.model_validate(cls_config(tiny_bert, cls_data,
                                                  **{"adapter.init": {"method": "throwaway"}, "model.quantization": "nf4"}))
        assert nf4.model.quantization == "nf4"


def test_the_default_race_and_init_dump_as_before(tiny_bert, cls_data):
    """The config digest hashes this dump: registry-built defaults must dump exactly as the old literal ones."""
    from adapterflow.tasks.config import RunConfig

    config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "auto"}}))
    assert config.model_dump(mode="json")["adapter"]["init"] == {
        "method": "auto", "lr_multipliers": [0.5, 1.0, 2.0], "budget": 0.15, "candidates": [
            {"method": "lora"},
            {"method": "pissa", "niter": None, "oversampling": 24},
            {"method": "eva", "rho": 2.0, "tau": 0.99, "whiten": False},
            {"method": "lora_ga", "batches": 8, "direction": "ArB2r", "scale": "stable", "stable_gamma": 16.0, "convention": "reference"},
        ],
    }
    plain = cls_config(tiny_bert, cls_data)
    plain["adapter"].pop("init", None)
    assert RunConfig.model_validate(plain).adapter.init.model_dump() == {"method": "lora"}


def test_data_file_knobs_resolve_against_the_config_folder_and_need_a_data_suffix(tmp_path, capsys, tiny_bert, cls_data):
    config = cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "corda", "mode": "kpm", "knowledge": "facts.csv"}})
    loaded = load_config(write_config(tmp_path / "c.yaml", config))
    assert loaded.adapter.init.knowledge == str((tmp_path / "facts.csv").resolve())
    err = _check(tmp_path, capsys, _bad(tmp_path, tiny_bert, cls_data,
                                        lambda c: c["adapter"].update(init={"method": "corda", "knowledge": "facts.txt"})))
    assert "adapter.init.knowledge must end in one of .csv, .jsonl, .json, .parquet" in err


@pytest.mark.slow  # starts a fresh interpreter
def test_check_does_not_import_torch():
    import subprocess
    import sys

    code = (f"from adapterflow.tasks.config import load_config; load_config({str(ROOT / 'configs' / 'demo.yaml')!r}); "
            "import sys; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
