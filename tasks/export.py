"""`adapterflow export NAME@ALIAS OUT`: a registered version as files other tools load without MLflow.

Plain: the PEFT adapter folder, for `PeftModel.from_pretrained(base, OUT)`. Merged: the base with the adapter
folded in (`merge_and_unload`), saved as safetensors with its tokenizer, for tools that know no PEFT.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from adapterflow.errors import ConfigError, RegistryError
from adapterflow.redact import redact_text, redact_uri


def export_version(spec: str, out: Path, tracking_uri: str, merged: bool = False) -> str:
    """Write the version `spec` (NAME@ALIAS) names to `out`; return its version number."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from adapterflow.tasks.registry_queries import require_safetensors
    from adapterflow.tasks.tracking import client

    name, alias = _parse(spec)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; export writes into a new or empty folder.")
    mlflow_client = client(tracking_uri)
    try:
        version = mlflow_client.get_model_version_by_alias(name, alias)
        source = mlflow_client.get_model_version_download_uri(name, version.version)
    except MlflowException as err:
        raise RegistryError(f"no version of {name} has the alias @{alias} at {redact_uri(tracking_uri)}: "
                            f"{redact_text(err.message.splitlines()[0])}") from None
    with tempfile.TemporaryDirectory(prefix="adapterflow-export-") as scratch:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=scratch, tracking_uri=tracking_uri))
        adapter = folder / "artifacts" / "adapter"
        require_safetensors(adapter, f"{name}@{alias}")
        if merged:
            _write_merged(adapter, _model_config(folder), out)
        else:
            shutil.copytree(adapter, out, dirs_exist_ok=True)
    return str(version.version)


def _parse(spec: str) -> tuple[str, str]:
    name, _, alias = spec.rpartition("@")
    if not name or not alias:
        raise ConfigError(f"expected NAME@ALIAS (e.g. my-adapter@production), got {spec!r}")
    return name, alias


def _model_config(folder: Path) -> dict:
    from mlflow.models import Model

    return Model.load(str(folder)).flavors["python_function"]["config"]


def _write_merged(adapter: Path, cfg: dict, out: Path) -> None:
    """Merged on the full-precision base the adapter was registered for (a 4-bit training base cannot hold the merge)."""
    from peft import PeftModel

    from adapterflow.tasks.model_io import BaseModelRef, bundled_folder, load_model, load_tokenizer

    location = str(bundled_folder(cfg["bundled"])) if cfg["source"] == "bundled" else cfg["name_or_path"]
    ref = BaseModelRef(location, cfg.get("revision"), cfg["identity"], cfg["source"], cfg.get("trust_remote_code", False))
    model = PeftModel.from_pretrained(load_model(ref, cfg["task"], cfg.get("labels")), str(adapter)).merge_and_unload()
    model.save_pretrained(out)  # transformers 5 writes safetensors only
    load_tokenizer(ref).save_pretrained(out)
