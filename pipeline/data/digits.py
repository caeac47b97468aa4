"""Build the embedded default competition "digits" from scikit-learn's bundled handwritten digits.

Real data with no download: 1,797 8x8 grayscale images (UCI optical digits) written as PNG files in
a Kaggle-style folder. A stratified 80/20 split gives train.csv and test.csv; the test labels go to
a solution file *outside* the competition folder, used only by `pipeline score` (a private
leaderboard). File names are a seeded permutation so that no name hints at a label. Deterministic:
the same seed writes byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pipeline.core.artifacts import write_csv


def solution_path(out: Path) -> Path:
    return Path(out).parent / f"{Path(out).name}_solution.csv"


def build_digits(out: Path, seed: int = 0, limit: int | None = None, test_size: float = 0.2) -> Path:
    """Write the competition to `out` (and its hidden solution beside it); `limit` keeps a stratified subset."""
    out = Path(out)
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target
    index = np.arange(len(labels))
    if limit is not None and limit < len(labels):
        index, _ = train_test_split(index, train_size=limit, stratify=labels, random_state=seed)
        index = np.sort(index)
    names = np.random.default_rng(seed).permutation(len(labels))
    (out / "images").mkdir(parents=True, exist_ok=True)
    ids = []
    for i in index:
        rel = f"images/{names[i]:04d}.png"
        Image.fromarray(images[i]).save(out / rel)
        ids.append(rel)
    frame = pd.DataFrame({"image": ids, "label": labels[index]})
    train, test = train_test_split(frame, test_size=test_size, stratify=frame["label"], random_state=seed)
    train, test = train.sort_values("image"), test.sort_values("image")
    write_csv(out / "train.csv", train)
    write_csv(out / "test.csv", test[["image"]])
    write_csv(out / "sample_submission.csv", test[["image"]].assign(label=0))
    write_csv(solution_path(out), test)
    return out
