"""Competition metrics for the four task types (scikit-learn does the arithmetic).

What `score(metric, y_true, pred)` expects, by task:
- single_label: y_true class indices (n,), pred class probabilities (n, n_classes).
- multi_label: y_true multi-hot (n, k), pred tag probabilities (n, k). The F-scores cut pred at
  `thresholds` (a scalar or one per tag; default 0.5; a tag is predicted when p >= threshold); map and
  roc_auc_mean rank the probabilities and use no threshold.
- regression: y_true floats (n,), pred floats (n,) or (n, 1).
- ordinal: y_true integer grades 0..K-1 (n,), pred a continuous grade (n,) or (n, 1), integer grades, or
  grade probabilities (n, K) (their expected grade). qwk cuts continuous grades at `thresholds` (K-1 sorted
  cut points; default the midpoints 0.5, 1.5, ..., with K from y_true unless thresholds say otherwise).

`METRICS` says for each metric whether greater is better, which tasks it applies to and whether its
decisions depend on thresholds (pipeline/scoring/thresholds.py tunes those on OOF, nested).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    f1_score,
    fbeta_score,
    log_loss,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
    root_mean_squared_error,
)

from pipeline.core.registry import DEFAULT_METRIC, METRICS, TASKS, Metric  # noqa: F401  (re-exported)

GREATER_IS_BETTER = {name: m.greater_is_better for name, m in METRICS.items()}
# F-scores of multi-label decisions: metric -> (beta, scikit-learn's average)
FBETA = {"f1_samples": (1.0, "samples"), "f1_micro": (1.0, "micro"), "f1_macro": (1.0, "macro"),
         "f2_samples": (2.0, "samples")}


def default_metric(task: str) -> str:
    """The metric a task is scored by when competition.metric is not set."""
    if task not in DEFAULT_METRIC:
        raise ValueError(f"unknown task {task}; one of {', '.join(TASKS)}")
    return DEFAULT_METRIC[task]


def metrics_for(task: str) -> list[str]:
    """The metrics that apply to a task, in registry order."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task}; one of {', '.join(TASKS)}")
    return [name for name, m in METRICS.items() if task in m.tasks]


def score(metric: str, y_true: np.ndarray, proba: np.ndarray, thresholds=None) -> float:
    """Metric of predictions `proba` against `y_true` (shapes by task in the module docstring); `thresholds`
    matter only to thresholded metrics and are ignored by the others."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric}")
    task = METRICS[metric].tasks[0]
    if task == "single_label":
        return _single_label(metric, np.asarray(y_true), np.asarray(proba))
    if task == "multi_label":
        return _multi_label(metric, np.asarray(y_true), np.asarray(proba, dtype=np.float64), thresholds)
    if metric == "qwk":
        return qwk(y_true, proba, thresholds)
    y, p = np.asarray(y_true, dtype=np.float64).ravel(), _column(proba)
    if metric == "rmse":
        return float(root_mean_squared_error(y, p))
    if metric == "mae":
        return float(mean_absolute_error(y, p))
    return float(r2_score(y, p))


def _single_label(metric: str, y_true: np.ndarray, proba: np.ndarray) -> float:
    labels = np.arange(proba.shape[1])
    if metric == "accuracy":
        return float(accuracy_score(y_true, proba.argmax(1)))
    if metric == "macro_f1":
        return float(f1_score(y_true, proba.argmax(1), average="macro", labels=labels))
    if metric == "log_loss":
        clipped = np.clip(np.asarray(proba, dtype=np.float64), 1e-15, 1)
        return float(log_loss(y_true, clipped / clipped.sum(1, keepdims=True), labels=labels))
    if proba.shape[1] == 2:
        return float(roc_auc_score(y_true, proba[:, 1]))
    present = np.unique(y_true)
    return float(roc_auc_score(y_true, proba[:, present] / proba[:, present].sum(1, keepdims=True),
                               multi_class="ovr", labels=present))


def decide(proba: np.ndarray, thresholds=None) -> np.ndarray:
    """Multi-hot decisions: tag j is predicted when proba[:, j] >= thresholds[j] (scalar or (k,); default 0.5)."""
    proba = np.asarray(proba, dtype=np.float64)
    t = np.asarray(0.5 if thresholds is None else thresholds, dtype=np.float64)
    if t.ndim and t.shape != (proba.shape[1],):
        raise ValueError(f"thresholds of shape {t.shape} for {proba.shape[1]} tags")
    return (proba >= t).astype(np.int8)


def _multi_label(metric: str, y_true: np.ndarray, proba: np.ndarray, thresholds) -> float:
    if y_true.shape != proba.shape or y_true.ndim != 2:
        raise ValueError(f"multi-label y_true {y_true.shape} and pred {proba.shape} must both be (n, k)")
    y = y_true.astype(np.int8)
    if metric in FBETA:
        beta, average = FBETA[metric]
        # zero_division=1: no tag to find and none predicted is a perfect answer (sample, or tag under macro)
        return float(fbeta_score(y, decide(proba, thresholds), beta=beta, average=average, zero_division=1.0))
    # Ranking metrics are undefined for a tag with no positive (or, for AUC, no negative) row: those tags
    # are left out of the mean, as roc_auc does for classes missing from a fold.
    pos = y.sum(0)
    keep = (pos > 0) & (pos < len(y)) if metric == "roc_auc_mean" else pos > 0
    if not keep.any():
        return float("nan")
    if metric == "map":
        return float(average_precision_score(y[:, keep], proba[:, keep], average="macro"))
    return float(roc_auc_score(y[:, keep], proba[:, keep], average="macro"))


def _column(pred) -> np.ndarray:
    p = np.asarray(pred, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        return p[:, 0]
    if p.ndim != 1:
        raise ValueError(f"regression predictions must be (n,) or (n, 1), not {p.shape}")
    return p


def midpoints(n_grades: int) -> np.ndarray:
    """The K-1 cut points halfway between grades 0..K-1: cutting there is rounding to the nearest grade."""
    return np.arange(n_grades - 1, dtype=np.float64) + 0.5


def expected_grade(pred) -> np.ndarray:
    """A continuous grade (n,) from a grade (n,), (n, 1) or grade probabilities (n, K) (their expectation)."""
    p = np.asarray(pred, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] > 1:
        return p @ np.arange(p.shape[1], dtype=np.float64)
    return _column(p)


def to_grades(pred, thresholds) -> np.ndarray:
    """Integer grades 0..len(thresholds): the number of sorted cut points each continuous grade reaches."""
    cuts = np.sort(np.asarray(thresholds, dtype=np.float64))
    return np.searchsorted(cuts, expected_grade(pred), side="right")


def qwk(y_true, pred, thresholds=None) -> float:
    """Quadratic weighted kappa of grades cut from `pred` at `thresholds` (default midpoints) against y_true."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    cuts = midpoints(int(y.max()) + 1) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if y.min() < 0 or y.max() > len(cuts):
        raise ValueError(f"grades {y.min()}..{y.max()} outside 0..{len(cuts)} of {len(cuts)} thresholds")
    grades = to_grades(pred, cuts)
    return float(cohen_kappa_score(y, grades, weights="quadratic", labels=np.arange(len(cuts) + 1)))


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new > old if GREATER_IS_BETTER[metric] else new < old
