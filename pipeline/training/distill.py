"""Knowledge distillation: one student learns the chosen ensemble's probabilities, leak-free per fold.

The fold-k student validates on fold k's rows, so its targets may come only from models that never saw them: the
fold-k models of every member (trained on the other folds), each over its kept TTA views, blended by the chosen
blend refitted on the OOF rows of the other folds (as nested.nested_oof fits it). Those teachers predict the
student's own training rows, which they were trained on: distillation from a teacher's view of its training set,
the usual recipe. The all-fold ensemble would not do: its fold-j models (j != k) learnt fold k's labels, and their
probabilities on fold k's neighbours would carry them into fold k's student (scoring/pseudo.py explains the same
leak for pseudo-labels). So the student's OOF score is honest in the same sense as every member's.

Targets are probability rows, optionally sharpened (p^(1/T), renormalised), learnt with the soft cross-entropy
the trainer already uses for soft pseudo-labels (training/fold.py: TrainingData.soft).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.scoring.blend import Blend
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.inference import view_logits
from pipeline.training.runtime import Runtime
from pipeline.training.tta import merge


def teacher_proba(run_dir: Path, images: np.ndarray, folds_hash: str, classes: list[str], views: list[str],
                  how: str, rt: Runtime, batch_size: int, seed: int, ranges: dict) -> np.ndarray:
    """(N, C) probabilities of one fold model over its kept TTA views, merged as the predict stage merges them."""
    model, meta = load_checkpoint(run_dir, folds_hash, classes)
    model = rt.prepare(model)
    logits = view_logits(model, images, views, rt, meta["norm"], batch_size, seed, ranges)
    return merge(logits, how).astype(np.float64)


def fold_targets(teachers: np.ndarray, oof: np.ndarray, y: np.ndarray, folds: np.ndarray, fold: int, blend: Blend,
                 temperature: float = 1.0) -> np.ndarray:
    """Soft targets of the fold-`fold` student: `teachers` (n_members, N, C), the fold-k models' probabilities of
    its training rows, blended by `blend` refitted on the OOF rows (`oof`, (n_members, n_oof, C)) of the other
    folds only; then sharpened by 1/temperature and renormalised."""
    other = folds != fold
    fitted = blend.unfitted().fit(oof[:, other], y[other])
    p = np.clip(fitted.predict(teachers), 1e-12, None)
    if temperature != 1.0:
        p = p ** (1.0 / temperature)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def with_labels(targets: np.ndarray, labels: np.ndarray, weight: float) -> np.ndarray:
    """Hinton's mix for labelled rows: `weight` of the one-hot label plus the rest of the teachers' probabilities
    (`targets` (N, C), `labels` (N,) class indices)."""
    if weight == 0:
        return targets
    onehot = np.eye(targets.shape[1], dtype=targets.dtype)[labels]
    return (weight * onehot + (1 - weight) * targets).astype(targets.dtype)


def ms_per_image(runs: dict[str, Callable[[], object]], n_images: int, baseline: str,
                 repeats: int = 5) -> dict[str, tuple[float, float]]:
    """{name: (median milliseconds per image, median speed-up over `baseline`)} of each `runs[name]()` (a pass over
    n_images decoded images), after one warm-up pass each (lazy initialisation, caches). The passes are interleaved,
    every run once per round in alternating order, and each round's speed-up is a ratio within that round: on a
    shared machine a slow spell then falls on both sides of a ratio instead of on one row of the table."""
    names = list(runs)
    with torch.no_grad():
        for name in names:
            runs[name]()
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                runs[name]()
                seconds[name].append(time.perf_counter() - start)
    base = np.asarray(seconds[baseline])
    return {name: (1000.0 * float(np.median(t)) / max(1, n_images), float(np.median(base / np.asarray(t))))
            for name, t in seconds.items()}
