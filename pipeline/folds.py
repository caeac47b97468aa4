"""Folds stage: StratifiedGroupKFold with duplicate groups as groups, so no group spans two folds.

Groups are the clean stage's duplicate groups, merged with `competition.group_column` (e.g. a
patient id) when set. Writes folds.csv (clean.csv plus `split_group`, `fold` and `folds_hash`
columns) and the stamp folds.json, whose `folds_hash`
every later artifact records: training and ensembling refuse predictions made on another split.

Extra rows (clean.csv rows with a `source`, from `competition.extra`) stay in folds.csv with fold -1:
never a validation fold, so every fold's training set (`fold != k`) includes them and no OOF row
(`fold == k`) is one of them. Keeping them in the one table, rather than in a side file, means every
consumer (train, predict, tune, autogluon) already gets the split right from the fold column alone;
the competition's rows are split exactly as without extra data (the extra rows are left out of the
splitter), so CV scores with and without extra data compare on the same folds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from . import dedup
from .artifacts import file_digest, fingerprint, is_done, read_json, write_csv, write_stamp
from .context import Context
from .errors import PipelineError

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


def assign_folds(frame: pd.DataFrame, n_splits: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Fold index per row; rows sharing a group (default: the `group` column) always share a fold."""
    groups = frame["group"].to_numpy() if groups is None else groups
    if len(np.unique(groups)) < n_splits:
        n = len(np.unique(groups))
        raise PipelineError(f"folds.n_splits={n_splits} but the images form only {n} independent groups "
                            f"(duplicates and competition.group_column keep a group in one fold): "
                            + (f"set folds.n_splits={n} or fewer" if n >= 2 else "add images"))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold = np.full(len(frame), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small-class warning is ours to print (below)
        for k, (_, held) in enumerate(splitter.split(frame, frame["y"], groups)):
            fold[held] = k
    return fold


def fold_report(frame: pd.DataFrame) -> dict:
    """Per-fold sizes and the largest gap between a fold's class share and the overall share."""
    overall = frame["y"].value_counts(normalize=True)
    share = frame.groupby("fold")["y"].value_counts(normalize=True).unstack(fill_value=0.0)
    deviation = float((share - overall.reindex(share.columns)).abs().to_numpy().max())
    groups_per_fold = frame.groupby("split_group" if "split_group" in frame else "group")["fold"].nunique()
    return {"sizes": frame["fold"].value_counts().sort_index().tolist(),
            "max_class_share_deviation": round(deviation, 4),
            "groups_spanning_folds": int((groups_per_fold > 1).sum())}


def run(ctx: Context) -> dict:
    stamp = ctx.work_dir / "folds.json"
    cfg = ctx.cfg.folds
    classes = read_json(ctx.work_dir / "clean.json", "run `make clean-data`")["classes"]
    fp = fingerprint("folds", file_digest(ctx.work_dir / "clean.csv"), classes, cfg.model_dump())  # all it reads
    if is_done(stamp, fp, [ctx.work_dir / "folds.csv"]):
        print(f"folds: up to date ({stamp})")
        return {"skipped": True, "folds_hash": fp}
    frame = pd.read_csv(ctx.work_dir / "clean.csv", dtype={"id": str, "label": str, "user_group": str, "source": str},
                        keep_default_na=False)
    if "source" not in frame.columns:
        raise PipelineError(f"{ctx.work_dir / 'clean.csv'}: written by an older version (no 'source' column); "
                            "rerun `make clean-data`")
    extra = (frame["source"] != "").to_numpy()
    own = frame[~extra].copy()
    counts = own["label"].value_counts()
    check_class_sizes(counts, cfg.n_splits)
    small = counts[counts < cfg.n_splits]
    if len(small):
        print(f"folds: warning: classes with fewer samples than folds ({cfg.n_splits}): "
              f"{ {k: int(v) for k, v in small.items()} }; some folds will lack them")
    own["split_group"] = split_groups(own)
    own["fold"] = assign_folds(own, cfg.n_splits, cfg.seed, own["split_group"].to_numpy())
    report = fold_report(own)
    if report["groups_spanning_folds"]:
        raise PipelineError(f"folds: {report['groups_spanning_folds']} duplicate groups span folds; "
                            "this is a bug, please report it")
    frame["split_group"], frame["fold"] = EXTRA_FOLD, EXTRA_FOLD
    frame.loc[~extra, ["split_group", "fold"]] = own[["split_group", "fold"]]
    frame["folds_hash"] = fp
    report["extra_rows"] = int(extra.sum())
    write_csv(ctx.work_dir / "folds.csv", frame)
    write_stamp(stamp, fp, folds_hash=fp, n_splits=cfg.n_splits, classes=classes, **report)
    note = (f"; {report['extra_rows']} extra rows in every fold's training set (fold {EXTRA_FOLD})"
            if extra.any() else "")
    print(f"folds: {cfg.n_splits} folds, sizes {report['sizes']}, "
          f"max class-share deviation {report['max_class_share_deviation']}{note}")
    return {"folds_hash": fp, **report}
