"""A run config from its sources: the file, the files it `extends`, and `--set key.path=value` overrides.

`extends: base.yaml` at the top of a config deep-merges the config over that file (itself allowed to
extend another): mappings merge key by key, lists and scalars are replaced. A relative path is read
against the folder of the file that wrote it, so a base in another folder keeps pointing at its own
data. An `adapter.init` naming another method than its base replaces the base's init section whole:
each method has its own keys.

An override's value is read as YAML, exactly as the same value in the file would be
(`train.learning_rate=1e-3`, `adapter.target_modules=[query,value]`, `evaluate.intruders=null`); the
schema then types and checks it like any key. Overrides are applied after every file, and a path an
override gives is read against the current folder, as on any command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from adapterflow.errors import ConfigError
from adapterflow.tasks.data_sources import names_a_folder

MAX_EXTENDS_DEPTH = 8
URL_PREFIXES = ("s3://", "gs://", "gcs://", "azure://", "az://", "ssh://", "http://", "https://", "hdfs://", "webdav")
# Keys whose values are local paths, as (section, key) or (section, subsection, key); adapter.init's come from its method.
PATH_KEYS = (("data", "train"), ("data", "validation"), ("data", "test"), ("model", "path"), ("evaluate", "generation", "file"),
             ("promotion", "forgetting", "file"), ("tracking", "dvc_remote"))


def compose(path: Path, overrides: Sequence[str], read) -> dict[str, Any]:
    """The raw config: `path` over the files it extends, then the overrides. `read(path)` parses one file."""
    raw = _with_bases(Path(path), read, ())
    for override in overrides:
        _set(raw, *_parse_override(override), base=Path.cwd())
    return raw


def _with_bases(path: Path, read, chain: tuple[Path, ...]) -> dict[str, Any]:
    raw = dict(read(path))
    if "extends" not in raw:
        return raw
    parent = _parent_path(path, raw.pop("extends"))
    if parent in chain or parent == path.resolve():
        loop = " -> ".join(str(p) for p in (*chain, path.resolve(), parent))
        raise ConfigError(f"{path}: extends makes a loop ({loop}). Let one file be the base of the others.")
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise ConfigError(f"{path}: more than {MAX_EXTENDS_DEPTH} files extend one another; flatten the chain.")
    base = _absolute_paths(_with_bases(parent, read, (*chain, path.resolve())), parent.parent)
    return merge(base, raw)


def _parent_path(path: Path, value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: extends must be the path of one YAML file, e.g. `extends: demo.yaml` (relative to {path.parent}).")
    parent = (path.resolve().parent / Path(value).expanduser()).resolve()
    if not parent.is_file():
        raise ConfigError(f"{path}: extends names {value}, which is not a file ({parent}). Give the path of the base config, "
                          f"relative to {path.parent}.")
    return parent


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merged key by key, everything else replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not _other_init_method(key, merged[key], value):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _other_init_method(key: str, base: dict, over: dict) -> bool:
    return key == "init" and "method" in over and over["method"] != base.get("method")


def _absolute_paths(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The base's relative paths made absolute against its own folder, before a config in another folder merges over it."""
    raw = merge(raw, {})  # a copy of every mapping on the way down
    for keys in (*PATH_KEYS, *(("adapter", "init", field) for field in _init_path_fields(raw))):
        *sections, leaf = keys
        holder = raw
        for section in sections:
            holder = holder.get(section) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and isinstance(holder.get(leaf), str):
            holder[leaf] = _absolute(holder[leaf], folder)
    dataset = raw.get("data", {}).get("dataset") if isinstance(raw.get("data"), dict) else None
    if isinstance(dataset, dict) and isinstance(dataset.get("path"), str) and names_a_folder(dataset["path"], folder):
        dataset["path"] = _absolute(dataset["path"], folder)  # a hub id (org/name) stays as it is
    return raw


def _absolute(value: str, folder: Path) -> str:
    if value.startswith(URL_PREFIXES) or "://" in value or not value.strip():
        return value
    candidate = Path(value).expanduser()
    return str(candidate if candidate.is_absolute() else (folder / candidate).resolve())


def _init_path_fields(raw: dict[str, Any]) -> tuple[str, ...]:
    from adapterflow.adapters.registry import get_initializer

    init = raw.get("adapter", {}).get("init") if isinstance(raw.get("adapter"), dict) else None
    try:
        return get_initializer(init["method"]).config.path_fields if isinstance(init, dict) else ()
    except (KeyError, TypeError, ValueError):
        return ()  # an unknown method: validation names it


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(part.strip() for part in keys):
        raise ConfigError(f"--set {text!r}: write key.path=value, e.g. --set train.learning_rate=1e-3 or --set adapter.init.method=eva.")
    try:
        parsed = parse_yaml_value(value) if value.strip() else ""
    except ValueError as err:
        raise ConfigError(f"--set {key}: the value {value!r} is not valid YAML ({err}). Quote it to keep it as text.") from None
    return [part.strip() for part in keys], parsed


def parse_yaml_value(text: str) -> Any:
    """yaml.safe_load of a value typed on the command line; a ValueError with a one-line reason when it cannot be read."""
    try:
        return yaml.safe_load(text)
    except (AttributeError, KeyError):  # PyYAML's own crash on a value that does not fit its explicit tag (`!!bool x`)
        raise ValueError("the value does not fit its explicit tag") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as err:  # `!!int x`, a date 2024-13-45
        raise ValueError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None


def _set(raw: dict[str, Any], keys: list[str], value: Any, base: Path) -> None:
    holder = raw
    for depth, part in enumerate(keys[:-1]):
        child = holder.get(part)
        if child is None:
            child = holder[part] = {}
        if not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise ConfigError(f"--set {'.'.join(keys)}: {where} is a value ({_short(child)}), not a section with keys. "
                              f"Set {where} itself.")
        holder = child
    if keys[-1] == "method" and keys[:-1] == ["adapter", "init"] and holder.get("method") != value:
        holder.clear()  # another method's keys would be unknown to this one
    holder[keys[-1]] = _absolute(value, base) if _is_path_key(keys) and isinstance(value, str) else value


def _is_path_key(keys: list[str]) -> bool:
    return tuple(keys) in PATH_KEYS


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
