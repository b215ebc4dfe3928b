"""Init cost, side by side in one run: our initializers vs peft's own API for the same method.

Models: the bundled MiniLM and a config-built Llama (~110 M parameters) whose target weights have
slowly decaying spectra (sigma_i = exp(-i/40)), where randomized SVD is hard. For PiSSA it also
prints the principal-subspace error of B·A against the exact top-r SVD. EVA on MiniLM with the
same calibration batches on both sides. Finally a cached retrain: the flow's init stage on the
same key twice.
Targets: randomized PiSSA >= 10x more accurate than peft's pissa_niter_4 at <= 1.5x its time;
EVA ours/peft <= 1.05; cached init <= 5% of uncached.
Usage: python bench/init_cost.py [--rank 16] [--only minilm|llama|eva|lora_ga|cache] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adapterflow.adapters import InitContext, LoraSettings, get_initializer, initialize  # noqa: E402
from adapterflow.adapters.layers import delta_factors, lora_layers  # noqa: E402


def minilm():
    from transformers import AutoModelForSequenceClassification

    from adapterflow.tasks.model_io import bundled_folder

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(bundled_folder("minilm")), num_labels=8)
    return model, ("query", "value"), "SEQ_CLS"


def slow_spectrum_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                         num_attention_heads=16, num_key_value_heads=16)
    model = LlamaForCausalLM(config)
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            n = module.weight.shape[0]
            u, _ = torch.linalg.qr(torch.randn(n, n))
            v, _ = torch.linalg.qr(torch.randn(n, n))
            module.weight.data = (u * torch.exp(-torch.arange(n) / 40.0)) @ v.T
    return model, ("q_proj", "v_proj"), "CAUSAL_LM"


REPEATS = 3  # each side's best of three (both timings include get_peft_model)


def timed_on_copy(base, fn):
    model = copy.deepcopy(base)  # outside the timing, as for ours
    start = time.perf_counter()
    out = fn(model)
    return out, time.perf_counter() - start


def principal_error(peft_model, originals, r) -> float:
    worst = 0.0
    for name, module in lora_layers(peft_model):
        b, a, s = delta_factors(module)
        u, sig, vh = originals[name]
        exact = (u[:, :r] * sig[:r]) @ vh[:r]
        worst = max(worst, ((s * b @ a - exact).norm() / exact.norm()).item())
    return worst


def bench_model(label, build, r):
    from peft import get_peft_model

    base, targets, task_type = build()
    settings = LoraSettings(r=r, alpha=2 * r, dropout=0.0, target_modules=targets, task_type=task_type)
    params = sum(p.numel() for p in base.parameters()) / 1e6
    probe = {"input_ids": torch.randint(5, 1000, (2, 16))}
    originals = {f"base_model.model.{n}": torch.linalg.svd(m.weight.float(), full_matrices=False)
                 for n, m in base.named_modules() if n.endswith(targets)}
    print(f"\n== {label} ({params:.1f} M params), r={r}, targets {list(targets)} ==")
    print(f"{'method':<28}{'ours s':>10}{'peft s':>10}{'ratio':>8}{'ours err':>11}{'peft err':>11}   (err: |sBA - top-r SVD| / |top-r|)")
    rows = [
        ("pissa (full SVD)", {}, "pissa", "pissa"),
        ("pissa niter=4 p=8", {"niter": 4, "oversampling": 8}, "pissa", "pissa_niter_4"),
        ("pissa niter=2 p=24", {"niter": 2, "oversampling": 24}, "pissa", "pissa_niter_4"),
        ("pissa niter=1 p=48", {"niter": 1, "oversampling": 48}, "pissa", "pissa_niter_4"),
        ("olora", {}, "olora", "olora"),
        ("milora (no peft method)", {}, "milora", None),
    ]
    for name, knobs, method, peft_value in rows:
        # Both sides timed on the method alone; our invariant checks are reported apart.
        configured = replace(settings, init=get_initializer(method).config(method=method, **knobs))
        runs = [initialize(copy.deepcopy(base), configured, method, InitContext(probe=probe)) for _ in range(REPEATS)]
        ours, ours_s = runs[-1], min(run[1].seconds for run in runs)
        err = principal_error(ours[0], originals, r) if method == "pissa" else float("nan")
        if peft_value is None:
            print(f"{name:<28}{ours_s:>10.2f}{'n/a':>10}{'':>8}{err:>11.2e}{'':>11}   checks {ours[1].check_seconds:.2f} s")
            continue
        timings = [timed_on_copy(base, lambda m, value=peft_value: get_peft_model(m, settings.lora_config(value))) for _ in range(REPEATS)]
        theirs, peft_s = timings[-1][0], min(t for _, t in timings)
        peft_err = principal_error(theirs, originals, r) if method == "pissa" else float("nan")
        print(f"{name:<28}{ours_s:>10.2f}{peft_s:>10.2f}{ours_s / peft_s:>8.2f}{err:>11.2e}{peft_err:>11.2e}"
              + (f"   accuracy gain {peft_err / max(err, 1e-12):.1f}x" if method == "pissa" and "niter" in knobs else "")
              + f"   checks {ours[1].check_seconds:.2f} s")


EVA_BATCHES = 16  # peft cycles through them until its PCA converges


def eva_batches(count=EVA_BATCHES, size=32, tokens=64):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1000, 30000, (size, tokens), generator=generator)} for _ in range(count)]


def peft_eva(model, settings, batches):
    from peft import EvaConfig, get_peft_model
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    peft_model = get_peft_model(model, settings.lora_config("eva", eva_config=EvaConfig(rho=settings.init.rho, tau=settings.init.tau)))
    initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=False)
    return peft_model


def bench_eva(r):
    from adapterflow.adapters.methods.basic import ranks_of

    base, targets, task_type = minilm()
    settings = LoraSettings(r=r, alpha=2 * r, dropout=0.0, target_modules=targets, task_type=task_type,
                            init=get_initializer("eva").config(method="eva", rho=2.0, tau=0.99))
    batches, probe = eva_batches(), {"input_ids": torch.randint(5, 1000, (2, 16))}
    print(f"\n== EVA on MiniLM, r={r}, targets {list(targets)}, {len(batches)} calibration batches "
          f"{tuple(batches[0]['input_ids'].shape)} (seeded random tokens), {torch.get_num_threads()} threads ==")
    print(f"{'method':<28}{'ours s':>10}{'peft s':>10}{'ratio':>8}   (ours: method time; its checks apart)")
    ours_runs, peft_runs = [], []
    for _ in range(REPEATS):  # interleaved, so drift in machine load hits both sides alike
        ours_runs.append(initialize(copy.deepcopy(base), settings, "eva", InitContext(probe=probe, calibration=batches)))
        peft_runs.append(timed_on_copy(base, lambda m: peft_eva(m, settings, batches)))
    (ours, report), theirs = ours_runs[-1], peft_runs[-1][0]
    ours_s, peft_s = min(run[1].seconds for run in ours_runs), min(t for _, t in peft_runs)
    same = "same ranks" if ranks_of(ours) == ranks_of(theirs) else "RANKS DIFFER"
    kept = [sum(v) for v in report.spectra.values()] or [float("nan")]
    print(f"{'eva rho=2 tau=0.99':<28}{ours_s:>10.2f}{peft_s:>10.2f}{ours_s / peft_s:>8.2f}   checks {report.check_seconds:.2f} s"
          f"   {same}   kept explained variance {min(kept):.3f} to {max(kept):.3f}")


def labelled_batches(count=4, size=32, tokens=64):
    generator = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(5, 30000, (size, tokens), generator=generator),
             "labels": torch.randint(0, 8, (size,), generator=generator)} for _ in range(count)]


def peft_lora_ga(model, settings, batches, wrap=True):
    """peft's own API: its gradient estimator, then get_peft_model with init_lora_weights='lora_ga'."""
    from peft import LoraGAConfig, get_peft_model
    from peft.tuners.lora.loraga import preprocess_loraga

    config = settings.lora_config("lora_ga", lora_ga_config=LoraGAConfig())

    def train_step():
        for batch in batches:
            model(**batch).loss.backward()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        preprocess_loraga(model, config, train_step)
    return get_peft_model(model, config) if wrap else model


def factor_residual(peft_model, gradients) -> float:
    """Largest singular-vector residual of B's columns and A's rows against the gradients G."""
    from adapterflow.adapters.methods.gradient import singular_vector_residual

    worst = 0.0
    for name, module in lora_layers(peft_model):
        grad = gradients[name.removeprefix("base_model.model.")]
        b, a, _ = delta_factors(module)
        worst = max(worst, singular_vector_residual(grad.T, b.T), singular_vector_residual(grad, a))
    return worst


def bench_lora_ga(r):
    base, targets, task_type = minilm()
    base.eval()  # no dropout: both sides then see the same gradient
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    settings = LoraSettings(r=r, alpha=2 * r, dropout=0.0, target_modules=targets, task_type=task_type,
                            init=get_initializer("lora_ga").config(method="lora_ga", batches=4))
    batches, probe = labelled_batches(), {"input_ids": torch.randint(5, 1000, (2, 16))}
    print(f"\n== LoRA-GA on MiniLM, r={r}, targets {list(targets)}, {len(batches)} labelled batches "
          f"{tuple(batches[0]['input_ids'].shape)}, {torch.get_num_threads()} threads ==")
    print(f"{'method':<28}{'ours s':>10}{'peft s':>10}{'ratio':>8}   singular-vector residual ours vs peft (0 = exact)")
    ours_runs, peft_runs = [], []
    for _ in range(REPEATS):  # interleaved, so drift in machine load hits both sides alike
        model = copy.deepcopy(base)
        ours_runs.append(initialize(model, settings, "lora_ga", InitContext(probe=probe, calibration=batches)))
        peft_runs.append(timed_on_copy(base, lambda m: peft_lora_ga(m, settings, batches)))
    estimated = peft_lora_ga(copy.deepcopy(base), settings, batches, wrap=False)  # G once more, to score both sides
    gradients = {name: module._peft_loraga_grad for name, module in estimated.named_modules() if hasattr(module, "_peft_loraga_grad")}
    ours_s, peft_s = min(run[1].seconds for run in ours_runs), min(t for _, t in peft_runs)
    print(f"{'lora_ga ArB2r stable':<28}{ours_s:>10.2f}{peft_s:>10.2f}{ours_s / peft_s:>8.2f}   "
          f"{ours_runs[-1][1].checks['max_singular_vector_residual']:.1e} vs {factor_residual(peft_runs[-1][0], gradients):.1e}"
          f"   (ours' checks {ours_runs[-1][1].check_seconds:.2f} s apart)")


def bench_cache(r):
    import yaml

    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.model_io import resolve_base

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "configs" / "demo.yaml").read_text())
    raw["adapter"].update(r=r, init={"method": "pissa"})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.yaml"
        for split in ("train", "validation", "test"):
            raw["data"][split] = str(root / "configs" / raw["data"][split])
        path.write_text(yaml.safe_dump(raw))
        config = load_config(path)
        ref = resolve_base(config.model)
        miss = initialize_adapter(config, ref, Path(tmp) / "run1", Path(tmp) / "cache")
        hit = initialize_adapter(config, ref, Path(tmp) / "run2", Path(tmp) / "cache")
    print(f"\n== cached retrain (flow init stage, MiniLM, pissa r={r}) ==")
    print(f"uncached {miss.seconds:.2f} s ({miss.cache}), cached {hit.seconds:.3f} s ({hit.cache}): "
          f"{100 * hit.seconds / miss.seconds:.1f}% (target <= 5%)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--only", choices=SECTIONS, help="run one section alone")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (fewer on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in [args.only] if args.only else SECTIONS:
        SECTIONS[name](args.rank)


SECTIONS = {
    "minilm": lambda r: bench_model("MiniLM (bundled)", minilm, r),
    "llama": lambda r: bench_model("Llama from config, slow spectra", slow_spectrum_llama, r),
    "eva": bench_eva,
    "lora_ga": bench_lora_ga,
    "cache": bench_cache,
}


if __name__ == "__main__":
    main()
