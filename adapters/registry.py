"""The initializer registry: each method registers its config class, its code and its capability flags once.

Callers branch on the flags, never on method names: the config schema builds `adapter.init` (and a
race's candidates) from the registered config classes; the init stage picks the calibration form,
full precision or a race from the flags; the hardware and config checks refuse what a flag rules
out (CUDA only, a 4-bit base). Adding a method is one new module in adapters/methods/.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

from adapterflow.errors import InitError

# Ordered by what a method needs: nothing, the weights, activations, gradients. The default race
# lists its candidates in this order.
FAMILIES = ("random", "svd", "variance", "gradient", "search")
DEFAULT_METHOD = "lora"  # when a config names none


class InitConfig(BaseModel):
    """Base of every initializer's `adapter.init` section: unknown keys refused, frozen, `method` its tag."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # .inf/.nan refused in every float knob

    # Fields naming data files: resolved against the config file's folder, md5'd into the init cache key.
    path_fields: ClassVar[tuple[str, ...]] = ()
    # Fields left None in the config that take a value from the run, e.g. {"update_lr": "first_step_lr"}.
    run_defaults: ClassVar[dict[str, str]] = {}

    def rank_problem(self, r: int) -> str | None:
        """Why this method cannot use adapter.r = r (refused at config time), or None."""
        return None

    def sample_source(self) -> SampleSource | None:
        """For calibration in single samples: how many and from where; None: all of the train split."""
        return None


class SampleSource(NamedTuple):
    limit: int  # at most this many samples
    file_field: str | None = None  # the config field naming a data file read instead of the train split
    text_field: str | None = None  # the config field naming that file's text column


class Regularizer(NamedTuple):
    """A term training adds to its loss: weight(init config, learning rate) × value(peft model, init config).

    The unweighted value is logged as train/regularizer; a weight of 0 leaves the loss as it was.
    """

    value: Callable  # (peft_model, init_config) -> scalar tensor, differentiable in the adapter's parameters
    weight: Callable  # (init_config, learning_rate) -> float


class Refusal(NamedTuple):
    """Why a method cannot run somewhere and what to use there instead, quoted in the user's error."""

    reason: str
    instead: str


@dataclass(frozen=True, kw_only=True)
class Initializer:
    name: str
    family: str
    config: type[InitConfig]  # its `adapter.init` section; `method: Literal[name]` is the union's tag
    apply: Callable | None  # (model, LoraSettings, InitContext) -> (PeftModel, InitReport); None for a race
    verify: Callable | None = None  # (peft_model, LoraSettings) -> {check: value}; raises InitError
    mutates_base: bool  # W <- W - s*BA: the saved adapter is converted to plain LoRA
    needs_data: bool
    needs_grad: bool  # calibration batches carry labels
    supports_quantized: bool  # False: computed on the full-precision base; a 4-bit base quantizes the residual
    preserves_outputs: bool  # right after init the model computes what the base computed
    trains_middle_only: bool = False  # LoRA-SB: A, B0 frozen, lora_B = B0·R with R (r×r) trainable
    structured: bool = False  # NLoRA: trains ΔW = s·B·M·A (lora_B = B·M), all three or only M as its config says
    assigns_ranks: bool = False  # EVA: sets each layer's rank itself (peft's rank_pattern), so a user's pattern is refused
    calibration: Literal["batches", "samples"] = "batches"  # samples: unpadded, one per forward
    cuda_only: Refusal | None = None
    needs_4bit_base: str | None = None  # what to use on an unquantized base instead; None: any base
    spectrum_label: str = "singular value of s·B·A"  # what the report's spectra hold (the plot's y axis)
    is_race: bool = False  # trains candidates and keeps the winner; its config's `candidates` lists them
    in_races: bool = True  # may be a race candidate
    in_default_race: bool = False  # a candidate when the race config lists none
    regularizer: Regularizer | None = None  # KaSA, SORSA: a term of their training loss
    training_form: Callable | None = None  # (peft_model) -> None: reshapes the loaded initial adapter for training (SORSA)
    extra_products: Callable | None = None  # (peft_model, init folder) -> None: products beside the initial adapter (KaSA)
    plain_lora: Callable | None = None  # (saved folder, init folder) -> None: the trained adapter as plain LoRA on the untouched base

    def default_config(self) -> InitConfig:
        return self.config(method=self.name)


_REGISTRY: dict[str, Initializer] = {}


def register(initializer: Initializer) -> Initializer:
    problem = _registration_problem(initializer)
    if problem:
        raise ValueError(problem)
    _REGISTRY[initializer.name] = initializer
    return initializer


def _registration_problem(initializer: Initializer) -> str | None:
    if initializer.name in _REGISTRY:
        return f"initializer {initializer.name!r} is already registered"
    if initializer.family not in FAMILIES:
        return f"initializer family must be one of {FAMILIES}, got {initializer.family!r}"
    tag = initializer.config.model_fields.get("method")
    if tag is None or getattr(tag.annotation, "__args__", None) != (initializer.name,):
        return f"initializer {initializer.name!r}: its config needs `method: Literal[{initializer.name!r}]`"
    if (initializer.apply is None) != initializer.is_race:
        return f"initializer {initializer.name!r}: a race has no apply, every other initializer has one"
    return None


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


@contextmanager
def registered(initializer: Initializer) -> Iterator[Initializer]:
    """Register for the duration of a block (tests): the registry is as before afterwards."""
    register(initializer)
    try:
        yield initializer
    finally:
        unregister(initializer.name)


def get_initializer(name: str) -> Initializer:
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InitError(f"unknown init method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}") from None


def registered_names() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def initializers() -> list[Initializer]:
    return [get_initializer(name) for name in registered_names()]


def race_candidates() -> list[Initializer]:
    """Who may race, cheapest family first (the default race's order)."""
    eligible = [i for i in initializers() if i.in_races and not i.is_race]
    return sorted(eligible, key=lambda i: FAMILIES.index(i.family))


def _load_builtin_methods() -> None:
    import adapterflow.adapters.methods  # noqa: F401  (registers on import)
