"""Blends of several members' probability maps (a member: one architecture on one encoder, its fold models' OOF
and test maps), the weights chosen on OOF Dice and nested over the folds for an honest figure.

A blend is one weight per member (non-negative, summing to 1); its map is the rounded weighted sum of the members'
uint8 maps, the same arithmetic on OOF and on test, and a member of weight 1 gives back its own map exactly (one
member: the stage's numbers are the single model's). The candidates are each member alone, the mean, and the
weights in multiples of 1/steps (a small simplex grid).

Written here rather than reusing pipeline/scoring/blend.py: its blends (caruana_weights, optimised_weights) hold
every model's predictions in memory as (models, rows, classes) and score a classification metric; here a row is a
whole probability map, the maps live on disk, and the score is Dice of the thresholded blend. So every candidate is
scored in one pass over the maps, chunk by chunk (`blend_scores`), and a choice on any set of images, all of OOF or
every fold but one, is then a mean over a slice of that table, as post.py does for the post-processing.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np

from pipeline.segmentation.metrics import dice


def candidate_weights(n_members: int, steps: int) -> np.ndarray:
    """(W, M) weights to try: each member alone (first, so a tie goes to the simpler blend), the mean, then every
    weight vector in multiples of 1/steps, each once."""
    eye = np.eye(n_members)
    # stars and bars: the cut points of `steps` units into n_members parts
    grid = [np.diff([-1, *cuts, steps + n_members - 1]) - 1
            for cuts in combinations(range(steps + n_members - 1), n_members - 1)]
    rows: list[np.ndarray] = []
    for w in [*eye, np.full(n_members, 1 / n_members), *(np.array(g, float) / steps for g in grid)]:
        if not any(np.allclose(w, r) for r in rows):
            rows.append(w)
    return np.array(rows)


def blend_maps(parts: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """uint8 rint(sum_m weights[m] * parts[m]); members of weight 0 are never read."""
    used = [(w, p) for w, p in zip(weights, parts, strict=True) if w > 0]
    if len(used) == 1 and np.isclose(used[0][0], 1):
        return np.asarray(used[0][1])
    acc = sum(np.float32(w) * np.asarray(p, np.float32) for w, p in used)
    return np.rint(acc).astype(np.uint8)


class Blended:
    """The blend of members' uint8 maps (each (N, ...)), computed only for the rows asked for (`blended[a:b]`,
    `blended[rows]`), so that it stands in for a memmap of the blended maps without one being written;
    `of_class(c)` narrows every member to class c without reading anything."""

    def __init__(self, maps: Sequence[np.ndarray], weights: np.ndarray) -> None:
        used = [i for i, w in enumerate(weights) if w > 0]  # a member of weight 0 is never read
        self.maps, self.weights = [maps[i] for i in used], np.asarray(weights, float)[used]
        self.shape = self.maps[0].shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        return blend_maps([m[index] for m in self.maps], self.weights)

    def of_class(self, c: int) -> Blended:
        return Blended([m[:, c] for m in self.maps], self.weights)


def blend_scores(maps: Sequence[np.ndarray], truth: np.ndarray, weights: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Dice at threshold 0.5 per (candidate, image, class) of the blends of maps (members' (N, C, S, S) uint8)
    against truth (N, C, S, S): (W, N, C). Each chunk of every member is read once for all candidates."""
    n = len(truth)
    out = np.zeros((len(weights), n, truth.shape[1]))  # float64, as dice gives: the one-member figures unchanged
    for start in range(0, n, chunk):
        parts = [np.asarray(m[start:start + chunk]) for m in maps]
        t = np.asarray(truth[start:start + chunk]).astype(bool)
        for i, w in enumerate(weights):
            out[i, start:start + len(t)] = dice(blend_maps(parts, w) >= 128, t)
    return out


def choose_blend(scores: np.ndarray, rows: np.ndarray | None = None) -> int:
    """The candidate of the best mean Dice over `rows` (all images by default); ties go to the first."""
    table = scores if rows is None else scores[:, rows]
    return int(np.argmax(table.mean(axis=(1, 2))))


def nested_blend(scores: np.ndarray, fold: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Per-image, per-class Dice (N, C) where each fold's images are scored with the blend chosen on the other
    folds, and those choices (fold -> candidate)."""
    honest = np.zeros(scores.shape[1:])
    choices = {}
    for k in np.unique(fold):
        held = fold == k
        choices[int(k)] = choose_blend(scores, np.flatnonzero(~held))
        honest[held] = scores[choices[int(k)], held]
    return honest, choices
