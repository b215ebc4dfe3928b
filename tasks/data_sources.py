"""Splits from a Hugging Face `datasets` source (`data.dataset`): a folder saved with `save_to_disk`, or a hub id
at a pinned revision.

A run materialises each split as JSON lines in its own folder (tasks/version_data.py snapshot_splits):
those files are what validation, training, DVC and the md5 tags see, exactly as for split files.
JSON lines, not parquet: they keep lists and dicts (chat turns) as Python lists, and the same rows
always give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from adapterflow.errors import ConfigError, DataError

SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")  # what save_to_disk writes


def names_a_folder(path: str, base: Path) -> bool:
    """A folder (./x, /x, ~/x, or a name that exists in `base`), not a hub id such as org/name."""
    return path.startswith((".", "/", "~")) or (base / path).exists()


def is_local(source) -> bool:
    """After config loading a local folder's path is absolute."""
    return names_a_folder(source.path, Path.cwd())


def check_source(source) -> None:
    """Before any work: a local folder is a saved dataset; a hub id is pinned and the hub is reachable by policy."""
    if is_local(source):
        folder = Path(source.path).expanduser()
        if not folder.is_dir() or not any((folder / marker).exists() for marker in SAVED_MARKERS):
            raise ConfigError(f"data.dataset.path: {folder} is not a dataset saved with datasets' save_to_disk (no "
                              f"{' or '.join(SAVED_MARKERS)} in it). Give that folder, or a hub id with a revision.")
        return
    if not source.revision:
        raise ConfigError(f"data.dataset: the hub dataset {source.path!r} needs a pinned revision (a commit sha or tag): "
                          "without one a retrain could read other data under the same config. Set data.dataset.revision.")


def materialize(source, folder: Path) -> dict[str, Path]:
    """Each split the config asks for, as a JSON-lines file in `folder`; returns split -> file."""
    loaded = _load(source)
    files = {}
    for split, name in source.splits.items():
        if name not in loaded:
            raise DataError(f"data.dataset.splits.{split}: the dataset has no split {name!r}; it has {', '.join(map(str, loaded))}. "
                            "Name one of those.")
        files[split] = folder / f"{split}.jsonl"
        with open(files[split], "x", encoding="utf-8") as handle:
            for row in loaded[name]:
                handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True, default=str) + "\n")
    return files


def _load(source):
    import datasets

    try:
        if is_local(source):
            loaded = datasets.load_from_disk(str(Path(source.path).expanduser()))
        else:
            loaded = datasets.load_dataset(source.path, source.name, revision=source.revision)
    except (OSError, ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise DataError(f"data.dataset {source.path!r} cannot be loaded: {str(err).splitlines()[0][:300]}. Check the path or hub "
                        "id and revision (a hub dataset needs the hub: HF_HUB_OFFLINE unset).") from None
    if isinstance(loaded, datasets.Dataset):  # a single saved split
        return {"train": loaded}
    return loaded
