"""Folds of a classification table: StratifiedGroupKFold with duplicate groups as groups, so no group spans two
folds.

Groups are the clean stage's duplicate groups, merged with the user's group column (e.g. a patient id) when the
table has one (`split_groups`). Per task (pipeline/scoring/tasks.py): single_label and ordinal stratify on the
class (grade); regression on the target binned into quantiles (StratifiedGroupKFold on the bins, see `strata`);
multi_label with iterative stratification on whole groups (`assign_multilabel_folds`). `make_folds` splits the
competition's rows the task's way and gives extra rows (a non-empty `source`) fold EXTRA_FOLD: never a
validation fold, and left out of the splitter, so the competition's rows are split exactly as without them.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.core.errors import PipelineError
from pipeline.data import dedup

log = logging.getLogger(__name__)

EXTRA_FOLD = -1  # the fold of extra training rows: in every fold's training set, in no validation set


def split_groups(frame: pd.DataFrame) -> np.ndarray:
    """Duplicate groups merged with the user's group column (e.g. patient id): connected components."""
    if "user_group" not in frame.columns:
        return frame["group"].to_numpy()
    pos = pd.Series(np.arange(len(frame)))
    firsts = [pos.groupby(frame[col].to_numpy()).transform("first").to_numpy() for col in ("group", "user_group")]
    return dedup.groups(len(frame), np.concatenate(firsts), np.concatenate([pos.to_numpy()] * 2))


def check_class_sizes(counts: pd.Series, n_splits: int) -> None:
    """StratifiedGroupKFold needs one class with at least n_splits images (scikit-learn's ValueError otherwise)."""
    largest, n = str(counts.index[0]), int(counts.iloc[0])
    if n < n_splits:
        fix = f"set folds.n_splits={n} or fewer" if n >= 2 else "add images"
        raise PipelineError(f"folds.n_splits={n_splits} needs a class with at least {n_splits} images, but "
                            f"the largest, '{largest}', has {n} after cleaning: {fix}")


def _check_groups(groups: np.ndarray, n_splits: int) -> None:
    if len(np.unique(groups)) < n_splits:
        n = len(np.unique(groups))
        raise PipelineError(f"folds.n_splits={n_splits} but the images form only {n} independent groups "
                            f"(duplicates and competition.group_column keep a group in one fold): "
                            + (f"set folds.n_splits={n} or fewer" if n >= 2 else "add images"))


def assign_folds(frame: pd.DataFrame, n_splits: int, seed: int, groups: np.ndarray | None = None,
                 strata: np.ndarray | None = None) -> np.ndarray:
    """Fold index per row; rows sharing a group (default: the `group` column) always share a fold. Stratified on
    `strata` (default: the `y` column, the class index)."""
    groups = frame["group"].to_numpy() if groups is None else groups
    _check_groups(groups, n_splits)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold = np.full(len(frame), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small-class warning is ours to print (below)
        for k, (_, held) in enumerate(splitter.split(frame, frame["y"] if strata is None else strata, groups)):
            fold[held] = k
    return fold


def assign_multilabel_folds(tags: np.ndarray, n_splits: int, seed: int, groups: np.ndarray) -> np.ndarray:
    """Fold per row of multi-hot `tags`, no group spanning two folds: iterative stratification (Sechidis et al.
    2011, the iterative-stratification package's MultilabelStratifiedKFold) over the groups, not the rows.

    Each group becomes one sample whose labels are the union of its rows' tags (the splitter needs a 0/1
    indicator matrix, so a group's tag counts cannot be given; duplicate groups are small and share their tags,
    so the union loses little); the group's fold is then given to all its rows. A group counts as one sample, so
    fold sizes in rows vary by the sizes of the groups."""
    _check_groups(groups, n_splits)
    codes = np.unique(groups, return_inverse=True)[1]
    group_tags = np.zeros((codes.max() + 1, tags.shape[1]), dtype=int)
    np.maximum.at(group_tags, codes, (np.asarray(tags) > 0).astype(int))
    splitter = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    group_fold = np.full(len(group_tags), -1)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(group_tags)), group_tags)):
        group_fold[held] = k
    return group_fold[codes]


def strata(values: np.ndarray, n_splits: int, max_bins: int = 10) -> np.ndarray:
    """Quantile bins of a regression target for StratifiedGroupKFold: at most max_bins, each holding about
    n_splits rows or more (ties share a bin)."""
    bins = int(max(1, min(max_bins, len(values) // max(2 * n_splits, 1))))
    return pd.qcut(pd.Series(values).rank(method="first"), bins, labels=False).to_numpy()


def fold_report(frame: pd.DataFrame, tags: np.ndarray | None = None, by: np.ndarray | None = None) -> dict:
    """Per-fold sizes and the largest gap between a fold's class share and the overall share: of the strata `by`
    (default: the class `y`), or, given multi-hot `tags`, of each tag's frequency (share of rows holding it)."""
    if tags is not None:
        per_fold = pd.DataFrame(tags).groupby(frame["fold"].to_numpy()).mean()
        deviation = float((per_fold - tags.mean(0)).abs().to_numpy().max())
    else:
        y = pd.Series(frame["y"].to_numpy() if by is None else by)
        overall = y.value_counts(normalize=True)
        share = y.groupby(frame["fold"].to_numpy()).value_counts(normalize=True).unstack(fill_value=0.0)
        deviation = float((share - overall.reindex(share.columns)).abs().to_numpy().max())
    groups_per_fold = frame.groupby("split_group" if "split_group" in frame else "group")["fold"].nunique()
    return {"sizes": frame["fold"].value_counts().sort_index().tolist(),
            "max_class_share_deviation": round(deviation, 4),
            "groups_spanning_folds": int((groups_per_fold > 1).sum())}


def make_folds(frame: pd.DataFrame, task: str, n_splits: int, seed: int, tags: np.ndarray | None = None,
               classes: list[str] | None = None) -> tuple[pd.DataFrame, dict]:
    """`frame` (clean.csv's rows) with `split_group` and `fold` columns, and the fold report (with `extra_rows`).

    Rows with a non-empty `source` (extra data) get EXTRA_FOLD; the others are split the task's way (module
    docstring). multi_label needs `tags`, the multi-hot rows of `frame` over `classes`.
    """
    frame = frame.copy()
    extra = (frame["source"] != "").to_numpy()
    own = frame[~extra].copy()
    own["split_group"] = split_groups(own)
    report = _split(own, task, n_splits, seed, None if tags is None else tags[~extra], classes)
    if report["groups_spanning_folds"]:
        raise PipelineError(f"folds: {report['groups_spanning_folds']} duplicate groups span folds; "
                            "this is a bug, please report it")
    frame["split_group"], frame["fold"] = EXTRA_FOLD, EXTRA_FOLD
    frame.loc[~extra, ["split_group", "fold"]] = own[["split_group", "fold"]]
    report["extra_rows"] = int(extra.sum())
    return frame, report


def _split(own: pd.DataFrame, task: str, n_splits: int, seed: int, tags: np.ndarray | None,
           classes: list[str] | None) -> dict:
    """Set own['fold'] the task's way (module docstring) and return the fold report."""
    groups = own["split_group"].to_numpy()
    if task == "multi_label":
        own["fold"] = assign_multilabel_folds(tags, n_splits, seed, groups)
        report = fold_report(own, tags=tags)
        share = pd.DataFrame(tags, columns=classes).groupby(own["fold"].to_numpy()).mean()
        share.loc["all"] = tags.mean(0)
        log.info("folds: tag frequency per fold\n" + share.to_string(float_format=lambda v: f"{v:.3f}"))
        return report
    if task == "regression":
        bins = strata(own["y"].to_numpy(np.float64), n_splits)
        own["fold"] = assign_folds(own, n_splits, seed, groups, strata=bins)
        return fold_report(own, by=bins)
    counts = own["label"].value_counts()
    check_class_sizes(counts, n_splits)
    small = counts[counts < n_splits]
    if len(small):
        log.warning(f"folds: warning: classes with fewer samples than folds ({n_splits}): "
              f"{ {k: int(v) for k, v in small.items()} }; some folds will lack them")
    own["fold"] = assign_folds(own, n_splits, seed, groups)
    return fold_report(own)
