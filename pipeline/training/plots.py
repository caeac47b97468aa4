"""Pictures people would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.core.artifacts import atomic_write  # noqa: E402


def plot_curves(history: pd.DataFrame, path: Path, title: str) -> Path:
    """The classification track's curves: training loss, and train and validation accuracy per epoch."""
    return plot_panels(history, {"loss": ["train_loss"], "accuracy": ["train_acc", "val_acc"]}, path, title)


def plot_panels(history: pd.DataFrame, panels: dict[str, list[str]], path: Path, title: str,
                log: tuple[str, ...] = ()) -> Path:
    """One panel per entry of `panels` (panel title -> history columns), epochs on the x axis."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.5), squeeze=False)
    for ax, (name, columns) in zip(axes[0], panels.items(), strict=True):
        for col in columns:
            ax.plot(history["epoch"], history[col], marker=".", label=col)
        if name in log:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return Path(path)
