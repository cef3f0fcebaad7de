"""Loss curves as a PNG, as LLaMA-Factory's `plot_loss` gives them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def plot_loss(log_history: list[dict[str, Any]], path: Path, eval_sets: Sequence[str] = ()) -> Path | None:
    """Plot training loss (and eval loss, if any, with each named eval set's) against the step; returns the file
    written (none without a training loss)."""
    return plot_metric(log_history, "loss", path, eval_sets) if any("loss" in e for e in log_history) else None


def plot_metric(log_history: list[dict[str, Any]], key: str, path: Path, eval_sets: Sequence[str] = ()
                ) -> Path | None:
    """Plot one logged metric (training, its eval_ twin, and each named eval set's eval_<set>_ one, if logged)
    against the step, as LLaMA-Factory plots `rewards/accuracies` for preference stages; nothing when the run did not
    log it."""
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
        ax.plot(*zip(*evals), "o-", label=f"eval {key}" + (" (mean)" if eval_sets else ""))
    for name in eval_sets:
        points = [(e["step"], e[f"eval_{name}_{key}"]) for e in log_history if f"eval_{name}_{key}" in e]
        if points:
            ax.plot(*zip(*points), ".--", label=f"eval {name} {key}")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
