"""The intruder-dimension report of a saved adapter on its untouched base (see adapters/spectral.py)."""

from __future__ import annotations

from pathlib import Path


def intruder_rows(config, base_ref, adapter_dir: Path):
    from peft import PeftModel

    from adapterflow.adapters.spectral import intruder_report
    from adapterflow.tasks.model_io import load_model

    model = load_model(base_ref, config.task, config.data.labels, config.model.dtype, config.model.quantization)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    spec = config.evaluate.intruders
    return intruder_report(model, spec.top_k, spec.threshold)


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
