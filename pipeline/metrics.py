"""Competition metrics on class-probability matrices (scikit-learn does the arithmetic)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

GREATER_IS_BETTER = {"accuracy": True, "macro_f1": True, "roc_auc": True, "log_loss": False}


def score(metric: str, y_true: np.ndarray, proba: np.ndarray) -> float:
    """Metric of probabilities `proba` (n, n_classes) against class indices `y_true`."""
    labels = np.arange(proba.shape[1])
    if metric == "accuracy":
        return float(accuracy_score(y_true, proba.argmax(1)))
    if metric == "macro_f1":
        return float(f1_score(y_true, proba.argmax(1), average="macro", labels=labels))
    if metric == "log_loss":
        clipped = np.clip(np.asarray(proba, dtype=np.float64), 1e-15, 1)
        return float(log_loss(y_true, clipped / clipped.sum(1, keepdims=True), labels=labels))
    if metric == "roc_auc":
        if proba.shape[1] == 2:
            return float(roc_auc_score(y_true, proba[:, 1]))
        present = np.unique(y_true)
        return float(roc_auc_score(y_true, proba[:, present] / proba[:, present].sum(1, keepdims=True),
                                   multi_class="ovr", labels=present))
    raise ValueError(f"unknown metric {metric}")


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new > old if GREATER_IS_BETTER[metric] else new < old
