"""The init report's spectrum plot: per layer, the spectrum each method's adapter was built from."""

from __future__ import annotations

from pathlib import Path


def plot_spectra(spectra: dict[str, list[float]], method: str, path: Path) -> Path | None:
    """One line per layer (log scale); None when the method has no spectrum (random inits)."""
    if not spectra or not any(spectra.values()):
        return None
    import matplotlib

    from adapterflow.adapters import get_initializer

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for layer, values in spectra.items():
        if values:
            axis.plot(range(1, len(values) + 1), values, alpha=0.6, linewidth=1, label=layer if len(spectra) <= 8 else None)
    axis.set(yscale="log", xlabel="component", ylabel=get_initializer(method).spectrum_label, title=f"{method}: spectrum per layer at init")
    if len(spectra) <= 8:
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
