"""Property: whatever bytes a config file holds, `load_config` answers with a ConfigError or a config: never another
exception, never more than a second, never more than 100 MB, and never a message that prints the expanded input.

The inputs are mutations of configs/demo.yaml's text (deleted, duplicated and swapped lines, random bytes, deep
nesting, anchors and aliases, huge scalars, values of the wrong type, YAML tags) and of its parsed form, plus random
text. On CI the examples are derandomized, so a failure there is reproducible; locally each run explores new ones.
"""

from __future__ import annotations

import os
import tempfile
import time
import tracemalloc
from pathlib import Path

import yaml
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterflow.errors import ConfigError
from adapterflow.tasks.config import RunConfig, load_config

DEMO_TEXT = (ROOT / "configs" / "demo.yaml").read_text()
DEMO = yaml.safe_load(DEMO_TEXT)
MAX_SECONDS = 1.0
MAX_BYTES = 100 * 2**20
MAX_MESSAGE = 2_000

FUZZ = settings(
    max_examples=150, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# The demo config's data paths are relative to configs/; the fuzzed copies live in a folder of their own.
_FOLDER = Path(tempfile.mkdtemp(prefix="adapterflow-fuzz-"))
_PATH = _FOLDER / "fuzzed.yaml"


def _loads_or_refuses(data: bytes) -> None:
    _PATH.write_bytes(data)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = load_config(_PATH)
    except ConfigError as err:
        result = err
    finally:
        elapsed, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < MAX_SECONDS, f"took {elapsed:.2f} s"
    assert peak < MAX_BYTES, f"allocated {peak / 2**20:.0f} MB"
    if isinstance(result, ConfigError):
        message = str(result)
        assert message and len(message) < MAX_MESSAGE, f"a message of {len(message)} characters"
        assert "Traceback" not in message
    else:
        assert isinstance(result, RunConfig)


# --- building blocks --------------------------------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["", "~", "-1", "0", "1e309", ".inf", "-.inf", ".nan", "yes", "no", "null", "2024-13-45", "0x1F", "0o17",
                     "../../x", "a/b", "latest", "v1", "--help", "s3://b/x", "\x00", "é", "x" * 5000, "UTC", "Mars/Olympus"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)
# Snippets of YAML that no Python value dumps to: anchors, aliases, tags, deep nesting, huge scalars.
YAML_SNIPPETS = st.one_of(
    st.sampled_from([
        "&a [1, 2]", "*a", "*undefined", "&a [*a]", "!!python/object:os.system x", "!!binary AAAA", "!!binary ===",
        "!!int abc", "!!float x", "!!set {a, b}", "!!omap [a: 1]", "!!timestamp x", "!!str", "{<<: *a}", "[", "]", "{", "}", "'",
        '"\\x1b[2J"', '"\\0"', "|\n  block", ">-\n  folded", "? complex\n: key", "%YAML 1.1", "---", "...", "\t", "@", "`",
        "2024-13-45", "0b102", "1_000", "9" * 5000, "-.inf", ".NaN",
    ]),
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n),
    st.integers(min_value=1, max_value=300).map(lambda n: "{a: " * n + "1" + "}" * n),
    st.integers(min_value=1, max_value=200_000).map(lambda n: "x" * n),
)


@st.composite
def billion_laughs(draw) -> str:
    depth, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


@st.composite
def mutated_text(draw) -> bytes:
    """The demo config's lines, mutated a few times."""
    lines = DEMO_TEXT.splitlines()
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, len(lines)))
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "snippet", "value", "indent", "laughs"]))
        if kind == "delete" and lines:
            del lines[min(where, len(lines) - 1)]
        elif kind == "duplicate" and lines:
            lines.insert(where, lines[min(where, len(lines) - 1)])
        elif kind == "swap" and len(lines) > 1:
            other = draw(st.integers(0, len(lines) - 1))
            where = min(where, len(lines) - 1)
            lines[where], lines[other] = lines[other], lines[where]
        elif kind == "snippet":
            lines.insert(where, draw(st.sampled_from(["", "  ", "x: ", "  x: ", "- "])) + draw(YAML_SNIPPETS))
        elif kind == "value" and lines:  # a key kept, its value replaced
            line = lines[min(where, len(lines) - 1)]
            key, _, _ = line.partition(":")
            replacement = draw(YAML_SNIPPETS | VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**9).strip()))
            lines[min(where, len(lines) - 1)] = f"{key}: {replacement}"
        elif kind == "indent" and lines:
            lines[min(where, len(lines) - 1)] = " " * draw(st.integers(0, 9)) + lines[min(where, len(lines) - 1)].lstrip()
        elif kind == "laughs":
            lines[where:where] = draw(billion_laughs()).splitlines()
    return "\n".join(lines).encode()


@st.composite
def with_random_bytes(draw) -> bytes:
    data = bytearray(DEMO_TEXT.encode())
    for _ in range(draw(st.integers(1, 8))):
        where = draw(st.integers(0, len(data)))
        data[where:where + draw(st.integers(0, 3))] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _set(config: dict, path: list[str], value) -> dict:
    target = config
    for key in path[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[path[-1]] = value
    return config


# Every key the schema knows, at its place in the config: wrong types and odd values there reach the validators.
KEY_PATHS = [
    ["name"], ["task"], ["model", "bundled"], ["model", "path"], ["model", "hub_id"], ["model", "revision"], ["model", "dtype"],
    ["model", "quantization"], ["model", "trust_remote_code"], ["data", "train"], ["data", "validation"], ["data", "test"],
    ["data", "labels"], ["data", "label_field"], ["data", "max_length"], ["data", "checks", "min_rows"],
    ["data", "checks", "max_text_chars"], ["data", "checks", "max_duplicate_rate"], ["adapter", "r"], ["adapter", "alpha"],
    ["adapter", "dropout"], ["adapter", "target_modules"], ["adapter", "init"], ["adapter", "init", "method"],
    ["adapter", "init", "candidates"], ["adapter", "init", "rho"], ["adapter", "init", "knowledge"], ["train", "max_steps"],
    ["train", "epochs"], ["train", "learning_rate"], ["train", "seed"], ["train", "batch_size"], ["train", "checkpoint_every"],
    ["train", "log_every"], ["train", "checkpoint_merge"], ["train", "launch"], ["train", "launch", "processes"],
    ["evaluate", "split"], ["evaluate", "generation"], ["evaluate", "intruders"], ["registry", "model_name"],
    ["registry", "staging_alias"], ["registry", "production_alias"], ["promotion", "metric"], ["promotion", "forgetting"],
    ["promotion", "tie_breaker"], ["schedule"], ["schedule", "cron"], ["schedule", "timezone"], ["schedule", "interval_seconds"],
    ["tracking", "experiment"], ["tracking", "dvc_remote"], ["tracking", "mlflow_uri"], ["tracking", "system_metrics_seconds"],
]
INIT_METHODS = st.sampled_from(["lora", "gaussian", "pissa", "eva", "corda", "lora_ga", "lora_sb", "loftq", "auto", "orthogonal", "x"])


@st.composite
def mutated_config(draw) -> bytes:
    """The parsed demo config with a few keys set to arbitrary values, dumped back to YAML."""
    config = yaml.safe_load(DEMO_TEXT)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(KEY_PATHS))
        value = draw(INIT_METHODS) if path[-1] == "method" else draw(VALUES)
        _set(config, list(path), value)
    return yaml.safe_dump(config, allow_unicode=draw(st.booleans())).encode()


# --- the properties ---------------------------------------------------------------------------------------------------------


def test_the_demo_config_loads_here():
    """The harness itself: an unmutated copy loads (so refusals below come from the mutations)."""
    _loads_or_refuses(DEMO_TEXT.encode())
    assert load_config(_PATH).name == DEMO["name"]


@FUZZ
@given(mutated_text())
def test_mutated_demo_text(data):
    _loads_or_refuses(data)


@FUZZ
@given(with_random_bytes())
def test_demo_text_with_random_bytes(data):
    _loads_or_refuses(data)


@FUZZ
@given(mutated_config())
def test_demo_config_with_wrong_values(data):
    _loads_or_refuses(data)


@settings(FUZZ, max_examples=100)
@given(st.one_of(st.binary(max_size=2_000), st.text(max_size=2_000).map(str.encode),
                 VALUES.map(lambda v: yaml.safe_dump(v).encode()), billion_laughs().map(str.encode)))
def test_random_input(data):
    _loads_or_refuses(data)


@settings(FUZZ, max_examples=30)
@given(st.integers(1, 12), st.integers(2, 12), st.sampled_from(["labels", "target_modules", "top"]))
def test_nested_anchors_anywhere(depth, width, where):
    """billion_laughs' shape, its deepest alias placed where validation would report it."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    text = DEMO_TEXT
    if where == "labels":
        text = text.replace("  labels: [admin, fonts, games, graphics, net, science, sound, text]", f"  labels: *l{depth - 1}")
    elif where == "target_modules":
        text = text.replace("  target_modules: [query, value]", f"  target_modules: *l{depth - 1}")
    _loads_or_refuses(("\n".join(lines) + "\n" + text).encode())
