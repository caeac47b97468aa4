"""Post-processing of probability maps into masks: a probability threshold and a smallest connected component
per class, both chosen on out-of-fold Dice, and nested over the folds for an honest figure.

The scores of every (threshold, min_area) pair are computed once per image and class (`grid_scores`, labelling
the components once per threshold with scipy's ndimage.label and dropping small ones by their bincount), so a
choice on any set of images is a mean over a slice of that table: the choice on all OOF images (for the
submission) and the nested one (each fold scored with the choice made on the other folds) cost nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipeline.segmentation.metrics import dice


def drop_small(masks: np.ndarray, min_area: float) -> np.ndarray:
    """masks (N, H, W) bool without the connected components (8-connected) of fewer than min_area pixels."""
    if min_area <= 0 or not masks.any():
        return masks
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True  # links pixels within an image, never across images
    labels, n = ndimage.label(masks, structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def grid_scores(probs: np.ndarray, truth: np.ndarray, thresholds: list[float], min_areas: list[int],
                chunk: int = 256) -> np.ndarray:
    """Dice per (threshold, min_area, image) of uint8 probabilities (N, S, S) of one class against truth
    (N, S, S) bool: (T, A, N); the images go `chunk` at a time to bound memory."""
    out = np.zeros((len(thresholds), len(min_areas), len(probs)), np.float32)
    for start in range(0, len(probs), chunk):
        p, t = np.asarray(probs[start:start + chunk]), np.asarray(truth[start:start + chunk]).astype(bool)
        for i, threshold in enumerate(thresholds):
            binary = p >= threshold * 255
            for j, area in enumerate(min_areas):
                out[i, j, start:start + len(p)] = dice(drop_small(binary, area), t)
    return out


@dataclass(frozen=True)
class Choice:
    threshold: float
    min_area: int
    score: float  # mean Dice of the images it was chosen on


def choose(scores: np.ndarray, thresholds: list[float], min_areas: list[int], rows: np.ndarray | None = None
           ) -> Choice:
    """The pair of the best mean Dice over `rows` (all images by default); ties go to the first in the grid."""
    table = scores if rows is None else scores[:, :, rows]
    means = table.mean(-1)
    i, j = np.unravel_index(int(np.argmax(means)), means.shape)
    return Choice(float(thresholds[i]), int(min_areas[j]), float(means[i, j]))


def nested(scores: np.ndarray | Mapping[int, np.ndarray], fold: np.ndarray, thresholds: list[float],
           min_areas: list[int]) -> tuple[np.ndarray, list[Choice]]:
    """Per-image Dice where each fold's images are post-processed with the pair chosen on the other folds
    (the honest figure), and those choices. `scores` is one table for every fold, or per fold the table to choose
    and score it with (the maps of the blend chosen without that fold: blend.nested_blend)."""
    honest = np.zeros(len(fold), np.float32)
    choices = []
    for k in np.unique(fold):
        held = fold == k
        table = scores[int(k)] if isinstance(scores, Mapping) else scores
        pick = choose(table, thresholds, min_areas, np.flatnonzero(~held))
        honest[held] = table[thresholds.index(pick.threshold), min_areas.index(pick.min_area), held]
        choices.append(pick)
    return honest, choices


def to_masks(probs: np.ndarray, shape: tuple[int, int], thresholds: list[float], min_areas: list[float]
             ) -> np.ndarray:
    """uint8 probabilities (C, S, S) of one image -> (C, H, W) bool masks at its own size: the map resized
    (bilinear), cut at each class's threshold, and components smaller than its min_area (pixels at S x S,
    scaled by the area ratio) dropped."""
    height, width = shape
    size = probs.shape[-1]
    grown = F.interpolate(torch.from_numpy(np.asarray(probs, np.float32))[None], size=(height, width),
                          mode="bilinear", align_corners=False)[0].numpy()
    scale = height * width / (size * size)
    return np.stack([drop_small((grown[c] >= thresholds[c] * 255)[None], min_areas[c] * scale)[0]
                     for c in range(len(probs))])
