"""Folds stage: StratifiedGroupKFold with duplicate groups as groups, so no group spans two folds
(pipeline/data/splits.py does the splitting).

Reads WORK/clean.csv, written by the clean stage (pipeline/stages/clean.py). Groups are its duplicate groups,
merged with `competition.group_column` (e.g. a patient id) when set. Writes folds.csv (clean.csv plus
`split_group`, `fold` and `folds_hash` columns) and the stamp folds.json, whose `folds_hash` every later
artifact records: training and ensembling refuse predictions made on another split.

Extra rows (clean.csv rows with a `source`, from `competition.extra`) stay in folds.csv with fold -1:
never a validation fold, so every fold's training set (`fold != k`) includes them and no OOF row
(`fold == k`) is one of them. Keeping them in the one table, rather than in a side file, means every
consumer (train, predict, tune, autogluon) already gets the split right from the fold column alone;
the competition's rows are split exactly as without extra data (the extra rows are left out of the
splitter), so CV scores with and without extra data compare on the same folds.

Per task (pipeline/scoring/tasks.py): single_label and ordinal stratify on the class (grade); regression on the
target binned into quantiles; multi_label with iterative stratification on whole groups (the stage gives
pipeline/data/splits.py the multi-hot tags).
"""

from __future__ import annotations

import logging

import pandas as pd

from pipeline.context import Context
from pipeline.core.artifacts import file_digest, fingerprint, is_done, read_json, write_csv, write_stamp
from pipeline.core.errors import PipelineError
from pipeline.data import splits
from pipeline.data.quality import clean_csv
from pipeline.scoring import tasks

log = logging.getLogger(__name__)


def run(ctx: Context) -> dict:
    stamp = ctx.work_dir / "folds.json"
    cfg = ctx.cfg.folds
    classes = read_json(ctx.work_dir / "clean.json", "run `make clean-data`")["classes"]
    task, sep = ctx.cfg.competition.task, ctx.cfg.competition.label_separator
    key = [] if task == "single_label" else [task, sep]  # single_label: the key it always had
    clean = clean_csv(ctx.work_dir)  # the clean stage's
    fp = fingerprint("folds", file_digest(clean), classes, cfg.model_dump(), *key)  # all it reads
    if is_done(stamp, fp, [ctx.work_dir / "folds.csv"]):
        log.info(f"folds: up to date ({stamp})")
        return {"skipped": True, "folds_hash": fp}
    frame = pd.read_csv(clean, dtype={"id": str, "label": str, "user_group": str, "source": str},
                        keep_default_na=False)
    if "source" not in frame.columns:
        raise PipelineError(f"{clean}: written by an older version (no 'source' column); "
                            "rerun `make clean-data`")
    tags = tasks.multi_hot(frame["label"], classes, sep) if task == "multi_label" else None
    frame, report = splits.make_folds(frame, task, cfg.n_splits, cfg.seed, tags, classes)
    frame["folds_hash"] = fp
    write_csv(ctx.work_dir / "folds.csv", frame)
    write_stamp(stamp, fp, folds_hash=fp, n_splits=cfg.n_splits, classes=classes, task=task, **report)
    note = (f"; {report['extra_rows']} extra rows in every fold's training set (fold {splits.EXTRA_FOLD})"
            if report["extra_rows"] else "")
    what = {"multi_label": "tag-frequency", "regression": "target-bin share"}.get(task, "class-share")
    log.info(f"folds: {cfg.n_splits} folds, sizes {report['sizes']}, "
          f"max {what} deviation {report['max_class_share_deviation']}{note}")
    return {"folds_hash": fp, **report}
