"""Folds of a detection training set: whole duplicate groups per fold, classes spread evenly.

Groups come from the clean stage's WORK/clean.csv (`id`, `group`) when it covers these images,
so an image and its near duplicate never sit on both sides of a fold; images it does not list
are groups of their own. scikit-learn's StratifiedGroupKFold does the assignment, stratified by
each image's most frequent class (an image holds several boxes; its commonest class is the best
single label to balance on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.core.errors import PipelineError


def image_groups(images: list[str], clean_csv: Path | None) -> np.ndarray:
    """Group id per image: its duplicate group in clean_csv, or a group of its own."""
    own = np.arange(len(images))
    if clean_csv is None or not Path(clean_csv).is_file():
        return own
    clean = pd.read_csv(clean_csv, dtype={"id": str}, usecols=lambda c: c in ("id", "group"), keep_default_na=False)
    if not {"id", "group"} <= set(clean.columns):
        raise PipelineError(f"{clean_csv}: needs columns id and group (rerun `make clean`)")
    group = dict(zip(clean["id"], clean["group"].astype(str), strict=True))
    names = [group.get(im) for im in images]
    if not any(n is not None for n in names):
        return own
    keys = [f"clean:{n}" if n is not None else f"image:{i}" for i, n in enumerate(names)]
    return pd.factorize(pd.Series(keys))[0]


def main_class(n_images: int, items: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each image's most frequent box label ('' for an image without boxes)."""
    out = np.full(n_images, "", dtype=object)
    if len(items):
        counts = pd.DataFrame({"item": items, "label": labels}).value_counts().reset_index()
        first = counts.sort_values(["item", "count", "label"], ascending=[True, False, True]).drop_duplicates("item")
        out[first["item"].to_numpy()] = first["label"].to_numpy()
    return out


def assign_folds(groups: np.ndarray, strata: np.ndarray, n_splits: int, seed: int,
                 key: str = "detect.folds.n_splits") -> np.ndarray:
    """Fold index per image; images of one group always share a fold. `key` is the config key errors name."""
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise PipelineError(f"{key}={n_splits} but the training images form only {n_groups} "
                            f"independent groups (duplicates share a fold); lower {key}")
    fold = np.full(len(groups), -1)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(groups)), strata.astype(str), groups)):
        fold[held] = k
    return fold
