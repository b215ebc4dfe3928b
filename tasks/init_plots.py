"""The init report's spectrum plot: singular values each layer's adapter starts with."""

from __future__ import annotations

from pathlib import Path


def plot_spectra(spectra: dict[str, list[float]], method: str, path: Path) -> Path | None:
    """One line per layer (log scale); None when the method has no spectrum (random inits)."""
    if not spectra or not any(spectra.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for layer, values in spectra.items():
        if values:
            axis.plot(range(1, len(values) + 1), values, alpha=0.6, linewidth=1, label=layer if len(spectra) <= 8 else None)
    axis.set(yscale="log", xlabel="component", ylabel="singular value of s·B·A", title=f"{method}: initial adapter spectrum per layer")
    if len(spectra) <= 8:
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
