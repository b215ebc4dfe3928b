"""A config from its sources: `extends` bases (deep merge, paths read against the file that wrote them) and `--set`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cls_config, write_config

from adapterflow.errors import ConfigError
from adapterflow.tasks.config import flatten, load_config


def _write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_config_extends_a_base_in_another_folder_whose_paths_stay_its_own(tmp_path, tiny_bert, cls_data):
    base = write_config(tmp_path / "base.yaml", cls_config(tiny_bert, {k: Path(v.name) for k, v in cls_data.items()},
                                                             **{"adapter.init": {"method": "pissa", "niter": 2}}))
    (tmp_path / "team" / "extra.csv").parent.mkdir()
    (tmp_path / "team" / "extra.csv").write_bytes(cls_data["train"].read_bytes())
    child = _write(tmp_path / "team" / "child.yaml", {
        "extends": "../base.yaml", "name": "child", "data": {"train": "extra.csv"},
        "adapter": {"target_modules": ["query"], "init": {"method": "eva", "rho": 2.0}}, "train": {"max_steps": 7},
    })
    config, parent = load_config(child), load_config(base)
    assert config.name == "child" and config.train.max_steps == 7
    assert config.data.train == str(tmp_path / "team" / "extra.csv")  # the child's path, from the child's folder
    assert config.data.test == str(cls_data["test"]) == parent.data.test  # the base's, from the base's folder
    assert config.adapter.target_modules == ["query"]  # a list is replaced, not appended to
    assert config.adapter.init.method == "eva" and config.adapter.init.rho == 2.0  # another method: no pissa keys left
    assert config.train.batch_size == parent.train.batch_size and config.data.labels == parent.data.labels  # merged, key by key


def test_every_shipped_demo_variant_is_the_demo_with_only_the_keys_it_writes(tmp_path):
    demo = flatten(load_config(ROOT / "configs" / "demo.yaml"))
    for path in sorted((ROOT / "configs").glob("demo_*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert raw.pop("extends") in ("demo.yaml", "demo_pissa.yaml"), path.name
        variant = flatten(load_config(path))
        written = set(flatten_raw(raw)) | (set(flatten_raw(yaml.safe_load((ROOT / "configs" / "demo_pissa.yaml").read_text())))
                                           if "qpissa" in path.name else set())
        changed = {key for key in demo.keys() | variant.keys() if demo.get(key) != variant.get(key)}
        assert changed <= written | {k for k in changed if k.startswith("adapter.init.")}, (path.name, changed - written)
        assert len(path.read_text().splitlines()) <= 15, path.name  # a few lines on top of the demo, not a copy


def flatten_raw(raw: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else key
        out.update(flatten_raw(value, dotted) if isinstance(value, dict) else {dotted: value})
    return out


@pytest.mark.parametrize(("extends", "problem"), [
    ("missing.yaml", "not a file"), (["a.yaml"], "must be the path of one YAML file"), ("self.yaml", "makes a loop"),
])
def test_a_bad_extends_is_one_clear_error(tmp_path, extends, problem):
    path = _write(tmp_path / "self.yaml", {"extends": extends, "name": "x"})
    with pytest.raises(ConfigError, match=problem):
        load_config(path)


def test_a_loop_through_two_files_names_the_chain(tmp_path):
    _write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match=r"a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")


def test_overrides_are_read_as_yaml_typed_by_the_schema_and_hashed(tmp_path, tiny_bert, cls_data, monkeypatch):
    path = write_config(tmp_path / "c.yaml", cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "pissa", "niter": 2}}))
    monkeypatch.chdir(tmp_path)
    overrides = ["train.learning_rate=1e-3", "adapter.target_modules=[query, key]", "evaluate.intruders=null",
                 "adapter.init.method=eva", "adapter.init.rho=3", "data.test=validation.csv"]
    config = load_config(path, overrides)
    assert config.train.learning_rate == 0.001 and config.adapter.target_modules == ["query", "key"]
    assert config.evaluate.intruders is None and config.adapter.init.method == "eva" and config.adapter.init.rho == 3.0
    assert config.data.test == str(tmp_path / "validation.csv")  # an override's path: from the current folder
    assert config.digest() != load_config(path).digest()
    assert config.digest() == load_config(write_config(tmp_path / "same.yaml", yaml.safe_load(yaml.safe_dump(
        {**cls_config(tiny_bert, cls_data), "train": {**cls_config(tiny_bert, cls_data)["train"], "learning_rate": 0.001},
         "adapter": {**cls_config(tiny_bert, cls_data)["adapter"], "target_modules": ["query", "key"],
                     "init": {"method": "eva", "rho": 3}},
         "evaluate": {**cls_config(tiny_bert, cls_data)["evaluate"], "intruders": None},
         "data": {**cls_config(tiny_bert, cls_data)["data"], "test": str(tmp_path / "validation.csv")}})))).digest()


@pytest.mark.parametrize(("override", "problem"), [
    ("train.learning_rate", "write key.path=value"),
    ("train.learning_rat=1e-3", "train.learning_rat: unknown key"),
    ("train.max_steps.x=3", "train.max_steps is a value"),
    ("train.learning_rate=[1", "is not valid YAML"),
    ("name=!!timestamp x", "is not valid YAML .the value does not fit its explicit tag"),  # PyYAML's AttributeError
    ("name=!!bool x", "is not valid YAML .the value does not fit its explicit tag"),  # and its KeyError
    ("train.learning_rate=fast", "train.learning_rate"),
])
def test_a_bad_override_is_one_clear_error(tmp_path, tiny_bert, cls_data, override, problem):
    path = write_config(tmp_path / "c.yaml", cls_config(tiny_bert, cls_data))
    with pytest.raises(ConfigError, match=problem):
        load_config(path, [override])


def test_check_prints_the_resolved_config_with_credentials_masked(tmp_path, tiny_bert, cls_data, capsys):
    from adapterflow.flows.cli import main

    path = write_config(tmp_path / "c.yaml", cls_config(tiny_bert, cls_data))
    code = main(["check", str(path), "--print", "--set", "tracking.mlflow_uri=postgresql://alice:hunter2@db/mlflow",
                 "--set", "train.max_steps=9"])
    out = capsys.readouterr().out
    assert code == 0 and "hunter2" not in out
    printed = yaml.safe_load(out.rsplit("\nok: ", 1)[0])
    assert printed["train"]["max_steps"] == 9 and printed["tracking"]["mlflow_uri"] == "postgresql://alice:***@db/mlflow"
    assert printed["data"]["train"] == str(cls_data["train"])


@pytest.mark.slow
def test_a_run_with_overrides_records_the_resolved_config(tmp_path, tiny_bert, cls_data):
    from conftest import run_cli
    from mlflow.tracking import MlflowClient

    path = write_config(tmp_path / "c.yaml", cls_config(tiny_bert, cls_data, **{"evaluate.intruders": None}))
    overrides = ["train.max_steps=3", "train.learning_rate=2e-3"]
    result = run_cli("run", str(path), *[arg for o in overrides for arg in ("--set", o)], home=tmp_path / "home")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--set train.max_steps=3 --set train.learning_rate=2e-3" in result.stderr + result.stdout
    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}"
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("tiny-cls-adapter", "1")
    run = MlflowClient(tracking_uri=uri).get_run(version.run_id)
    assert run.data.params["train.max_steps"] == "3" and run.data.params["train.learning_rate"] == "0.002"
    assert version.tags["config_hash"] == load_config(path, overrides).digest() != load_config(path).digest()
    assert version.tags["train_steps"] == "3"


@pytest.mark.parametrize("command", ["run", "serve", "sweep"])
def test_an_override_holding_a_credential_is_refused_before_prefect_stores_it(tmp_path, tiny_bert, cls_data, capsys, command,
                                                                               monkeypatch):
    """A flow run's parameters live in Prefect's database and UI: a password given with --set would land there."""
    from adapterflow.flows.cli import main

    monkeypatch.setenv("ADAPTERFLOW_HOME", str(tmp_path / "state"))
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data))
    secret = "--set=tracking.mlflow_uri=http://alice:hunter2-secret@127.0.0.1:5000"
    extra = ["--grid", "adapter.r=2,4"] if command == "sweep" else []
    assert main([command, str(config), secret, *extra]) == 2
    err = capsys.readouterr().err
    assert "--set tracking.mlflow_uri: the value holds a credential" in err and "hunter2" not in err
    assert not (tmp_path / "state").exists()
