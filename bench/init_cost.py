"""Init cost, side by side in one run: our initializers vs peft's own API for the same method.

Models: the bundled MiniLM and a config-built Llama (~110 M parameters) whose target weights have
slowly decaying spectra (sigma_i = exp(-i/40)), where randomized SVD is hard. For PiSSA it also
prints the principal-subspace error of B·A against the exact top-r SVD. EVA on the demo
config (configs/demo_eva.yaml) with the flow's own calibration batches on both sides: our covariance
EVA vs peft's incremental EVA, time ratio, principal-angle cosines, ranks, share of the demo's training, and
both against the exact PCA of the whole train split (captured variance; ours on its first k batches too).
Then a cached retrain: the flow's init stage on the same key twice. The spectral report on a
demo-shaped adapter: exact SVDs vs randomized top-k.
Targets: randomized PiSSA >= 10x more accurate than peft's pissa_niter_4 at <= 1.5x its time;
EVA ours/peft <= 0.2 with cosines >= 0.99 and <= 5% of training; cached init <= 5% of uncached;
spectral report <= 5% of training. NLoRA (Nyström sketch, no SVD) on the demo config against PiSSA's
randomized and full SVD: init time and how much of the top-r part it captures.
Usage: python bench/init_cost.py [--rank 16] [--only minilm|llama|eva|lora_ga|cache|spectral|nlora] [--threads N] [--train-seconds 84]
"""

from __future__ import annotations

import argparse
import copy
import itertools
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


def demo_eva_inputs():
    """The bundled MiniLM and a factory of the flow's own EVA calibration batches for configs/demo_eva.yaml."""
    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.init_adapter import calibration_batches, lora_settings
    from adapterflow.tasks.model_io import load_model, load_tokenizer, resolve_base

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo_eva.yaml")
    ref = resolve_base(config.model)
    tokenizer = load_tokenizer(ref)
    torch.manual_seed(0)
    model = load_model(ref, config.task, config.data.labels, config.model.dtype)
    # A fresh seeded loader per run: both sides see the same batches in the same order.
    return model, lora_settings(config), lambda: calibration_batches(config, tokenizer)


def peft_eva(model, settings, batches):
    """peft's incremental EVA, counting its forward passes (it cycles the batches until converged)."""
    from peft import EvaConfig, get_peft_model
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    passes = []

    def forward(model, inputs):
        passes.append(1)
        return model(**inputs)

    eva = EvaConfig(rho=settings.init.rho, tau=settings.init.tau, whiten=settings.init.whiten)
    peft_model = get_peft_model(model, settings.lora_config("eva", eva_config=eva))
    initialize_lora_eva_weights(peft_model, dataloader=batches, forward_fn=forward, show_progress_bar=False)
    return peft_model, len(passes) - 1  # peft's first pass only hashes the inputs


def principal_cosines(ours, theirs, k: int | None = None) -> dict[str, torch.Tensor]:
    """Per layer both kept: cosines of the principal angles between the spans of the two models' top-k A
    rows (k None or beyond a rank: the common rank)."""
    theirs_a = {name: module.lora_A["default"].weight.detach().double() for name, module in lora_layers(theirs)}
    cosines = {}
    for name, module in lora_layers(ours):
        if name in theirs_a:
            a, b = module.lora_A["default"].weight.detach().double(), theirs_a[name]
            common = min(a.shape[0], b.shape[0], k or a.shape[0])
            cosines[name] = torch.linalg.svdvals(torch.linalg.qr(a[:common].T)[0].T @ torch.linalg.qr(b[:common].T)[0])
    return cosines


def leading(ours, theirs, k: int) -> float:
    """The smallest principal cosine between the top-k spans, over layers."""
    return min(c.min().item() for c in principal_cosines(ours, theirs, k).values())


def bench_eva(_, train_seconds=84.0):
    """Our covariance EVA vs peft's incremental EVA on the demo config's own calibration batches."""
    # Said once per EVA model built here, a dozen times: peft's memory hint and a transformers deprecation.
    warnings.filterwarnings("ignore", message=".*low_cpu_mem_usage=False.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    from adapterflow.adapters.methods.basic import ranks_of

    base, settings, batches = demo_eva_inputs()
    probe = {"input_ids": torch.randint(5, 1000, (2, 16))}
    print(f"\n== EVA on the demo (configs/demo_eva.yaml: MiniLM, r={settings.r}, targets {list(settings.target_modules)}, "
          f"rho={settings.init.rho}, tau={settings.init.tau}), {len(batches())} calibration batches of "
          f"{batches().batch_size}, {torch.get_num_threads()} threads ==")
    ours_runs, peft_runs, ours_passes = [], [], []
    for _ in range(EVA_REPEATS):  # interleaved, so drift in machine load hits both sides alike
        context = InitContext(probe=probe, calibration=batches(), progress=lambda done, total: ours_passes.append(done))
        ours_runs.append(initialize(copy.deepcopy(base), settings, "eva", context))
        peft_runs.append(timed_on_copy(base, lambda m: peft_eva(m, settings, batches())))
    (ours, _), (theirs, peft_passes) = ours_runs[-1], peft_runs[-1][0]
    ours_s, peft_s = min(run[1].seconds for run in ours_runs), min(t for _, t in peft_runs)
    minima = torch.tensor([c.min().item() for c in principal_cosines(ours, theirs).values()])
    # peft against itself on the same batches in reverse order: how well its own answer is determined.
    reversed_peft = peft_eva(copy.deepcopy(base), settings, list(batches())[::-1])[0]
    differ = {short: (rank, ranks_of(theirs).get(short)) for short, rank in ranks_of(ours).items() if ranks_of(theirs).get(short) != rank}
    print(f"{'':<20}{'ours s':>9}{'peft s':>9}{'ratio':>8}  (best of {EVA_REPEATS}; target ratio <= 0.20)")
    print(f"{'eva':<20}{ours_s:>9.2f}{peft_s:>9.2f}{ours_s / peft_s:>8.2f}  forward passes: ours {ours_passes[-1]}, peft {peft_passes}")
    print(f"principal-angle cosines ours vs peft, each layer's span of the common rank: min {minima.min().item():.4f}, "
          f"median of the layers' minima {minima.median().item():.4f} (target >= 0.99)")
    print("min over layers of the top-k span's smallest cosine, k = 1..8: ours vs peft "
          + " ".join(f"{leading(ours, theirs, k):.3f}" for k in range(1, 9))
          + "; peft reversed vs peft " + " ".join(f"{leading(reversed_peft, theirs, k):.3f}" for k in range(1, 9)))
    print("ranks: " + ("identical" if not differ else f"{len(differ)} layers differ (ours, peft): {differ}"))
    exact_pca_agreement(base, settings, batches, ours, theirs, reversed_peft)
    print(f"share of the demo's training ({train_seconds:.0f} s): ours {100 * ours_s / train_seconds:.1f}%, "
          f"peft {100 * peft_s / train_seconds:.1f}% (target <= 5%)")


EVA_REPEATS = 2


def exact_pca_agreement(base, settings, batches, ours, theirs, reversed_peft):
    """Each answer against the exact PCA of the whole train split's inputs, the components EVA estimates. peft's
    incremental answer depends on batch order (reversed above), so agreement with peft is bounded by its own error.

    Two measures per layer: the principal cosines to the exact top components, and the variance the layer's A rows
    capture as a share of the most any span of that rank captures (1.0: the exact top components). Then ours on the
    first k batches only: how few forward passes reach peft's share."""
    scatters, exact_seconds = exact_scatters(base, settings, batches)
    components = {name: torch.linalg.eigh(scatter)[1].flip(1).T for name, scatter in scatters.items()}  # rows, largest first
    print(f"\nagainst the exact PCA of all {len(batches())} calibration batches ({exact_seconds:.1f} s to collect):")
    print(f"{'':<16}{'batches':>8}{'seconds':>9}{'captured variance min / median':>32}   smallest cosine, top-k span k=1..8")
    rows = [("ours", ours, None), ("peft", theirs, None), ("peft reversed", reversed_peft, None)]
    rows += [(f"ours, first {k}", None, k) for k in EVA_PREFIXES]
    for label, model, prefix in rows:
        seconds, used = "", ""
        if prefix is not None:
            first = list(itertools.islice(batches(), prefix))
            model, report = initialize(copy.deepcopy(base), settings, "eva", InitContext(probe=PROBE, calibration=first))
            seconds, used = f"{report.seconds:.2f}", str(prefix)
        shares = captured_variance(model, scatters)
        print(f"  {label:<14}{used:>8}{seconds:>9}{shares.min().item():>20.4f} / {shares.median().item():.4f}   "
              + " ".join(f"{leading_to_exact(model, components, k):.3f}" for k in range(1, 9)))


def leading_to_exact(model, components: dict[str, torch.Tensor], k: int) -> float:
    """The smallest principal cosine over layers between each layer's top-k A rows and the exact top-k components."""
    cosines = []
    for name, module in lora_layers(model):
        a = module.lora_A["default"].weight.detach().double()
        common = min(a.shape[0], k)
        if name in components and common:
            basis = torch.linalg.qr(a[:common].T)[0]
            cosines.append(torch.linalg.svdvals(basis.T @ components[name][:common].T).min().item())
    return min(cosines)


EVA_PREFIXES = (1, 2, 3, 4, 6)
PROBE = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])}


def exact_scatters(base, settings, batches) -> tuple[dict[str, torch.Tensor], float]:
    """Each target layer's centered input scatter over every calibration batch, by peft's full layer name."""
    from peft import get_peft_model

    from adapterflow.adapters.covariance import collect_covariances

    peft_model = get_peft_model(copy.deepcopy(base), settings.lora_config(True)).eval()
    start = time.perf_counter()
    with peft_model.disable_adapter():
        covariances = collect_covariances(peft_model, dict(lora_layers(peft_model)), batches())
    return {name: covariances.moments[first].scatter() for name, first in covariances.owner.items()}, time.perf_counter() - start


def captured_variance(model, scatters: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per layer with a rank: tr(QᵀSQ) over the sum of S's top-rank eigenvalues, Q an orthonormal basis of the A rows."""
    shares = []
    for name, module in lora_layers(model):
        a = module.lora_A["default"].weight.detach().double()
        if name in scatters and a.shape[0]:
            basis, scatter = torch.linalg.qr(a.T)[0], scatters[name]
            best = torch.linalg.eigvalsh(scatter).flip(0)[: a.shape[0]].sum()
            shares.append(float(torch.trace(basis.T @ scatter @ basis) / best))
    return torch.tensor(shares)


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


def demo_trained_adapter(folder: Path) -> None:
    """MiniLM with the demo's LoRA (r=8, query/value), its factors drawn at a trained adapter's scale, saved."""
    from peft import get_peft_model

    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.init_adapter import lora_settings
    from adapterflow.tasks.model_io import load_model, resolve_base

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    model = get_peft_model(load_model(resolve_base(config.model), config.task, config.data.labels), lora_settings(config).lora_config(True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, module in lora_layers(model):
            for factor, scale in ((module.lora_A["default"], 0.05), (module.lora_B["default"], 0.5)):
                factor.weight.copy_(scale * torch.randn(factor.weight.shape, generator=generator))
    model.save_pretrained(str(folder))


def bench_spectral(_, train_seconds=84.0):
    """The run's spectral report before (exact SVDs, the process's threads) and after (randomized top-k, one thread)."""
    from adapterflow.adapters.spectral import intruder_report
    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.spectral_report import fast_intruder_report, write_spectral_report

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    spec = config.evaluate.intruders
    with tempfile.TemporaryDirectory() as tmp:
        demo_trained_adapter(Path(tmp) / "adapter")
        from peft import PeftModel

        from adapterflow.tasks.model_io import load_model, resolve_base

        ref = resolve_base(config.model)
        model = PeftModel.from_pretrained(load_model(ref, config.task, config.data.labels), str(Path(tmp) / "adapter"))
        threads = torch.get_num_threads()
        print(f"\n== spectral report on a demo-shaped adapter (MiniLM r=8 query/value, k={spec.top_k}), {threads} threads ==")
        for _ in range(2):  # interleaved
            start = time.perf_counter()
            exact = intruder_report(model, spec.top_k, spec.threshold)
            middle = time.perf_counter()
            fast = fast_intruder_report(model, spec.top_k, spec.threshold)
            end = time.perf_counter()
            print(f"SVDs: before {middle - start:.2f} s, after {end - middle:.2f} s, ratio {(end - middle) / (middle - start):.2f}; "
                  f"intruders {sum(r.intruders for r in exact)} vs {sum(r.intruders for r in fast)}, "
                  + ("same per layer" if [r.intruders for r in exact] == [r.intruders for r in fast] else "DIFFERENT per layer"))
        start = time.perf_counter()
        write_spectral_report(config, ref, Path(tmp) / "adapter", Path(tmp) / "spectral")
        whole = time.perf_counter() - start
    print(f"whole report now (load base + adapter, SVDs, table, plot): {whole:.2f} s = {100 * whole / train_seconds:.1f}% "
          f"of the demo's training ({train_seconds:.0f} s; target <= 5%)")


def nlora_quality(peft_model, originals) -> tuple[float, float]:
    """Worst layer's (|s·B·A − W_r| / |W_r|, |W − s·B·A| / |W − W_r|): the captured part against the exact top-r,
    and the residual against the smallest any rank-r adapter leaves (1.0 is optimal)."""
    worst_top, worst_residual = 0.0, 0.0
    for name, module in lora_layers(peft_model):
        b, a, s = delta_factors(module)
        u, sig, vh = originals[name]
        r = b.shape[1]
        top = (u[:, :r] * sig[:r]) @ vh[:r]
        weight = (u * sig) @ vh
        worst_top = max(worst_top, ((s * b @ a - top).norm() / top.norm()).item())
        worst_residual = max(worst_residual, ((weight - s * b @ a).norm() / (weight - top).norm()).item())
    return worst_top, worst_residual


def bench_nlora(_):
    """NLoRA's Nyström init against PiSSA's randomized and full SVD on the demo config's model, rank and targets."""
    from adapterflow.tasks.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    adapter = config.adapter
    base, _, task_type = minilm()
    settings = LoraSettings(
        r=adapter.r, alpha=adapter.alpha, dropout=0.0, target_modules=tuple(adapter.target_modules), task_type=task_type
    )
    originals = {
        f"base_model.model.{n}": torch.linalg.svd(m.weight.float(), full_matrices=False)
        for n, m in base.named_modules()
        if n.endswith(tuple(adapter.target_modules))
    }
    probe = {"input_ids": torch.randint(5, 1000, (2, 16))}
    print(
        f"\n== NLoRA vs PiSSA on the demo's MiniLM, r={adapter.r}, targets {adapter.target_modules} "
        f"({len(originals)} layers), {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f} =="
    )
    print(f"{'method':<34}{'init s':>9}{'checks s':>10}{'|sBA-W_r|/|W_r|':>17}{'|W-sBA|/|W-W_r|':>17}")
    rows = [
        ("nlora, no oversampling", "nlora", {"oversampling": 0}),
        ("nlora (default: p=24)", "nlora", {}),
        ("nlora p=24, niter=1", "nlora", {"niter": 1}),
        ("nlora IntTune (same init)", "nlora", {"trainable": "intermediate"}),
        ("pissa randomized (niter=2, p=24)", "pissa", {"niter": 2, "oversampling": 24}),
        ("pissa full SVD", "pissa", {}),
    ]
    for _ in range(2):  # two interleaved rounds: contention on a shared machine shows as a gap between them
        for name, method, knobs in rows:
            configured = replace(settings, init=get_initializer(method).config(method=method, **knobs))
            runs = [initialize(copy.deepcopy(base), configured, method, InitContext(probe=probe)) for _ in range(REPEATS)]
            seconds, checks = min(run[1].seconds for run in runs), min(run[1].check_seconds for run in runs)
            top, residual = nlora_quality(runs[-1][0], originals)
            print(f"{name:<34}{seconds:>9.4f}{checks:>10.3f}{top:>17.3f}{residual:>17.3f}")
    weights = [m.weight.detach().float() for n, m in base.named_modules() if n.endswith(tuple(adapter.target_modules))]
    print(f"the decompositions alone, all {len(weights)} weights (init s above includes wrapping the model in peft):")
    for _ in range(2):
        print("   " + ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in decomposition_seconds(weights, adapter.r)))


def decomposition_seconds(weights, r) -> list[tuple[str, float]]:
    """Best of five, interleaved: NLoRA's sketch and core, randomized SVD (q = r + 24, 2 iterations), full SVD."""
    from adapterflow.adapters.methods.nlora import NloraInit, nystrom
    from adapterflow.adapters.weight_svd import SvdPlan, decompose

    sides = {
        "nystrom": lambda w, i: nystrom(w, r, NloraInit(method="nlora"), str(i)),
        "nystrom niter=1": lambda w, i: nystrom(w, r, NloraInit(method="nlora", niter=1), str(i)),
        "randomized svd": lambda w, i: decompose(w, r, SvdPlan("principal", 2, 24)),
        "full svd": lambda w, i: decompose(w, r, SvdPlan("principal", None)),
    }
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(5):
        for name, fn in sides.items():
            start = time.perf_counter()
            for index, weight in enumerate(weights):
                fn(weight, index)
            best[name] = min(best[name], time.perf_counter() - start)
    return list(best.items())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--only", choices=SECTIONS, help="run one section alone")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (fewer on a shared machine)")
    parser.add_argument("--train-seconds", type=float, default=84.0, help="the demo's training seconds, for EVA's share")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in [args.only] if args.only else SECTIONS:
        SECTIONS[name](args.rank, args.train_seconds) if name in ("eva", "spectral") else SECTIONS[name](args.rank)


SECTIONS = {
    "minilm": lambda r: bench_model("MiniLM (bundled)", minilm, r),
    "llama": lambda r: bench_model("Llama from config, slow spectra", slow_spectrum_llama, r),
    "eva": bench_eva,
    "lora_ga": bench_lora_ga,
    "cache": bench_cache,
    "spectral": bench_spectral,
    "nlora": bench_nlora,
}


if __name__ == "__main__":
    main()
