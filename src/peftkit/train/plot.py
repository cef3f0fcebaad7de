"""Loss curves as a PNG, as LLaMA-Factory's `plot_loss` gives them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """Plot training loss (and eval loss, if any) against the step; returns the file written (none without a
    training loss)."""
    return plot_metric(log_history, "loss", path) if any("loss" in e for e in log_history) else None


def plot_metric(log_history: list[dict[str, Any]], key: str, path: Path) -> Path | None:
    """Plot one logged metric (training, and its eval_ twin if logged) against the step, as LLaMA-Factory plots
    `rewards/accuracies` for preference stages; nothing when the run did not log it."""
    import matplotlib

    matplotlib.use("Agg")  # no display here; write the file only
    import matplotlib.pyplot as plt

    train = [(e["step"], e[key]) for e in log_history if key in e]
    evals = [(e["step"], e[f"eval_{key}"]) for e in log_history if f"eval_{key}" in e]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label=f"train {key}")
    if evals:
        ax.plot(*zip(*evals), "o-", label=f"eval {key}")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
