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

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import metrics
from .errors import PipelineError

TASKS = metrics.TASKS
DEFAULT_METRIC = metrics.DEFAULT_METRIC
MAX_CLASS_INTEGERS = 20  # integer labels with more distinct values than this are a number to regress, not classes
# the kind of predictions a task's metrics score: proba (softmax rows, class-index truth), multi (sigmoid columns,
# multi-hot truth), value (one column of numbers, numeric truth)
KIND = {"single_label": "proba", "multi_label": "multi", "regression": "value", "ordinal": "value"}


def greater_is_better(metric: str) -> bool:
    return metrics.GREATER_IS_BETTER[metric]


def is_better(metric: str, new: float, old: float | None) -> bool:
    return metrics.is_better(metric, new, old)


def kind_of(metric: str) -> str:
    return KIND[metrics.METRICS[metric].tasks[0]]


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


# --- detection and reading of the label column --------------------------------------------------------------

def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def detect(labels: pd.Series, separator: str) -> tuple[str, str]:
    """(task, reason) from a label column: tags when any label holds the separator, a number to regress when every
    label is a number and either one is not an integer or there are more than MAX_CLASS_INTEGERS distinct
    integers; otherwise classes (integer grades stay single_label: say competition.task=ordinal for them)."""
    values = labels[labels.str.strip() != ""]
    if separator:
        tagged = int(values.str.strip().str.contains(separator, regex=False).sum())
        if tagged:
            return "multi_label", f"{tagged:,} of {len(values):,} labels hold the separator {separator!r}"
    numbers = [_number(v) for v in values]
    distinct = values.nunique()
    if values.size and all(n is not None and np.isfinite(n) for n in numbers):
        if any(n != int(n) for n in numbers):
            return "regression", f"{distinct:,} distinct values, not all integers"
        if distinct > MAX_CLASS_INTEGERS:
            return "regression", f"{distinct:,} distinct integer values (over {MAX_CLASS_INTEGERS})"
        return "single_label", (f"{distinct} distinct integer values (set competition.task=ordinal for grades, "
                                "regression for a number)")
    return "single_label", f"{distinct:,} classes, no label holds the separator {separator!r}"


def split_tags(label: str, separator: str) -> list[str]:
    return [t for t in label.split(separator) if t != ""] if separator else [label]


def read_labels(task: str, labels: pd.Series, lines: list[int], separator: str, csv: Path,
                column: str) -> tuple[list[str], np.ndarray]:
    """(classes, y) of a train.csv label column for a task other than single_label (competition.py reads those).

    multi_label: classes are the tags (each in at least 2 rows: folds need them twice), y is -1 (the targets are
    the tags in `label`); regression: no classes, y the number; ordinal: classes are the integer grades in
    numeric order, y the grade's index. Every bad cell is a one-line error naming the file and line."""
    from .competition import MISSING_LABELS, sort_classes  # competition imports this module

    def fail(i: int, what: str) -> PipelineError:
        return PipelineError(f"{csv} line {lines[i]}: {what}")

    for i, v in enumerate(labels):
        if v.strip() == "" or v.strip().lower() in MISSING_LABELS:
            raise fail(i, f"empty or missing target {v!r} in column '{column}'; give every training row a target "
                          "or remove the row")
    if task == "multi_label":
        tags = [split_tags(v.strip(), separator) for v in labels]
        counts = pd.Series([t for row in tags for t in row]).value_counts()
        for tag, n in counts.items():
            if n < 2:
                i = next(j for j, row in enumerate(tags) if tag in row)
                raise fail(i, f"tag '{tag}' appears in only 1 row; folds need at least 2 per tag; "
                              "remove the tag or the row")
        return sort_classes(list(counts.index)), np.full(len(labels), -1)
    numbers = []
    for i, v in enumerate(labels):
        n = _number(v)
        if n is None or not np.isfinite(n):
            raise fail(i, f"target {v!r} in column '{column}' is not a finite number; a {task} target must be "
                          "one (fix the cell, or set competition.task=single_label for classes)")
        if task == "ordinal" and n != int(n):
            raise fail(i, f"grade {v!r} in column '{column}' is not an integer; ordinal grades are integers "
                          "(set competition.task=regression for a number)")
        numbers.append(n)
    if task == "regression":
        return [], np.asarray(numbers, dtype=np.float64)
    classes = sort_classes(sorted(set(labels.str.strip())))
    index = {c: i for i, c in enumerate(classes)}
    return classes, labels.str.strip().map(index).to_numpy()


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


@dataclass(frozen=True)
class Head:
    """The network's output for a task: size, loss and activation. For regression and ordinal the head predicts
    (target - center) / scale (mse, huber) or sigmoid^-1((target - center) / scale) (bce_scaled)."""

    task: str = "single_label"
    n_out: int = 0
    loss: str = "ce"
    center: float = 0.0
    scale: float = 1.0

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict | None, n_classes: int) -> Head:
        return cls(**meta) if meta else cls("single_label", n_classes, "ce")

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, n_out) logits -> (N, n_columns) predictions."""
        logits = logits.float()
        if self.task == "single_label":
            return logits.softmax(-1)
        if self.task == "multi_label":
            return logits.sigmoid()
        z = logits.sigmoid() if self.loss == "bce_scaled" else logits
        return self.center + self.scale * z

    def loss_value(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of the non-single-label tasks (single_label keeps engine.soft_cross_entropy). Targets: multi-hot
        (mixed ones too) or numbers on the target's scale."""
        logits = logits.float()
        if self.task == "multi_label":
            return F.binary_cross_entropy_with_logits(logits, target.float())
        u = ((target.float() - self.center) / self.scale).view(-1, 1)
        if self.loss == "bce_scaled":
            return F.binary_cross_entropy_with_logits(logits, u.clamp(0, 1))
        if self.loss == "huber":
            return F.huber_loss(logits, u, delta=1.0)
        return F.mse_loss(logits, u)

    def merge(self, logits: np.ndarray, how: str = "mean") -> np.ndarray:
        """(n_views, N, n_out) logits -> (N, n_columns) predictions: mean of the views' predictions; geometric on
        sigmoid outputs is the sigmoid of the mean logit; numbers are always averaged."""
        t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
        if how == "geometric" and self.task == "multi_label":
            return t.mean(0).sigmoid().numpy()
        return torch.stack([self.activate(v) for v in t]).mean(0).numpy()


def pooled(head: Head, logits: np.ndarray) -> tuple[np.ndarray, Head]:
    """Logits of one fold's model, ready to pool with other folds' rows: a number head's scaling is learnt per fold,
    so its (n_views, N, 1) logits become predicted values, merged by an identity head (center 0, scale 1, mse);
    class and tag logits are returned as they are, with the head."""
    if head.task in ("single_label", "multi_label"):
        return logits, head
    t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    values = torch.stack([head.activate(v) for v in t]).numpy()
    return values, Head(head.task, 1, "mse", 0.0, 1.0)


def make_head(task: str, n_classes: int, loss: str, train_targets: np.ndarray) -> Head:
    """The head of a task; for numbers the scaling comes from the fold's training targets."""
    if task == "single_label":
        return Head(task, n_classes, "ce")
    if task == "multi_label":
        return Head(task, n_classes, "bce")
    t = np.asarray(train_targets, dtype=np.float64)
    if loss == "bce_scaled":
        low, high = float(t.min()), float(t.max())
        return Head(task, 1, loss, low, (high - low) or 1.0)
    return Head(task, 1, loss, float(t.mean()), float(t.std()) or 1.0)


def cut_grades(values: np.ndarray, n_grades: int, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Grade index of continuous ordinal predictions: cut at `thresholds` (ascending, n_grades - 1 of them;
    default 0.5, 1.5, ... = rounding)."""
    cuts = np.arange(n_grades - 1) + 0.5 if thresholds is None else np.asarray(thresholds)
    return np.searchsorted(cuts, np.asarray(values, dtype=np.float64).reshape(-1), side="right")
