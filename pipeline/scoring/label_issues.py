"""Label issues by confident learning on out-of-fold probabilities (cleanlab), and the OOF scores around them.

cleanlab's `filter.find_label_issues` (default `prune_by_noise_rate`: it estimates the joint of given and true
labels from the OOF probabilities and flags, per pair of classes, the rows least confident in their given label)
lists the rows whose given label is probably wrong; each gets the most likely class as its suggested label. OOF
probabilities matter: a model's predictions on its own training rows have memorised their labels, noisy ones
included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from cleanlab.filter import find_label_issues

from pipeline.scoring import metrics

LABEL_ISSUES_CSV = "label_issues.csv"
COLUMNS = ["id", "path", "given_label", "suggested_label", "self_confidence", "rank"]


def label_issues_csv(work_dir: Path) -> Path:
    """WORK/label_issues.csv (COLUMNS, plus `group`): written by the labels stage, read by the clean stage when
    clean.label_issues is drop or relabel."""
    return Path(work_dir) / LABEL_ISSUES_CSV


def find_issues(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the rows cleanlab flags, least self-confident first, and every row's self-confidence.

    Rows are renormalised first: blends (a stack, a rank average) need not sum to exactly one, which cleanlab
    requires. n_jobs=1: the pipeline's machines share their cores, and the search takes well under a second.
    """
    proba = np.clip(np.asarray(proba, dtype=np.float64), 0, None)
    proba = proba / np.maximum(proba.sum(1, keepdims=True), 1e-12)
    flagged = find_label_issues(labels=y, pred_probs=proba, return_indices_ranked_by="self_confidence", n_jobs=1)
    return np.asarray(flagged, dtype=int), proba[np.arange(len(y)), y]


def issues_table(oof: pd.DataFrame, proba: np.ndarray, classes: list[str], folds: pd.DataFrame) -> pd.DataFrame:
    """label_issues.csv's rows (plus `group`, the duplicate group from folds.csv, when it has one)."""
    flagged, confidence = find_issues(oof["y"].to_numpy(), proba)
    rows = oof.iloc[flagged]
    info = folds.set_index("id")
    table = pd.DataFrame({"id": rows["id"].to_numpy(), "path": rows["id"].map(info["path"]).to_numpy(),
                          "given_label": rows["label"].to_numpy(),
                          "suggested_label": np.asarray(classes)[proba[flagged].argmax(1)],
                          "self_confidence": confidence[flagged].round(6), "rank": np.arange(1, len(flagged) + 1)})
    if "split_group" in info.columns:
        table["group"] = rows["id"].map(info["split_group"]).to_numpy()
    return table


def scores_without_flagged(metric: str, oof: pd.DataFrame, proba: np.ndarray, table: pd.DataFrame) -> dict:
    """The OOF score against the given labels, and against them without the flagged rows (None when all are)."""
    keep = ~oof["id"].isin(set(table["id"])).to_numpy()
    y = oof["y"].to_numpy()
    return {"cv_given": metrics.score(metric, y, proba),
            "cv_given_except_flagged": metrics.score(metric, y[keep], proba[keep]) if keep.any() else None}


def scores_cleaned_and_given(metric: str, oof: pd.DataFrame, proba: np.ndarray, given: pd.Series,
                             class_index: dict[str, int]) -> tuple[float, float]:
    """The OOF score against the labels trained on (oof's `y`) and against the `given` labels (one per OOF row)."""
    y_given = given.map(class_index).to_numpy()
    return metrics.score(metric, oof["y"].to_numpy(), proba), metrics.score(metric, y_given, proba)
