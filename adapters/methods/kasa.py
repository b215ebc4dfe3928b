"""KaSA, knowledge-aware singular-value adaptation (arXiv 2412.06071): peft's own, plus its loss and a plain LoRA save.

What this relies on in peft 0.21.2 (pinned in requirements/*.txt), read in peft/tuners/lora/variants.py and model.py:
- LoraConfig(kasa_config=KasaConfig(beta, gamma)) makes every targeted nn.Linear a KasaLinearVariant. Its init
  replaces the base weight W by its rank-(k-r) SVD truncation (the r smallest singular components dropped,
  k = min(out, in)), keeps B = 0 as plain LoRA does and adds a learnable r-vector `lora_diag`:
  ΔW = s·B·diag(lora_diag)·A. peft refuses r >= k (ValueError).
- A saved KaSA adapter keeps its kasa_config and `lora_diag` (key `<layer>.lora_diag`); PeftModel.from_pretrained
  truncates the base again on load, so training applies the exported init as it is (the same W, the same SVD).
- LoraModel._get_kasa_loss() is β·Σ‖lora_diag‖² + γ·Σ(‖BᵀB−I‖_F + ‖AAᵀ−I‖_F) over the KaSA layers, 0.0 when there
  are none; peft leaves adding it to the loss to the user.
- bitsandbytes' LoRA layers ignore kasa_config (they become plain LoRA) and peft's convert_to_lora refuses KaSA.

What we add: that loss in training (× regularizer_weight), the removed minor part recorded at init, and the trained
adapter rewritten as plain LoRA on the untouched base: B' = [B·diag(d), −B0], A' = [A; A0] with s·B0·A0 the removed
part, so rank 2r. It then loads without KaSA, and without its SVD on every load, wherever plain LoRA loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.adapters.methods.basic import ranks_of
from adapterflow.adapters.registry import InitConfig, Initializer, Regularizer, register
from adapterflow.adapters.report import InitReport
from adapterflow.errors import InitError

if TYPE_CHECKING:
    import torch

REMOVED_FILE = "kasa_removed.safetensors"  # beside the initial adapter: B0, A0 under the adapter's keys
FACTOR_TOL = 1e-5  # the removed part must be rank r: what a rank-r fit of it misses, relative to W
LEAK_TOL = 1e-3  # the removed part's row and column spaces in the truncated base, relative
ENERGY_TOL = 1e-3  # the removed components' mean σ² over all components' mean σ²: at most 1 (+ float error)


class KasaInit(InitConfig):
    """peft's KaSA: the base loses its r smallest singular components; B·diag(d)·A trains with KaSA's regularizer."""

    method: Literal["kasa"]
    beta: float = Field(1e-4, ge=0, le=1.0)  # weight of Σ‖lora_diag‖² (peft's default, the paper's GLUE value)
    gamma: float = Field(1e-3, ge=0, le=1.0)  # weight of the orthogonality terms ‖BᵀB−I‖_F + ‖AAᵀ−I‖_F (likewise)
    regularizer_weight: float = Field(1.0, ge=0, le=1e3)  # × peft's KaSA loss in the training loss; 0 leaves it out


def apply_kasa(model, settings, context):
    from peft import KasaConfig, get_peft_model

    init = settings.init
    originals = _target_weights(model, settings.target_modules)  # peft truncates them in place
    config = settings.lora_config(True, kasa_config=KasaConfig(beta=init.beta, gamma=init.gamma))
    peft_model = get_peft_model(model, config)
    spectra = {short_name(name): _record_removed(name, module, originals) for name, module in lora_layers(peft_model)}
    report = InitReport(method="kasa", ranks=ranks_of(peft_model), spectra=spectra)
    report.notes.append(
        f"peft's KaSA: the r smallest singular components of each W removed; beta {init.beta:g}, "
        f"gamma {init.gamma:g}, regularizer weight {init.regularizer_weight:g}"
    )
    return peft_model, report


def _target_weights(model, targets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Float32 copies of the weights peft will adapt (check_targets' matching rule), by module name."""
    import torch

    return {
        name: module.weight.detach().float().clone()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    }


def _record_removed(name: str, module, originals: dict[str, torch.Tensor]) -> list[float]:
    """Keep what peft took out of W as factors B0 = U·S/s, A0 = Vᵀ (non-persistent buffers: never in the adapter)."""
    import torch

    original = originals.get(short_name(name))
    if original is None:
        raise InitError(f"KaSA: layer {short_name(name)} was adapted by peft but not matched by adapter.target_modules")
    with torch.no_grad():
        removed = original - module.base_layer.weight.detach().float()
        r, scaling = module.r["default"], module.scaling["default"]
        u, s, vh = _rank_r_factors(removed, r)
        leftover = ((removed - (u * s) @ vh).norm() / original.norm().clamp_min(1e-30)).item()
    if leftover > FACTOR_TOL:
        raise InitError(
            f"KaSA: peft removed more than rank {r} from layer {short_name(name)} (a rank-{r} fit misses "
            f"{leftover:.2e} of W); the adapter could not be converted to plain LoRA."
        )
    module.register_buffer("kasa_removed_b", (u * (s / scaling)).contiguous(), persistent=False)
    module.register_buffer("kasa_removed_a", vh.contiguous(), persistent=False)
    return [round(v, 8) for v in s.tolist()]


def _rank_r_factors(matrix: torch.Tensor, r: int):
    """Top-r SVD of a rank-r matrix: randomized with oversampling is exact there and costs O(out·in·r), not an SVD.

    Seeded on a forked RNG, so the init is reproducible and the caller's random stream is untouched.
    """
    import torch

    q = min(r + 8, *matrix.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=2)
    return u[:, :r], s[:r], v[:, :r].T


def verify_kasa(peft_model, settings) -> dict[str, float]:
    """Every layer is peft's KaSA (no fallback), starts at ΔW = 0, and lost exactly its r minor components."""
    worst: dict[str, float] = {}
    for name, module in lora_layers(peft_model):
        _require_kasa(name, module)
        if not hasattr(module, "kasa_removed_b"):
            raise InitError(f"KaSA: layer {short_name(name)} has no record of the part removed from its base weight")
        checks = _layer_checks(module)
        if checks["max_initial_delta"] > 0 or checks["max_removed_leak"] > LEAK_TOL or checks["max_removed_energy_share"] > 1 + ENERGY_TOL:
            raise InitError(
                f"KaSA did not truncate layer {short_name(name)} to its principal components: "
                + ", ".join(f"{k} {v:.2e}" for k, v in checks.items())
            )
        worst = {k: max(v, worst.get(k, 0.0)) for k, v in checks.items()}
    return worst


def _layer_checks(module) -> dict[str, float]:
    """Products with the r factors only, no SVD (peft's, which the tests check against their own, is the expensive part).

    The removed part lies outside the truncated base on both sides, so the two split W and the base keeps rank k − r;
    its components carry at most the mean σ² of W's (the r largest always carry more, unless the spectrum is flat).
    """
    import torch

    b, _, _ = delta_factors(module)
    with torch.no_grad():
        truncated = module.base_layer.weight.detach().float()
        removed_b, removed_a = module.kasa_removed_b, module.kasa_removed_a  # B0 = U·S/s, A0 = Vᵀ
        left = removed_b / removed_b.norm(dim=0).clamp_min(1e-30)
        leak = max((left.T @ truncated).norm(), (truncated @ removed_a.T).norm()) / truncated.norm()
        removed_energy = (module.scaling["default"] * removed_b).norm() ** 2  # ‖s·B0·A0‖_F², A0's rows orthonormal
        share = (removed_energy / module.r["default"]) / ((truncated.norm() ** 2 + removed_energy) / min(truncated.shape))
    return {"max_initial_delta": b.abs().max().item(), "max_removed_leak": leak.item(), "max_removed_energy_share": share.item()}


def _require_kasa(name: str, module) -> None:
    if "default" not in getattr(module, "lora_diag", {}):
        raise InitError(
            f"layer {short_name(name)} is plain LoRA, not KaSA: peft's 4-bit and 8-bit layers ignore KaSA. "
            "Train KaSA on an unquantized base (model.quantization: null), or use init pissa or sorsa."
        )


def require_kasa_layers(peft_model) -> None:
    """Training form: KaSA must still be there after loading (on a quantized base peft silently makes it plain LoRA)."""
    for name, module in lora_layers(peft_model):
        _require_kasa(name, module)


def kasa_loss(peft_model, init_config) -> torch.Tensor:
    """peft's KaSA regularizer; its β and γ are the adapter's kasa_config, i.e. init_config's."""
    import torch

    loss = peft_model.base_model._get_kasa_loss()
    if not torch.is_tensor(loss):  # peft's 0.0: no KaSA layer in the model
        raise InitError("the KaSA regularizer found no KaSA layer in the model (plain LoRA?); it will not train without it.")
    return loss


def export_removed(peft_model, folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, module in lora_layers(peft_model):
        _require_kasa(name, module)
        tensors[f"{name}.lora_B.weight"] = module.kasa_removed_b.detach().cpu().contiguous()
        tensors[f"{name}.lora_A.weight"] = module.kasa_removed_a.detach().cpu().contiguous()
    save_file(tensors, Path(folder) / REMOVED_FILE, metadata={"format": "pt"})


def kasa_as_plain_lora(folder: Path, init_folder: Path) -> None:
    """The saved KaSA adapter as plain LoRA on the untouched base: diag folded into B, the removed part appended."""
    from safetensors.torch import load_file, save_file

    from adapterflow.adapters.products import WEIGHTS, convert_to_plain_lora

    tensors = load_file(folder / WEIGHTS)
    diagonals = [key for key in tensors if key.endswith(".lora_diag")]
    if not diagonals:
        raise InitError(f"{folder} holds no KaSA singular values (lora_diag): it was not trained as KaSA")
    for key in diagonals:
        diag, b_key = tensors.pop(key), key.removesuffix("lora_diag") + "lora_B.weight"
        tensors[b_key] = (tensors[b_key].float() * diag.float()).to(tensors[b_key].dtype).contiguous()
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "kasa_config": None}, indent=2))
    convert_to_plain_lora(folder, init_folder, removed=load_file(init_folder / REMOVED_FILE))


# mutates_base: the base loses its minor components at init (peft redoes that on load), so the registered adapter is
# the converted rank-2r delta; DoRA, which peft does not combine with KaSA, is refused for it as for PiSSA.
register(
    Initializer(
        name="kasa",
        family="svd",
        config=KasaInit,
        apply=apply_kasa,
        verify=verify_kasa,
        mutates_base=True,
        needs_data=False,
        needs_grad=False,
        supports_quantized=False,
        preserves_outputs=False,
        spectrum_label="removed minor singular value of W",
        regularizer=Regularizer(kasa_loss, lambda init, learning_rate: init.regularizer_weight),
        training_form=require_kasa_layers,
        extra_products=export_removed,
        plain_lora=kasa_as_plain_lora,
    )
)
