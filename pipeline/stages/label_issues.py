"""Labels stage: label issues found by confident learning on the chosen blend's out-of-fold probabilities.

Runs after the ensemble stage on WORK/ensemble/oof.parquet (the chosen blend's honest OOF probabilities, one
row per competition training row; pipeline/stages/ensemble.py). pipeline/scoring/label_issues.py finds the rows
whose given label is probably wrong (cleanlab's `filter.find_label_issues`); each gets the blend's most likely
class as its suggested label.

Writes label_issues.csv (id, path, given_label, suggested_label, self_confidence, rank: 1 = least confident
in its given label), report/labels.html (thumbnails, given vs suggested, with the duplicate group) and the
stamp labels.json, keyed by the OOF file's bytes, folds.csv (paths, groups) and the stage's keys. Prints the
blend's OOF score against the given labels and against the given labels without the flagged rows.

`clean.label_issues` (report, drop, relabel) says what the next clean run does with the list
(pipeline/stages/clean.py reads it, pipeline/data/quality.py's `apply_label_issues` applies it). After drop or
relabel, the models are trained on cleaned labels, and a fresh search on their OOF would rank only what is left,
so the list would replace itself round after round (and a row relabelled once would get its given label back
when a later list no longer names it). So the list is found once, on models trained on the given labels: while
clean has applied this very file, the stage keeps it and prints the CV against the labels trained on and
against the given ones. Delete the file (or set `clean.label_issues=report`) to search again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cleanlab
import numpy as np
import pandas as pd

from pipeline.context import Context
from pipeline.core.artifacts import (
    file_digest,
    fingerprint,
    is_done,
    read_json,
    read_stamp,
    write_csv,
    write_stamp,
)
from pipeline.core.errors import PipelineError
from pipeline.data.report import write_labels_report
from pipeline.scoring.label_issues import (
    COLUMNS,
    issues_table,
    label_issues_csv,
    scores_cleaned_and_given,
    scores_without_flagged,
)
from pipeline.scoring.predictions import prob_columns, read_parquet_meta

log = logging.getLogger(__name__)

WARN_SHARE = 0.1  # more rows flagged than this: the model, more likely than the labels, is poor (said in the output)


def _read_oof(ctx: Context) -> tuple[pd.DataFrame, np.ndarray, list[str], Path]:
    path = ctx.work_dir / "ensemble" / "oof.parquet"
    if not path.exists():
        raise PipelineError(f"{path}: not found; run `make ensemble` first")
    classes = read_parquet_meta(path).get("classes") or []
    oof = pd.read_parquet(path)
    cols = prob_columns(classes)
    if not classes or any(c not in oof.columns for c in cols + ["id", "label", "y"]):
        raise PipelineError(f"{path}: not the ensemble stage's OOF file (columns id, label, y, p_<class>); "
                            "rerun `make ensemble`")
    oof["id"] = oof["id"].astype(str)
    return oof, oof[cols].to_numpy(dtype=np.float64), classes, path


def _applied(ctx: Context) -> bool:
    """Whether the models were trained on labels cleaned with this very label_issues.csv (see the module doc)."""
    issues = label_issues_csv(ctx.work_dir)
    clean_meta = read_stamp(ctx.work_dir / "clean.json") or {}
    return (ctx.cfg.clean.label_issues != "report" and issues.exists()
            and clean_meta.get("label_issues_applied") == file_digest(issues))


def _print_applied(ctx: Context, oof: pd.DataFrame, proba: np.ndarray) -> dict:
    """The CV against the labels the models were trained on and against the competition's given labels."""
    metric, issues = ctx.cfg.competition.metric, label_issues_csv(ctx.work_dir)
    given = oof["id"].map(ctx.competition.train.set_index("id")["label"])
    cleaned, on_given = scores_cleaned_and_given(metric, oof, proba, given, ctx.competition.class_index)
    log.info(f"labels: the models were trained with {issues} applied (clean.label_issues={ctx.cfg.clean.label_issues}),"
          f" so the list is kept (delete it to search again); OOF {metric} {cleaned:.4f} against the cleaned labels, "
          f"{on_given:.4f} against the given labels ({int((given != oof['label']).sum())} rows differ; "
          "a CV against cleaned labels is not comparable with one against given labels)")
    return {"applied": True, "cv_cleaned": cleaned, "cv_given": on_given}


def check(ctx: Context) -> None:
    """Confident learning needs a single_label task (`auto` not yet decided: the reader says why in clean)."""
    task = ctx.cfg.competition.task
    if task not in ("single_label", "auto"):
        raise PipelineError(f"labels: cleanlab's label issues are for single_label tasks only, this one is {task}")


def run(ctx: Context) -> dict:
    """Write label_issues.csv and report/labels.html from the chosen blend's OOF; skipped when the stamp matches."""
    check(ctx)
    oof, proba, classes, oof_path = _read_oof(ctx)
    if _applied(ctx):
        return _print_applied(ctx, oof, proba)
    folds_csv, metric = ctx.work_dir / "folds.csv", ctx.cfg.competition.metric
    work = ctx.work_dir
    out, page, stamp = label_issues_csv(work), work / "report" / "labels.html", work / "labels.json"
    fp = fingerprint("labels", file_digest(oof_path), file_digest(folds_csv), cleanlab.__version__, metric,
                     ctx.cfg.clean.report_groups)
    if is_done(stamp, fp, [out, page]):
        meta = read_json(stamp, "rerun `make labels`")
        log.info(f"labels: up to date; {meta['flagged']} rows flagged ({out}); report {page}")
        return meta
    folds = pd.read_csv(folds_csv, dtype={"id": str})
    table = issues_table(oof, proba, classes, folds)
    scores = scores_without_flagged(metric, oof, proba, table)
    write_csv(out, table[COLUMNS + (["group"] if "group" in table.columns else [])])
    write_labels_report(page, table, len(oof), ctx.cfg.clean.report_groups)
    meta = {"flagged": len(table), "rows": len(oof), "metric": metric, **scores}
    write_stamp(stamp, fp, **meta)
    except_flagged = "n/a" if scores["cv_given_except_flagged"] is None else f"{scores['cv_given_except_flagged']:.4f}"
    log.info(f"labels: {len(table)} of {len(oof)} rows flagged ({out}); OOF {metric} {scores['cv_given']:.4f} against "
          f"the given labels, {except_flagged} without the flagged rows; report {page}")
    if len(table) > WARN_SHARE * len(oof):
        log.warning(f"labels: warning: {len(table) / len(oof):.0%} of the rows flagged; confident learning trusts the "
              "OOF probabilities, a weak model flags good labels: check the CV before clean.label_issues=drop|relabel")
    return meta
