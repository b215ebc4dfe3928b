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


def _check(tmp_path, capsys, text: str | bytes) -> str:
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return _check_path(capsys, path)


def _check_path(capsys, path: Path) -> str:
    """`adapterflow check` refuses the config with exit 2 and one message: short, no traceback."""
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err) < 2_000, err[:3_000]
    return err


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    err = _check(tmp_path, capsys, "name: x\ntask: [unclosed\n")
    assert "invalid YAML" in err and "line" in err


def _bad(tmp_path, tiny_bert, cls_data, mutate) -> str:
    config = cls_config(tiny_bert, cls_data)
    mutate(config)
    import yaml

    return yaml.safe_dump(config)


def _tracking(**values):
    return lambda c: c.setdefault("tracking", {}).update(values)


def _registry(**values):
    return lambda c: c["registry"].update(values)


INF, NAN = float("inf"), float("nan")
# Every float knob a config sets: .inf and .nan are refused in each, by the schema (allow_inf_nan=False).
FLOAT_KNOBS = [
    ("adapter.alpha", lambda c, v: c["adapter"].update(alpha=v)),
    ("adapter.dropout", lambda c, v: c["adapter"].update(dropout=v)),
    ("train.epochs", lambda c, v: (c["train"].pop("max_steps"), c["train"].update(epochs=v))),
    ("train.learning_rate", lambda c, v: c["train"].update(learning_rate=v)),
    ("train.weight_decay", lambda c, v: c["train"].update(weight_decay=v)),
    ("train.warmup_ratio", lambda c, v: c["train"].update(warmup_ratio=v)),
    ("train.checkpoint_merge.penalty", lambda c, v: c["train"].update(checkpoint_merge={"checkpoints": 2, "penalty": v})),
    ("adapter.init.eva.rho", lambda c, v: c["adapter"].update(init={"method": "eva", "rho": v})),
    ("adapter.init.eva.tau", lambda c, v: c["adapter"].update(init={"method": "eva", "tau": v})),
    ("adapter.init.lora_ga.stable_gamma", lambda c, v: c["adapter"].update(init={"method": "lora_ga", "stable_gamma": v})),
    ("adapter.init.lora_sb.update_lr", lambda c, v: c["adapter"].update(init={"method": "lora_sb", "update_lr": v})),
    ("adapter.init.auto.budget", lambda c, v: c["adapter"].update(init={"method": "auto", "budget": v})),
    ("adapter.init.auto.lr_multipliers.1", lambda c, v: c["adapter"].update(init={"method": "auto", "lr_multipliers": [1.0, v]})),
    ("evaluate.intruders.threshold", lambda c, v: c["evaluate"].update(intruders={"threshold": v})),
    ("data.checks.max_duplicate_rate", lambda c, v: c["data"]["checks"].update(max_duplicate_rate=v)),
    ("promotion.min_improvement", lambda c, v: c.setdefault("promotion", {}).update(min_improvement=v)),
    ("promotion.tie_margin", lambda c, v: c.setdefault("promotion", {}).update(tie_margin=v)),
    ("promotion.forgetting.tolerance", lambda c, v: c.setdefault("promotion", {}).update(forgetting={"file": "f.csv", "tolerance": v})),
    ("tracking.system_metrics_seconds", lambda c, v: c.setdefault("tracking", {}).update(system_metrics_seconds=v)),
]
NOT_FINITE = [
    pytest.param((lambda c, set_=set_, v=v: set_(c, v)), f"{key}: must be a finite number, not {v}", id=f"{v}-{key}")
    for key, set_ in FLOAT_KNOBS for v in (INF, NAN)
]


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
        # Names that become paths: contained, or refused.
        (_tracking(experiment="../../x"), "tracking.experiment: becomes a folder and file name"),
        (_tracking(experiment="team/run"), "tracking.experiment: becomes a folder and file name"),
        (_tracking(experiment=".hidden"), "tracking.experiment: becomes a folder and file name"),
        (_tracking(experiment="a\0b"), "tracking.experiment: becomes a folder and file name"),
        (lambda c: c.update(name="../escape"), "name: becomes a folder and file name"),
        (lambda c: c.update(name="n" * 101), "name: is 101 characters long; it becomes part of folder and file names, so at most 100"),
        (_registry(model_name="m" * 101), "registry.model_name: is 101 characters long"),
        (_registry(model_name="team/model"), "registry.model_name: becomes a folder and file name"),
        (lambda c: c["data"].update(train="a\0b.csv"), "data.train: contains a NUL character"),
        (lambda c: c["data"].update(train="x" * 2000 + ".csv"), "data.train: String should have at most 1024 characters"),
        (lambda c: c["adapter"].update(init={"method": "corda", "mode": "kpm", "knowledge": "k" * 2000 + ".csv"}),
         "adapter.init.knowledge must be a path of at most 1024 characters"),
        (lambda c: c["data"].update(labels="games"), "data.labels: data.labels must be a list of the label values"),
        # Values MLflow, numpy, Prefect or DVC would refuse only after training.
        (_registry(staging_alias="live", production_alias="live"), "registry.staging_alias and registry.production_alias are both 'live'"),
        (_registry(staging_alias="latest"), "registry.staging_alias: 'latest' (in any case) is reserved by MLflow"),
        (_registry(production_alias="LATEST"), "registry.production_alias: 'latest' (in any case) is reserved by MLflow"),
        (_registry(production_alias="v3"), "registry.production_alias: v<number> is reserved by MLflow"),
        (_registry(staging_alias="my alias"), "registry.staging_alias: MLflow allows only letters, digits, '_' and '-'"),
        (_registry(staging_alias="a.b"), "registry.staging_alias: MLflow allows only letters, digits, '_' and '-'"),
        (_registry(staging_alias=""), "registry.staging_alias: MLflow allows only letters, digits, '_' and '-'"),
        (_registry(staging_alias="a" * 256), "registry.staging_alias: is 256 characters long; MLflow allows at most 255"),
        (lambda c: c["train"].update(seed=2**32), "train.seed: Input should be less than 4294967296"),
        (lambda c: c["train"].update(seed=-1), "train.seed: Input should be greater than or equal to 0"),
        (lambda c: c.update(schedule={"cron": "0 3 * * *", "timezone": "Mars/Olympus"}), "schedule.timezone: unknown time zone"),
        (lambda c: c.update(schedule={"interval_seconds": 60, "timezone": "../../etc/passwd"}), "schedule.timezone: unknown time zone"),
        (lambda c: c.update(schedule={"interval_seconds": 60, "timezone": "localtime"}), "schedule.timezone: unknown time zone"),
        (_tracking(dvc_remote="--help"), "tracking.dvc_remote: starts with '-', which the DVC command line would read as an option"),
        (_tracking(dvc_remote="-d"), "tracking.dvc_remote: starts with '-'"),
        (_tracking(dvc_remote=" "), "tracking.dvc_remote: is empty"),
        (_tracking(dvc_remote="s3://bucket/x\n[core]"), "tracking.dvc_remote: contains a control character"),
        (_tracking(dvc_remote="ssh://deploy:hunter2@host/dvc"), "tracking.dvc_remote: carries a credential"),
        # Labels: all strings or all integers.
        (lambda c: c["data"].update(labels=[0, "games", 2]), "data.labels must be all strings or all integers; got int, str"),
        (lambda c: c["data"].update(labels=[True, False]), "yes/no, true/false and on/off without quotes are YAML booleans: quote them"),
        (lambda c: c["data"].update(labels=[0.0, 1.0]), "data.labels must be all strings or all integers; got float"),
        (lambda c: c["data"].update(labels=[1, 1]), "data.labels must list at least two distinct label values"),
        (lambda c: c["data"].update(labels=[0, 2**64]), "integer data.labels must fit in 64 bits"),
        *NOT_FINITE,
    ],
    ids=["unknown-key", "wrong-type", "rank-zero", "dropout-range", "odd-rank-orthogonal", "odd-rank-race-candidate",
         "unknown-method", "negative-niter",
         "steps-and-epochs", "two-model-sources", "labels-missing", "data-format", "missing-section",
         "kpm-without-knowledge", "rho-below-1", "tau-zero", "tau-above-1", "ga-direction", "ga-no-batches", "sb-negative-lr",
         "merge-too-few-checkpoints", "merge-unlogged-loss", "merge-one-checkpoint",
         "experiment-traversal", "experiment-slash", "experiment-dot", "experiment-nul", "name-traversal", "name-too-long",
         "model-name-too-long", "model-name-slash", "data-path-nul", "data-path-too-long", "init-path-too-long", "labels-not-a-list",
         "aliases-equal", "alias-latest", "alias-latest-upper", "alias-version", "alias-space", "alias-dot", "alias-empty",
         "alias-too-long", "seed-2-32", "seed-negative", "timezone-unknown", "timezone-path", "timezone-localtime",
         "dvc-remote-option", "dvc-remote-short-option", "dvc-remote-blank", "dvc-remote-newline",
         "dvc-remote-credential",
         "labels-mixed", "labels-bool", "labels-float", "labels-int-duplicate", "labels-int-too-big",
         *(p.id for p in NOT_FINITE)],
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
    """The config digest hashes this dump: the defaults are pinned here, so a change to them is deliberate."""
    from adapterflow.tasks.config import RunConfig

    config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "auto"}}))
    assert config.model_dump(mode="json")["adapter"]["init"] == {
        "method": "auto", "lr_multipliers": [0.25, 0.5, 1.0, 2.0, 4.0], "budget": 0.1, "sigmas": 2.0, "candidates": [
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


# --- YAML that would exhaust or mislead the loader: each refused with one short message, fast ---------------------------


def _billion_laughs(depth: int = 9, width: int = 9) -> str:
    """About 1 KB of nested anchors; expanded, width**depth strings (387 million at 9 x 9)."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["top-level", "in-a-field"])
def test_nested_anchors_are_refused_unexpanded(tmp_path, capsys, tiny_bert, cls_data, where):
    import time
    import tracemalloc

    import yaml

    config = yaml.safe_dump(cls_config(tiny_bert, cls_data))
    bomb = _billion_laughs()
    if where == "in-a-field":  # the expansion lands where validation would report it, in data.labels
        bomb = bomb.replace("a8:", "bomb:") + config.replace("  labels:\n  - games\n  - science\n  - sound\n", "  labels: *a7\n")
        assert "labels: *a7" in bomb
    else:
        bomb += config
    assert len(_billion_laughs()) < 1_100
    tracemalloc.start()
    start = time.perf_counter()
    err = _check(tmp_path, capsys, bomb)
    elapsed, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "more than 10,000 values by line" in err and "counting each alias (*name) as the values it repeats" in err
    assert "lol" not in err
    assert elapsed < 1.0 and peak < 20_000_000, (elapsed, peak)


def test_a_few_aliases_still_load(tmp_path, tiny_bert, cls_data):
    import yaml

    text = yaml.safe_dump(cls_config(tiny_bert, cls_data))
    text = "modules: &modules [query, value]\n" + text.replace("  target_modules:\n  - query\n  - value\n", "  target_modules: *modules\n")
    config = yaml.safe_load(text)
    config.pop("modules")
    loaded = load_config(write_config(tmp_path / "c.yaml", config))
    assert loaded.adapter.target_modules == ["query", "value"]
    (tmp_path / "anchored.yaml").write_text(text.replace("modules: &modules", "adapter_defaults: &modules"))
    err = pytest.raises(ConfigError, load_config, tmp_path / "anchored.yaml").value
    assert "adapter_defaults: unknown key" in str(err)  # anchors load; the schema still judges the keys


def test_recursive_alias_is_refused(tmp_path, capsys):
    err = _check(tmp_path, capsys, "name: x\nloop: &loop [1, *loop]\n")
    assert "alias *'loop' at line 2 refers to a node that contains it (a recursive alias)" in err


def test_deep_nesting_is_refused(tmp_path, capsys):
    assert "nested more than 32 levels deep at line 2" in _check(tmp_path, capsys, "name: x\nx: " + "[" * 40 + "]" * 40 + "\n")
    assert "invalid YAML" in _check(tmp_path, capsys, "name: x\nx: " + "[" * 100_000 + "]" * 100_000 + "\n")


@pytest.mark.parametrize("section", ["train", "data.labels-twice", "flow-mapping"])
def test_duplicate_keys_are_refused_with_their_lines(tmp_path, capsys, tiny_bert, cls_data, section):
    import yaml

    text = yaml.safe_dump(cls_config(tiny_bert, cls_data), sort_keys=False)
    if section == "train":  # today's silent bug: the second train: replaced the first
        text += "train:\n  max_steps: 1000\n"
        key, prefix = "'train'", "train:"
    elif section == "data.labels-twice":
        text = text.replace("  max_length: 24\n", "  max_length: 24\n  labels: [a, b]\n")
        key, prefix = "'labels'", "  labels:"
    else:
        text = text.replace("model:\n  path:", "model: {bundled: minilm, bundled: minilm}\nmodel_:\n  path:")
        key, prefix = "'bundled'", "model: {"
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if line.startswith(prefix)] * (2 if section == "flow-mapping" else 1)
    err = _check(tmp_path, capsys, text)
    assert f"key {key} appears twice in one mapping, at line {lines[0]} and line {lines[1]}" in err and "Merge the two into one" in err


def test_a_merge_key_may_be_overridden(tmp_path, tiny_bert, cls_data):
    import yaml

    text = yaml.safe_dump(cls_config(tiny_bert, cls_data), sort_keys=False)
    text = text.replace("adapter:\n  r: 4\n", "adapter:\n  <<: {r: 2, alpha: 4.0}\n  r: 4\n")
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    assert load_config(path).adapter.r == 4  # an explicit key over a merged one is YAML's override, not a duplicate
    from adapterflow.tasks.config import _read_yaml

    path.write_text("a:\n  <<: &x {<<: {k: 1}, k: 2}\nb: *x\nc: {<<: [*x, {j: 3}], j: 4}\n")  # merging rewrites x's node
    assert _read_yaml(path)["c"]["j"] == 4


def test_non_utf8_config_is_refused(tmp_path, capsys, tiny_bert, cls_data):
    import yaml

    text = yaml.safe_dump(cls_config(tiny_bert, cls_data), sort_keys=False).replace("name: tiny-cls", "name: tiny-cls  # café")
    err = _check(tmp_path, capsys, text.encode("latin-1"))
    assert "is not UTF-8 text: byte 0xe9 at line 1 is not valid UTF-8. Save the file as UTF-8" in err


def test_a_utf8_bom_is_fine(tmp_path, tiny_bert, cls_data):
    import yaml

    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(cls_config(tiny_bert, cls_data)).encode())
    assert load_config(path).name == "tiny-cls"


def test_unreadable_config_is_refused(tmp_path, capsys, monkeypatch, tiny_bert, cls_data):
    import os

    import adapterflow.tasks.config as config_module

    path = write_config(tmp_path / "secret.yaml", cls_config(tiny_bert, cls_data))
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads any file: make open() answer as it does for anyone else
        def denied(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))

        monkeypatch.setattr(config_module, "open", denied, raising=False)
    err = _check_path(capsys, path)
    assert f"cannot read {path}: permission denied. Make it readable for this user (chmod u+r {path})" in err


def test_a_folder_or_a_device_is_not_a_config(tmp_path, capsys):
    assert f"{tmp_path} is a folder, not a config file" in _check_path(capsys, tmp_path)
    assert "/dev/null is not a regular file" in _check_path(capsys, Path("/dev/null"))


def test_oversized_config_is_refused_without_reading_it_all(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    with open(path, "w") as handle:
        handle.write("name: x\nnotes: ")
        handle.write("y" * 50_000_000)
    err = _check_path(capsys, path)
    assert "is larger than 1 MB; a run config is a few KB" in err


@pytest.mark.parametrize("text, expected", [
    ("", "is empty. Start from configs/demo.yaml"),
    ("- a\n- b\n", "expected a mapping of sections"),
    ("name: x\nwhen: 2024-13-45\n", "a value cannot be read as YAML: month must be in 1..12"),
    ("name: x\nr: !!int abc\n", "a value cannot be read as YAML: invalid literal for int()"),
    ("name: !!timestamp x\n", "a value tagged explicitly (e.g. !!timestamp) cannot be read as that type"),  # found by the fuzzer
    ("name: !!bool x\n", "a value tagged explicitly (e.g. !!timestamp) cannot be read as that type"),
    ("name: x\nr: " + "9" * 5000 + "\n", "a value cannot be read as YAML: Exceeds the limit (4300 digits)"),
    ("name: x\nr: !!python/object:os.system x\n", "could not determine a constructor"),
    ("name: x\nr: \x07\n", "invalid YAML at line 2: control characters are not allowed"),
    ("name: a\n---\nname: b\n", "invalid YAML at line 2, column 1: but found another document"),
    ("name: x\n\x1b[2Jy: 1\n", "invalid YAML"),
    ("".join(f"k{i}: {i}\n" for i in range(20_000)), "more than 10,000 values by line 5000"),
], ids=["empty", "a-list", "bad-date", "bad-int-tag", "bad-timestamp-tag", "bad-bool-tag", "huge-int", "python-tag",
        "control-character", "two-documents", "terminal-escape", "too-many-values"])
def test_yaml_that_cannot_be_a_config(tmp_path, capsys, text, expected):
    assert expected in _check(tmp_path, capsys, text)


def test_many_problems_make_one_bounded_message(tmp_path, capsys, tiny_bert, cls_data):
    def mutate(c):
        c["adapter"]["target_modules"] = [[i] for i in range(3000)]
        c["name"] = "x" * 4000
        c["bogus\x1b[2J"] = 1

    err = _check(tmp_path, capsys, _bad(tmp_path, tiny_bert, cls_data, mutate))
    assert "3002 problem(s)" in err and "and 2994 more; fix these first" in err and "\x1b" not in err


# --- values that are accepted, and where they end up ----------------------------------------------------------------------


def test_integer_labels_are_accepted(tmp_path, tiny_bert, cls_data):
    loaded = load_config(write_config(tmp_path / "c.yaml", cls_config(tiny_bert, cls_data, **{"data.labels": [0, 1, 2]})))
    assert loaded.data.labels == [0, 1, 2] and all(type(label) is int for label in loaded.data.labels)
    strings = load_config(write_config(tmp_path / "s.yaml", cls_config(tiny_bert, cls_data, **{"data.labels": ["0", "1", "2"]})))
    assert strings.data.labels == ["0", "1", "2"] and strings.digest() != loaded.digest()


def test_dvc_remote_folders_resolve_against_the_config_folder_and_urls_stay(tmp_path, tiny_bert, cls_data):
    def remote(value):
        config = cls_config(tiny_bert, cls_data, **{"tracking.dvc_remote": value})
        return load_config(write_config(tmp_path / "c.yaml", config)).tracking.dvc_remote

    assert remote("remote") == str((tmp_path / "remote").resolve())
    assert remote("../shared/remote") == str((tmp_path.parent / "shared" / "remote").resolve())
    assert remote("./-odd") == str((tmp_path / "-odd").resolve())
    assert remote("/srv/dvc") == "/srv/dvc"
    for url in ("s3://bucket/data", "gs://bucket/data", "ssh://host/srv/dvc", "https://dvc.example/store", "azure://c/p"):
        assert remote(url) == url


def test_good_names_aliases_seeds_and_timezones_load(tmp_path, tiny_bert, cls_data):
    config = cls_config(tiny_bert, cls_data, **{
        "name": "n" * 100, "registry.model_name": "My_model.v2-x", "registry.staging_alias": "candidate-1",
        "registry.production_alias": "Live_2", "train.seed": 2**32 - 1, "tracking.experiment": "team.exp-1",
        "schedule": {"cron": "0 3 * * *", "timezone": "Europe/Berlin"},
    })
    loaded = load_config(write_config(tmp_path / "c.yaml", config))
    assert loaded.train.seed == 2**32 - 1 and loaded.schedule.timezone == "Europe/Berlin"
    assert loaded.experiment_name() == "team.exp-1"


@pytest.mark.parametrize("alias", ["staging", "prod-1", "a_b", "V", "v", "va1", "v1a", "1", "latest2", "x" * 255,
                                   "latest", "LaTeSt", "v1", "V42", "a b", "a.b", "a/b", "", "x" * 256])
def test_alias_rules_match_mlflow(alias):
    """The schema refuses exactly the (ASCII) aliases MLflow's own validation refuses."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved
    from pydantic import ValidationError

    from adapterflow.tasks.config import RegistrySpec

    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
        mlflow_accepts = True
    except MlflowException:
        mlflow_accepts = False
    try:
        RegistrySpec(model_name="m", staging_alias=alias, production_alias="other")
        we_accept = True
    except ValidationError:
        we_accept = False
    assert we_accept == mlflow_accepts


def test_timezones_are_the_ones_prefect_accepts():
    from prefect.client.schemas.schedules import CronSchedule

    from adapterflow.tasks.config import ScheduleSpec

    for zone in ("UTC", "America/New_York", "Asia/Kolkata", "Etc/GMT+5"):
        assert ScheduleSpec(cron="0 3 * * *", timezone=zone).timezone == CronSchedule(cron="0 3 * * *", timezone=zone).timezone


# --- model.trust_remote_code reaches every from_pretrained ------------------------------------------------------------------


def test_trust_remote_code_reaches_from_pretrained(tmp_path, tiny_bert, cls_data):
    from adapterflow.tasks import model_io

    for trust in (False, True):
        config = load_config(write_config(tmp_path / "c.yaml", cls_config(tiny_bert, cls_data, **{"model.trust_remote_code": trust})))
        ref = model_io.resolve_base(config.model)
        assert ref.trust_remote_code is trust
        assert model_io._load(lambda name, **kwargs: kwargs, ref, dtype="float32") == {"trust_remote_code": trust, "dtype": "float32"}


def _custom_code_model(tiny_bert: Path, folder: Path) -> Path:
    """tiny-bert as a model type transformers does not know, its classes in the folder: loading it runs that code."""
    import json
    import shutil

    shutil.copytree(tiny_bert, folder)
    (folder / "configuration_marked.py").write_text(
        "import pathlib\n\nfrom transformers import BertConfig\n\n"
        f"pathlib.Path({str(folder / 'code-ran')!r}).touch()\n\n\n"
        "class MarkedConfig(BertConfig):\n    model_type = 'marked-bert'\n"
    )
    (folder / "modeling_marked.py").write_text(
        "from transformers import BertForSequenceClassification\n\nfrom .configuration_marked import MarkedConfig\n\n\n"
        "class MarkedForSequenceClassification(BertForSequenceClassification):\n    config_class = MarkedConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="marked-bert", auto_map={
        "AutoConfig": "configuration_marked.MarkedConfig",
        "AutoModelForSequenceClassification": "modeling_marked.MarkedForSequenceClassification",
    })
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_model_that_needs_its_own_code_is_refused_unless_trusted(tmp_path, tiny_bert, cls_data):
    from adapterflow.errors import ModelError
    from adapterflow.tasks.model_io import load_model, load_tokenizer, resolve_base

    folder = _custom_code_model(tiny_bert, tmp_path / "custom")
    untrusted = load_config(write_config(tmp_path / "u.yaml", cls_config(folder, cls_data)))
    with pytest.raises(ModelError, match="needs its own Python code to load, and model.trust_remote_code is false"):
        load_model(resolve_base(untrusted.model), "sequence_classification", untrusted.data.labels)
    assert not (folder / "code-ran").exists()
    trusted = load_config(write_config(tmp_path / "t.yaml", cls_config(folder, cls_data, **{"model.trust_remote_code": True})))
    ref = resolve_base(trusted.model)
    model = load_model(ref, "sequence_classification", [0, 1, 2])
    assert load_tokenizer(ref)("a test").input_ids
    assert (folder / "code-ran").exists() and model.config.id2label == {0: "0", 1: "1", 2: "2"}
    assert ref.identity != resolve_base(untrusted.model).identity  # the code it runs is part of its identity


def test_the_config_hash_ignores_credentials(tmp_path, tiny_bert, cls_data):
    def digest(uri):
        return load_config(write_config(tmp_path / "c.yaml", cls_config(tiny_bert, cls_data, **{"tracking.mlflow_uri": uri}))).digest()

    assert digest("http://alice:old-pw@mlflow:5000") == digest("http://alice:new-pw@mlflow:5000")
    assert digest("http://alice:pw@mlflow:5000") != digest("http://alice:pw@other:5000")
