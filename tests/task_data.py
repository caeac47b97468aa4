"""Tiny competitions of every task type whose targets are readable from the pixels (tests only).

Each image is 16x16 RGB with four 8x8 quadrants; quadrant q is lit (brighter by 100-160 over noise)
when tag q is present.
multi_label: the tags of the lit quadrants; regression: the number of lit quadrants plus a fraction given by
the brightness; ordinal: the number of lit quadrants (a grade 0..4). Test images follow the same rule, and a
solution file holds their targets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

TAGS = ["north", "east", "south", "west"]
CORNERS = [(0, 8), (8, 8), (8, 0), (0, 0)]  # (row, col) of each tag's quadrant


def _image(lit: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    # 2x2-pixel noise: it survives the 8x8 grid of the small-image duplicate search, so no two images are near pairs
    img = rng.integers(0, 90, (8, 8, 3), dtype=np.uint8).repeat(2, 0).repeat(2, 1)
    for q, on in enumerate(lit):
        if on:
            r, c = CORNERS[q]
            img[r:r + 8, c:c + 8] += np.uint8(100 + 60 * level)
    return img


def make_task_folder(root: Path, task: str, n_train: int = 48, n_test: int = 12, seed: int = 0,
                     sample: str = "labels") -> Path:
    """A competition folder of `task` (multi_label, regression, ordinal) under root; returns it."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train + n_test):
        lit = rng.random(4) < 0.5
        if not lit.any():
            lit[i % 4] = True
        level = float(rng.random())
        name = f"img/{'train' if i < n_train else 'test'}_{i}.png"
        Image.fromarray(_image(lit, level, rng)).save(root / name)
        if task == "multi_label":
            target = " ".join(t for t, on in zip(TAGS, lit, strict=True) if on)
        elif task == "regression":
            target = f"{lit.sum() + round(level, 2):.2f}"
        else:
            target = str(int(lit.sum()))
        rows.append((name, target))
    frame = pd.DataFrame(rows, columns=["image", "target"])
    frame.iloc[:n_train].to_csv(root / "train.csv", index=False)
    frame.iloc[n_train:][["image"]].to_csv(root / "test.csv", index=False)
    frame.iloc[n_train:].to_csv(root / "solution.csv", index=False)
    test = frame.iloc[n_train:]
    if sample == "probabilities":
        pd.DataFrame({"image": test["image"], **{t: 0.5 for t in TAGS}}).to_csv(root / "sample_submission.csv",
                                                                                 index=False)
    elif sample == "labels":
        pd.DataFrame({"image": test["image"], "target": test["target"].iloc[0]}).to_csv(
            root / "sample_submission.csv", index=False)
    return root
