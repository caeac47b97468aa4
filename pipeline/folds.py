"""Folds stage: StratifiedGroupKFold with duplicate groups as groups, so no group spans two folds.

Writes folds.csv (clean.csv plus a `fold` column) and the stamp folds.json, whose `folds_hash`
every later artifact records: training and ensembling refuse predictions made on another split.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from . import clean
from .artifacts import file_digest, fingerprint, is_done, read_json, write_csv, write_stamp
from .context import Context
from .errors import PipelineError


def assign_folds(frame: pd.DataFrame, n_splits: int, seed: int) -> np.ndarray:
    """Fold index per row; rows sharing a `group` always share a fold."""
    if frame["group"].nunique() < n_splits:
        raise PipelineError(f"folds.n_splits={n_splits} but only {frame['group'].nunique()} distinct images; lower folds.n_splits")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold = np.full(len(frame), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small-class warning is ours to print (below)
        for k, (_, held) in enumerate(splitter.split(frame, frame["y"], frame["group"])):
            fold[held] = k
    return fold


def fold_report(frame: pd.DataFrame) -> dict:
    """Per-fold sizes and the largest gap between a fold's class share and the overall share."""
    overall = frame["y"].value_counts(normalize=True)
    share = frame.groupby("fold")["y"].value_counts(normalize=True).unstack(fill_value=0.0)
    deviation = float((share - overall.reindex(share.columns)).abs().to_numpy().max())
    groups_per_fold = frame.groupby("group")["fold"].nunique()
    return {"sizes": frame["fold"].value_counts().sort_index().tolist(), "max_class_share_deviation": round(deviation, 4),
            "groups_spanning_folds": int((groups_per_fold > 1).sum())}


def run(ctx: Context) -> dict:
    clean.run(ctx)
    stamp = ctx.work_dir / "folds.json"
    cfg = ctx.cfg.folds
    fp = fingerprint("folds", file_digest(ctx.work_dir / "clean.csv"), cfg.model_dump())
    if is_done(stamp, fp):
        print(f"folds: up to date ({stamp})")
        return {"skipped": True, "folds_hash": fp}
    frame = pd.read_csv(ctx.work_dir / "clean.csv", dtype={"id": str, "label": str}, keep_default_na=False)
    small = frame["label"].value_counts()
    small = small[small < cfg.n_splits]
    if len(small):
        print(f"folds: warning: classes with fewer samples than folds ({cfg.n_splits}): {dict(small)}; some folds will lack them")
    frame["fold"] = assign_folds(frame, cfg.n_splits, cfg.seed)
    report = fold_report(frame)
    if report["groups_spanning_folds"]:
        raise PipelineError(f"folds: {report['groups_spanning_folds']} duplicate groups span folds; this is a bug, please report it")
    write_csv(ctx.work_dir / "folds.csv", frame)
    classes = read_json(ctx.work_dir / "clean.json")["classes"]
    write_stamp(stamp, fp, folds_hash=fp, n_splits=cfg.n_splits, classes=classes, **report)
    print(f"folds: {cfg.n_splits} folds, sizes {report['sizes']}, max class-share deviation {report['max_class_share_deviation']}")
    return {"folds_hash": fp, **report}
