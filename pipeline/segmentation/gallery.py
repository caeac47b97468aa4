"""A picture of what the model makes of a few images: each row the image, its true masks and the predicted
masks, one colour per class (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.core.artifacts import atomic_write  # noqa: E402


def gallery(images: np.ndarray, masks: np.ndarray, predicted: np.ndarray, ids: list[str], classes: list[str],
            path: Path) -> None:
    """Rows of image, true masks and predicted masks (classes in colours) for a few OOF images."""
    n = len(images)
    colours = plt.get_cmap("tab10")(np.arange(masks.shape[1]) % 10)[:, :3]

    def paint(m: np.ndarray) -> np.ndarray:
        return np.clip(np.tensordot(m.astype(float).transpose(1, 2, 0), colours, axes=(2, 0)), 0, 1)

    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        for ax, picture, title in zip(axes[i], (images[i], paint(masks[i]), paint(predicted[i])),
                                      (ids[i], "truth", "prediction (OOF)"), strict=True):
            ax.imshow(picture)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    names = ["blue", "orange", "green", "red", "purple", "brown", "pink", "grey", "olive", "cyan"]
    fig.suptitle(", ".join(f"{c}: {names[j % 10]}" for j, c in enumerate(classes)), fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
