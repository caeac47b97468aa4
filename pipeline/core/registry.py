"""The names the config, the CLI and the scoring code share: tasks and metrics, written once.

The config schema builds its `competition.task` and `competition.metric` choices from here, the CLI its `--metric`
choices, and scoring/metrics.py keys its functions by these names (it checks at import that it scores each one).
"""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("single_label", "multi_label", "regression", "ordinal")


@dataclass(frozen=True)
class Metric:
    greater_is_better: bool
    tasks: tuple[str, ...]
    thresholded: bool = False  # its decisions cut predictions at thresholds (tuned on OOF)


METRICS = {
    "accuracy": Metric(True, ("single_label",)),
    "macro_f1": Metric(True, ("single_label",)),
    "roc_auc": Metric(True, ("single_label",)),
    "log_loss": Metric(False, ("single_label",)),
    "f1_samples": Metric(True, ("multi_label",), thresholded=True),
    "f1_micro": Metric(True, ("multi_label",), thresholded=True),
    "f1_macro": Metric(True, ("multi_label",), thresholded=True),
    "f2_samples": Metric(True, ("multi_label",), thresholded=True),
    "map": Metric(True, ("multi_label",)),
    "roc_auc_mean": Metric(True, ("multi_label",)),
    "rmse": Metric(False, ("regression", "ordinal")),
    "mae": Metric(False, ("regression", "ordinal")),
    "r2": Metric(True, ("regression", "ordinal")),
    "qwk": Metric(True, ("ordinal",), thresholded=True),
}
DEFAULT_METRIC = {"single_label": "accuracy", "multi_label": "f1_samples", "regression": "rmse", "ordinal": "qwk"}
# the form of a task's predictions: class probabilities (softmax rows, class-index truth), tag probabilities
# (sigmoid columns, multi-hot truth), or one value per row (numeric truth)
PREDICTION_FORM = {"single_label": "proba", "multi_label": "multi", "regression": "value", "ordinal": "value"}
