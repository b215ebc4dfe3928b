"""The intruder-dimension report of a saved adapter on its untouched base (see adapters/spectral.py).

Only the adapted weight's top-k left singular vectors enter the test, so they come from a randomized
SVD (torch.svd_lowrank) instead of a full one; the base still gets its exact thin SVD, since an
adapted direction is matched against every base direction. adapters/spectral.py keeps the exact
version of both, which tests/test_spectral.py checks this against.

The decompositions run on one thread: at d = 384 LAPACK gains little from a second one, and on a
busy 2-core machine its threads wait on each other (the demo adapter's report: 24 s on 2 threads
against 1.3 s on 1 while another process trained).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# q = k + 20 columns and 6 power iterations: on MiniLM's trained query/value weights (slowly decaying
# spectra) the top-10 vectors match the full SVD's to |cos| > 0.9999, so every best-match similarity
# agrees to ~1e-4, far inside any threshold margin; at d = 384 it costs ~4 ms against ~28 ms.
OVERSAMPLING = 20
POWER_ITERATIONS = 6
SEED = 0  # a fixed sketch: the same adapter always gets the same report


def intruder_rows(config, base_ref, adapter_dir: Path):
    from peft import PeftModel

    from adapterflow.tasks.model_io import load_model

    model = load_model(base_ref, config.task, config.data.labels, config.model.dtype, config.model.quantization)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    spec = config.evaluate.intruders
    return fast_intruder_report(model, spec.top_k, spec.threshold)


def fast_intruder_report(peft_model, top_k: int, threshold: float):
    """adapters.spectral.intruder_report with the adapted weights' top-k from a randomized SVD."""
    from adapterflow.adapters.layers import lora_layers, short_name
    from adapterflow.adapters.spectral import _base_weight, _check_threshold, _delta, _left_singular, _row, _Similarities

    _check_threshold(threshold)
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    rows = []
    with one_thread():
        for name, module in lora_layers(peft_model):
            base = _base_weight(module)
            base_u, _ = _left_singular(base)
            adapted_u, adapted_s = top_left_singular(base + _delta(module, name), top_k)
            rows.append(_row(short_name(name), _Similarities((base_u.T @ adapted_u).abs().amax(dim=0), adapted_s), threshold))
    return rows


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def top_left_singular(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top min(k, rank bound) left singular vectors and values of a float32 matrix."""
    k = min(k, *matrix.shape)
    if k + OVERSAMPLING >= min(matrix.shape):  # the sketch would be as large as the matrix
        u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], s[:k]
    with torch.random.fork_rng(devices=[]):  # the sketch's draw leaves the caller's random stream alone
        torch.manual_seed(SEED)
        u, s, _ = torch.svd_lowrank(matrix, q=k + OVERSAMPLING, niter=POWER_ITERATIONS)
    return u[:, :k], s[:k]


def write_spectral_report(config, base_ref, adapter_dir: Path, out_dir: Path) -> dict:
    """Markdown table, bar plot and summary numbers; the numbers become run metrics and a version tag."""
    from adapterflow.adapters.spectral import intruder_markdown, plot_intruders, summarize

    rows = intruder_rows(config, base_ref, adapter_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "intruder_dimensions.md"
    table.write_text(intruder_markdown(rows))
    plot = plot_intruders(rows, out_dir / "intruder_dimensions.png")
    return {"summary": summarize(rows), "files": [str(table), str(plot)]}


def intruders_total(config, base_ref, adapter_dir: Path) -> int:
    return sum(row.intruders for row in intruder_rows(config, base_ref, adapter_dir))
