"""Plots for the MLflow run page: loss curves from the Trainer log, the confusion matrix of the evaluation."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(train_log: Path, path: Path) -> Path | None:
    history = json.loads(train_log.read_text()) if train_log.is_file() else []
    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    if not train:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axis.plot(*zip(*evals), marker="o", label="validation loss")
    axis.set(xlabel="step", ylabel="loss", title="loss curves")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_confusion_matrix(labels: list[int], predictions: list[int], names: list[str], path: Path) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    side = max(4.5, 1.5 + 0.6 * len(names))
    figure, axis = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay.from_predictions(labels, predictions, labels=list(range(len(names))), display_labels=names,
                                            ax=axis, colorbar=False, xticks_rotation=45)
    axis.set_title("confusion matrix")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
