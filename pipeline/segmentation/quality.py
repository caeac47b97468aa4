"""What the clean stage checks of a segmentation folder's masks: the share of empty masks per class, and whether the
masks of two duplicate training images agree.

A duplicate's mask is its label: two copies of one image with masks that disagree teach the model both answers
and score it against either, so each training pair the duplicate search finds is compared class by class with
the Dice of metrics.py (1 when both masks are empty, 0 when only one is). A pair whose lowest Dice over the classes
is below the threshold is a mask conflict. Masks are decoded one image at a time (SegmentationData.masks), never
the whole training set at once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.segmentation.data import SegmentationData
from pipeline.segmentation.metrics import dice


def class_presence(data: SegmentationData) -> np.ndarray:
    """(N, C) bool: which classes each training image's masks hold, at the image's own size."""
    out = np.zeros((len(data.train), len(data.classes)), dtype=bool)
    for i in tqdm(range(len(data.train)), desc="clean: masks", unit="img", disable=None):
        out[i] = data.masks(i).reshape(len(data.classes), -1).any(1)
    return out


def empty_shares(present: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per class: training images, those whose mask of the class is empty, and their share."""
    empty = (~present).sum(0)
    n = len(present)
    return pd.DataFrame({"class": classes, "images": n, "empty": empty.astype(int),
                         "empty_share": np.round(empty / max(n, 1), 6)})


def _resized(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(C, H, W) bool masks at `shape` (nearest neighbour), as a resized copy of an image would have them."""
    if masks.shape[1:] == shape:
        return masks
    return np.stack([np.asarray(Image.fromarray(m.astype(np.uint8)).resize(shape[::-1], Image.NEAREST)) > 0
                     for m in masks])


def pair_dice(data: SegmentationData, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(P, C) Dice per class between the masks of training images a[p] and b[p]; b's masks are resized to a's
    image size when the two differ (a resized copy)."""
    out = np.ones((len(a), len(data.classes)))
    for p, (i, j) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
        first = data.masks(i)
        out[p] = dice(first[None], _resized(data.masks(j), first.shape[1:])[None])[0]
    return out


def mask_conflicts(scores: np.ndarray, classes: list[str], threshold: float) -> pd.DataFrame:
    """Per pair of pair_dice's (P, C) scores: the lowest Dice over the classes, whether it is below `threshold`
    (a mask conflict), and the classes below it (joined by '+')."""
    low = scores < threshold
    return pd.DataFrame({"mask_dice": np.round(scores.min(1), 6),
                         "mask_conflict": low.any(1),
                         "conflict_classes": ["+".join(c for c, bad in zip(classes, row, strict=True) if bad)
                                              for row in low]})
