"""Pictures people would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .artifacts import atomic_write  # noqa: E402


def plot_curves(history: pd.DataFrame, path: Path, title: str) -> Path:
    """Train loss, train accuracy and validation accuracy per epoch, as the course's Animator draws."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(history["epoch"], history["train_loss"], label="train loss")
    ax.plot(history["epoch"], history["train_acc"], "--", label="train acc")
    ax.plot(history["epoch"], history["val_acc"], "-.", label="val acc")
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return Path(path)
