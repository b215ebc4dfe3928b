"""Intruder-dimension mitigation (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
arXiv:2410.21228) as a post-training candidate, judged beside the trained adapter like a checkpoint merge.

peft's `reduce_intruder_dimension` does the arithmetic: it finds the top-k left singular vectors of W + ΔW unlike
every singular vector of W (the spectral report's test, with the same top_k and threshold), multiplies their
singular values by `scale`, and refits ΔW. What it does beyond that, and what is done about it here:
- It reads W from the loaded base: it runs on the untouched base, which every trained adapter is saved against
  (base-rewriting inits are saved converted to plain LoRA). A 4-bit or 8-bit base is loaded unquantized for this
  step (the packed weights are not W); the candidate is then evaluated on the base as configured.
- It refits at the adapter's rank r, but the mitigated ΔW - (1 - scale)·(intruder part of W + ΔW) has rank up to
  r + (intruders in the layer): on the test adapter peft's rank-r fit dropped 22-32% of it (tests/test_intruders.py),
  half the intruders it had removed coming back. So it is given the rank it needs: peft's function runs on a copy of
  the adapter padded with zeros to r + (most intruders in any layer), and its refit is then exact. The registered
  adapter has that rank (adapter_config.json's r and rank_pattern grow by it; alpha stays, B carries the scaling).
- It adds a second adapter whose modules_to_save are fresh copies of the untrained originals (a classifier head
  trained with the adapter would be lost), so only its A and B are taken, written over a copy of the trained
  adapter's file: the head stays as trained.
- Its docstring reads `mitigation_lambda` as the share removed; its code keeps that share (λ = 0 removes the
  intruders). `scale` says what the code does.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from adapterflow.errors import ModelError

WEIGHTS = "adapter_model.safetensors"
PADDED, MITIGATED = "padded", "intruders_mitigated"  # adapters in memory only: peft's function reads one, writes the other
# B and A of each layer in a saved adapter (embedding layers: lora_embedding_A/B, without ".weight").
LORA_FACTOR = re.compile(r"\.lora_(embedding_)?[AB](\.weight)?$")


@dataclass(frozen=True)
class IntruderCount:
    total: int  # intruder dimensions over all layers (the spectral report's intruders_total)
    energy: float  # mean over layers of the intruders' share of the top-k energy (sum of σ²)


@dataclass(frozen=True)
class MitigationChoice:
    """Mitigated or unmitigated adapter, judged on validation; intruders and the forgetting probe beside it."""

    scale: float
    top_k: int
    threshold: float
    tolerance: float
    metric: str
    split: str
    unmitigated: float
    mitigated: float
    intruders_unmitigated: IntruderCount
    intruders_mitigated: IntruderCount
    forgetting: dict | None  # {"file", "unmitigated", "mitigated"}: the metric on promotion.forgetting's file
    chosen: str  # "mitigated" | "unmitigated"
    reason: str
    adapter_dir: str  # the chosen one, registered

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        metric, probe = self.metric, self.forgetting
        return {
            f"unmitigated_{metric}": self.unmitigated,
            f"mitigated_{metric}": self.mitigated,
            "intruders_unmitigated": float(self.intruders_unmitigated.total),
            "intruders_mitigated": float(self.intruders_mitigated.total),
            "intruder_energy_unmitigated": self.intruders_unmitigated.energy,
            "intruder_energy_mitigated": self.intruders_mitigated.energy,
            **(
                {f"forgetting_unmitigated_{metric}": probe["unmitigated"], f"forgetting_mitigated_{metric}": probe["mitigated"]}
                if probe
                else {}
            ),
            "chose_mitigated": float(self.chosen == "mitigated"),
        }

    def tag_text(self) -> str:
        return (
            f"{self.chosen} (scale {self.scale:g}; {self.metric} on {self.split}: mitigated {self.mitigated:.4f}, "
            f"unmitigated {self.unmitigated:.4f}; intruders {self.intruders_mitigated.total} vs {self.intruders_unmitigated.total})"
        )


def mitigate_adapter(config, base_ref, adapter_dir: Path, out_dir: Path) -> Path:
    """The mitigated copy of a saved adapter in `out_dir`: the same head, new A and B at the rank they need."""
    from peft import PeftModel, get_peft_model_state_dict
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    from adapterflow.adapters.spectral import intruder_report
    from adapterflow.tasks.model_io import load_model
    from adapterflow.tasks.spectral_report import one_thread

    spec = config.evaluate.intruders
    base = load_model(base_ref, config.task, config.data.labels, config.model.dtype)  # unquantized: peft reads W itself
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    _refuse_other_layers(model)
    with one_thread():  # small SVDs: a second thread only waits on a busy machine (as in the spectral report)
        # The exact report applies peft's test (full SVDs, the same top-k and threshold): the most intruders in a layer
        # is the rank the mitigated ΔW may need beyond r.
        extra = max(row.intruders for row in intruder_report(model, spec.top_k, spec.threshold))
        _add_padded_copy(model, extra)
        reduce_intruder_dimension(
            model,
            old_adapter_name=PADDED,
            new_adapter_name=MITIGATED,
            top_k=spec.top_k,
            threshold_epsilon=spec.threshold,
            mitigation_lambda=spec.mitigate.scale,
            logging_sink=None,
        )
    factors = get_peft_model_state_dict(model, adapter_name=MITIGATED)
    return _write_with_factors(Path(adapter_dir), Path(out_dir), factors, extra)


def _refuse_other_layers(model) -> None:
    """peft's function refits B·A of linear layers stored as out x in; on others it would write wrong factors."""
    from peft.tuners.lora import LoraLayer

    from adapterflow.adapters.layers import short_name

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight
        if module.lora_embedding_A or weight.ndim != 2 or getattr(module, "fan_in_fan_out", False):
            raise ModelError(
                f"intruder mitigation works on linear layers stored as out x in; {short_name(name)} is not one (an embedding, "
                "a convolution or GPT-2's Conv1D): remove it from adapter.target_modules, or remove evaluate.intruders.mitigate"
            )


@torch.no_grad()
def _add_padded_copy(model, extra: int) -> None:
    """The trained adapter again as adapter PADDED with `extra` more rank: zero rows in A, zero columns in B (B rescaled
    where the larger rank changes alpha/r), so it computes the same ΔW and peft's refit has room for the exact result."""
    from adapterflow.adapters.layers import lora_layers

    config = model.peft_config["default"]
    padded = {"r": config.r + extra, "rank_pattern": {k: v + extra for k, v in (config.rank_pattern or {}).items()}}
    model.add_adapter(PADDED, replace(config, **padded, init_lora_weights=True))  # a plain init: nothing may rewrite the base
    for _, module in lora_layers(model):
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        rescale = module.scaling["default"] / module.scaling[PADDED]
        module.lora_A[PADDED].weight.copy_(torch.cat([a, a.new_zeros(extra, a.shape[1])]))
        module.lora_B[PADDED].weight.copy_(torch.cat([b * rescale, b.new_zeros(b.shape[0], extra)], dim=1))


def _write_with_factors(adapter_dir: Path, out_dir: Path, factors: dict, extra: int) -> Path:
    """A copy of the saved adapter with these A and B and the rank they have; every other tensor as trained."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dir, out_dir, dirs_exist_ok=True)
    tensors = load_file(out_dir / WEIGHTS)
    for key in [key for key in tensors if LORA_FACTOR.search(key)]:
        tensors[key] = factors[key].to(tensors[key].dtype).contiguous()
    save_file(tensors, out_dir / WEIGHTS, metadata={"format": "pt"})
    config_path = out_dir / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["r"] += extra
    saved["rank_pattern"] = {k: v + extra for k, v in (saved.get("rank_pattern") or {}).items()}  # alpha kept: B carries the scaling
    config_path.write_text(json.dumps(saved, indent=2))
    return out_dir


def intruder_count(config, base_ref, adapter_dir: Path) -> IntruderCount:
    from adapterflow.tasks.spectral_report import intruder_rows

    rows = intruder_rows(config, base_ref, adapter_dir)
    return IntruderCount(sum(row.intruders for row in rows), sum(row.intruder_energy for row in rows) / max(len(rows), 1))


def choose_adapter(config, base_ref, adapter_dir: str, mitigated_dir: str) -> MitigationChoice:
    """Both on validation by the gate metric (not the reported split: choosing on it would bias it); forgetting
    decides within `tolerance`, and a tie, for the mitigated one when it forgets less."""
    from adapterflow.tasks.evaluate import evaluate_adapter

    spec, metric = config.evaluate.intruders, config.gate_metric()
    scores = {
        name: evaluate_adapter(config, base_ref, Path(path), "validation")[metric]
        for name, path in (("unmitigated", adapter_dir), ("mitigated", mitigated_dir))
    }
    counts = {
        name: intruder_count(config, base_ref, Path(path)) for name, path in (("unmitigated", adapter_dir), ("mitigated", mitigated_dir))
    }
    probe = _forgetting_probe(config, base_ref, adapter_dir, mitigated_dir)
    chosen, reason = _verdict(metric, spec.mitigate.tolerance, scores, counts, probe)
    return MitigationChoice(
        scale=spec.mitigate.scale,
        top_k=spec.top_k,
        threshold=spec.threshold,
        tolerance=spec.mitigate.tolerance,
        metric=metric,
        split="validation",
        unmitigated=scores["unmitigated"],
        mitigated=scores["mitigated"],
        intruders_unmitigated=counts["unmitigated"],
        intruders_mitigated=counts["mitigated"],
        forgetting=probe,
        chosen=chosen,
        reason=reason,
        adapter_dir=mitigated_dir if chosen == "mitigated" else adapter_dir,
    )


def _forgetting_probe(config, base_ref, adapter_dir: str, mitigated_dir: str) -> dict | None:
    """The gate metric on promotion.forgetting's file, read as the promotion gate reads it (as a test split)."""
    check = config.promotion.forgetting
    if check is None:
        return None
    from adapterflow.tasks.evaluate import evaluate_adapter

    probe, metric = config.model_copy(update={"data": config.data.model_copy(update={"test": check.file})}), config.gate_metric()
    return {
        "file": check.file,
        "unmitigated": evaluate_adapter(probe, base_ref, Path(adapter_dir), "test")[metric],
        "mitigated": evaluate_adapter(probe, base_ref, Path(mitigated_dir), "test")[metric],
    }


def _verdict(metric: str, tolerance: float, scores: dict, counts: dict, probe: dict | None) -> tuple[str, str]:
    from adapterflow.tasks.gate import oriented

    gain = oriented(metric, scores["mitigated"] - scores["unmitigated"])
    on_validation = f"{metric} on validation {scores['mitigated']:.4f} vs {scores['unmitigated']:.4f} unmitigated"
    if gain > 0:
        return "mitigated", f"better: {on_validation}"
    if probe is not None:
        forgets_less = oriented(metric, probe["mitigated"] - probe["unmitigated"]) > 0
        why = f"{metric} on the forgetting file {probe['mitigated']:.4f} vs {probe['unmitigated']:.4f}"
    else:  # fewer intruder dimensions, or as many holding less of the top-k energy
        mitigated, unmitigated = counts["mitigated"], counts["unmitigated"]
        forgets_less = (mitigated.total, mitigated.energy) < (unmitigated.total, unmitigated.energy)
        why = f"intruder dimensions {mitigated.total} vs {unmitigated.total} (energy {mitigated.energy:.3f} vs {unmitigated.energy:.3f})"
    if gain >= -tolerance and forgets_less:
        return "mitigated", f"within tolerance {tolerance:g} ({on_validation}) and forgets less: {why}"
    return "unmitigated", f"{on_validation}; {why}"


def mitigation_markdown(choice: MitigationChoice) -> str:
    probe = choice.forgetting
    rows = [
        ("validation " + choice.metric, choice.mitigated, choice.unmitigated),
        *([(f"forgetting file {choice.metric}", probe["mitigated"], probe["unmitigated"])] if probe else []),
        ("intruder dimensions", choice.intruders_mitigated.total, choice.intruders_unmitigated.total),
        ("intruders' share of top-k energy", choice.intruders_mitigated.energy, choice.intruders_unmitigated.energy),
    ]
    table = "\n".join(f"| {name} | {_cell(a)} | {_cell(b)} |" for name, a, b in rows)
    return (
        f"# Intruder mitigation (scale {choice.scale:g}, top-k {choice.top_k}, threshold {choice.threshold:g})\n\n"
        f"| | mitigated | unmitigated |\n|---|---:|---:|\n{table}\n\nRegistered: **{choice.chosen}** ({choice.reason}).\n"
    )


def _cell(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4f}"
