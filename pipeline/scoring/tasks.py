"""Task types: what a label means, how it becomes a training target, and how logits become predictions.

Four tasks share every stage (folds, train, TTA, OOF files, blends, submission):

- single_label: one class per image. Target: class index; head: one logit per class; loss: soft-target
  cross-entropy (Mixup/CutMix, label smoothing); predictions: softmax probabilities, one `p_<class>` column
  per class; TTA views merge by mean (or geometric mean) of probabilities.
- multi_label: a label holds several tags separated by `competition.label_separator` (Planet).
  Target: multi-hot; head: one logit per tag; loss: BCE-with-logits (Mixup/CutMix mix the multi-hot targets
  as they mix the images); predictions: sigmoid probabilities, one `p_<tag>` column per tag; views merge by
  mean of probabilities (geometric: sigmoid of the mean logit).
- regression: a number (Pawpularity). Target: the float; head: one output; loss `train.loss`: mse or huber on
  the target standardised by the training rows' mean and std, or bce_scaled (BCE on the target min-max scaled
  to [0, 1] with a sigmoid head, the trick top Pawpularity solutions used); predictions: one `pred` column on
  the target's scale; views merge by the mean.
- ordinal: integer grades (APTOS, PANDA) scored by quadratic weighted kappa. Classes are the sorted grades and
  the target is the grade's index, regressed like a regression target; predictions: one continuous `pred`
  column in index units, cut into grades by thresholds (0.5, 1.5, ... by default).

`competition.task=auto` decides from the label column (`detect`). The scaling a regression head learnt with
(`Head.center`, `Head.scale`, from the fold's training targets) is stored in the checkpoint's best.json, so
prediction turns logits into numbers exactly as validation did.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.registry import DEFAULT_METRIC, PREDICTION_FORM, TASKS  # noqa: E402,F401  (re-exported)
from pipeline.data.labels import split_tags
from pipeline.scoring import metrics


def greater_is_better(metric: str) -> bool:
    return metrics.GREATER_IS_BETTER[metric]


def is_better(metric: str, new: float, old: float | None) -> bool:
    return metrics.is_better(metric, new, old)


def kind_of(metric: str) -> str:
    return PREDICTION_FORM[metrics.METRICS[metric].tasks[0]]


def check_metric(task: str, metric: str) -> None:
    """A metric of another task is a one-line error naming the ones that fit."""
    if task not in metrics.METRICS[metric].tasks:
        raise PipelineError(f"competition.metric={metric} does not score a {task} task; use one of "
                            f"{', '.join(metrics.metrics_for(task))}")


def score(metric: str, y_true: np.ndarray, pred: np.ndarray, thresholds=None) -> float:
    """metrics.score with the thresholds given (tag cuts; ordinal cut points), or its defaults: 0.5 for tags; for
    qwk the midpoints of every grade seen in the truth or the rounded predictions, so a prediction above the
    fold's highest grade is not lost."""
    if metric == "qwk" and thresholds is None:
        top = max(int(np.max(y_true, initial=0)), int(np.rint(np.max(pred, initial=0))))
        thresholds = metrics.midpoints(top + 1)
    return metrics.score(metric, y_true, pred, thresholds=thresholds)


# --- targets, heads, losses ---------------------------------------------------------------------------------

def multi_hot(labels, classes: list[str], separator: str) -> np.ndarray:
    """(n, n_tags) 0/1 rows of space-separated (or separator-separated) tags; unknown tags are ignored."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(labels), len(classes)), dtype=np.float32)
    for r, label in enumerate(labels):
        for tag in split_tags(str(label).strip(), separator):
            if tag in index:
                out[r, index[tag]] = 1.0
    return out


def truth(task: str, frame: pd.DataFrame, classes: list[str], separator: str) -> np.ndarray:
    """What metrics score against: class/grade index, multi-hot rows, or the numbers (from `y`, or `label`)."""
    if task == "multi_label":
        return multi_hot(frame["label"], classes, separator).astype(int)
    if task == "regression":
        return frame["y"].to_numpy(np.float64)
    return frame["y"].to_numpy().astype(int)


def targets(task: str, frame: pd.DataFrame, classes: list[str], separator: str) -> np.ndarray:
    """Training targets: int64 class index (single_label), float32 multi-hot, float32 number or grade index."""
    if task == "single_label":
        return frame["y"].to_numpy().astype(np.int64)
    return truth(task, frame, classes, separator).astype(np.float32)


def columns(task: str, classes: list[str]) -> list[str]:
    """Prediction file columns: one probability per class or tag, or one `pred`."""
    return [f"p_{c}" for c in classes] if task in ("single_label", "multi_label") else ["pred"]


def cut_grades(values: np.ndarray, n_grades: int, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Grade index of continuous ordinal predictions: cut at `thresholds` (ascending, n_grades - 1 of them;
    default 0.5, 1.5, ... = rounding)."""
    cuts = np.arange(n_grades - 1) + 0.5 if thresholds is None else np.asarray(thresholds)
    return np.searchsorted(cuts, np.asarray(values, dtype=np.float64).reshape(-1), side="right")
