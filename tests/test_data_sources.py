"""Splits from a `datasets` source: materialised into the run folder, then read, validated, hashed and versioned as files."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from conftest import classification_rows, cls_config, write_config

from adapterflow.errors import ConfigError, DataError
from adapterflow.tasks.config import load_config


@pytest.fixture
def saved_dataset(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    splits = {"train": classification_rows(48, 1), "dev": classification_rows(18, 2), "test": classification_rows(18, 3)}
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(folder))
    return folder, splits


def _dataset_config(tmp_path, tiny_bert, cls_data, dataset: dict) -> dict:
    config = cls_config(tiny_bert, cls_data)
    for split in ("train", "validation", "test"):
        config["data"].pop(split)
    config["data"]["dataset"] = dataset
    config["evaluate"]["split"] = "test" if "test" in dataset.get("splits", {}) else "validation"
    return config


def test_a_saved_dataset_is_materialised_in_the_run_folder_and_read_like_split_files(tmp_path, tiny_bert, cls_data, saved_dataset):
    from adapterflow.tasks.validate_data import validate_data
    from adapterflow.tasks.version_data import snapshot_splits

    folder, splits = saved_dataset
    raw = _dataset_config(tmp_path, tiny_bert, cls_data, {"path": "saved", "splits": {"train": "train", "validation": "dev",
                                                                                       "test": "test"}})
    config = load_config(write_config(tmp_path / "c.yaml", raw))
    assert config.data.dataset.path == str(folder) and not config.uses_hub()  # relative to the config; offline
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    snapshot = snapshot_splits(config, run_dir)
    files = {split: getattr(snapshot.config.data, split) for split in ("train", "validation", "test")}
    assert all(path.startswith(str(run_dir / "data")) for path in files.values())
    assert snapshot.md5s == {split: hashlib.md5(open(path, "rb").read()).hexdigest() for split, path in files.items()}
    rows = [json.loads(line) for line in open(files["validation"])]
    assert rows == [dict(sorted(row.items())) for row in splits["dev"]]
    assert validate_data(snapshot.config).row_counts == {"train": 48, "validation": 18, "test": 18}
    again = tmp_path / "again"
    again.mkdir()
    assert snapshot_splits(config, again).md5s == snapshot.md5s  # the same rows give the same bytes
    assert config.digest() != load_config(write_config(tmp_path / "files.yaml", cls_config(tiny_bert, cls_data))).digest()


@pytest.mark.parametrize(("dataset", "problem"), [
    ({"path": "org/some-data"}, "needs a pinned revision"),
    ({"path": "./not-saved"}, "is not a dataset saved with datasets' save_to_disk"),
])
def test_check_refuses_an_unpinned_hub_dataset_and_a_folder_that_is_no_saved_dataset(tmp_path, tiny_bert, cls_data, dataset, problem):
    from adapterflow.flows.cli import preflight

    (tmp_path / "not-saved").mkdir()
    path = write_config(tmp_path / "c.yaml", _dataset_config(tmp_path, tiny_bert, cls_data, dataset))
    with pytest.raises(ConfigError, match=problem):
        preflight(str(path))


def test_two_sources_or_none_and_a_missing_split_are_one_clear_error(tmp_path, tiny_bert, cls_data, saved_dataset):
    from adapterflow.tasks.version_data import snapshot_splits

    both = cls_config(tiny_bert, cls_data)
    both["data"]["dataset"] = {"path": "saved"}
    with pytest.raises(ConfigError, match="are two sources of the splits; keep one"):
        load_config(write_config(tmp_path / "both.yaml", both))
    none = _dataset_config(tmp_path, tiny_bert, cls_data, {"path": "saved"})
    none["data"].pop("dataset")
    with pytest.raises(ConfigError, match=r"needs data.train and data.validation \(split files\), or data.dataset"):
        load_config(write_config(tmp_path / "none.yaml", none))
    config = load_config(write_config(tmp_path / "c.yaml", _dataset_config(tmp_path, tiny_bert, cls_data, {"path": "saved"})))
    (tmp_path / "run").mkdir()
    with pytest.raises(DataError, match="the dataset has no split 'validation'; it has train, dev, test"):
        snapshot_splits(config, tmp_path / "run")


def test_a_hub_dataset_is_loaded_at_its_pinned_revision_and_needs_the_hub(tmp_path, tiny_bert, cls_data, monkeypatch):
    import datasets

    from adapterflow.tasks.version_data import snapshot_splits

    asked = {}

    def load_dataset(path, name=None, revision=None):  # the hub is not reachable here: what is asked of it is checked
        asked.update(path=path, name=name, revision=revision)
        return datasets.DatasetDict({s: datasets.Dataset.from_list(classification_rows(12, 1)) for s in ("train", "validation")})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    dataset = {"path": "org/some-data", "revision": "0123abc", "name": "en"}
    config = load_config(write_config(tmp_path / "c.yaml", _dataset_config(tmp_path, tiny_bert, cls_data, dataset)))
    assert config.data.dataset.path == "org/some-data" and config.uses_hub()
    (tmp_path / "run").mkdir()
    snapshot = snapshot_splits(config, tmp_path / "run")
    assert asked == {"path": "org/some-data", "name": "en", "revision": "0123abc"}
    assert set(snapshot.md5s) == {"train", "validation"}


def test_a_base_with_a_saved_dataset_keeps_its_folder_and_a_hub_id_stays_an_id(tmp_path, tiny_bert, cls_data, saved_dataset):
    base = write_config(tmp_path / "base.yaml", _dataset_config(tmp_path, tiny_bert, cls_data, {"path": "saved"}))
    child = tmp_path / "team" / "child.yaml"
    child.parent.mkdir()
    child.write_text(yaml.safe_dump({"extends": "../base.yaml", "name": "child"}))
    assert load_config(child).data.dataset.path == str(saved_dataset[0]) == load_config(base).data.dataset.path
    hub = write_config(tmp_path / "hub.yaml", _dataset_config(tmp_path, tiny_bert, cls_data, {"path": "org/x", "revision": "v1"}))
    (tmp_path / "team" / "hub-child.yaml").write_text(yaml.safe_dump({"extends": str(hub), "name": "child"}))
    assert load_config(tmp_path / "team" / "hub-child.yaml").data.dataset.path == "org/x"
