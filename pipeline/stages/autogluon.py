"""AutoGluon stage: d2l's baseline ("AutoGluon, 15 lines, 96%") on the pipeline's own folds.

AutoGluon runs in its own environment (requirements-autogluon.txt), so this stage prepares a job
file, runs pipeline/jobs/autogluon_fit.py with that interpreter, and turns its CSV probabilities into
WORK/autogluon/{oof,test}.parquet in the pipeline's schema, with the folds hash and classes: the
ensemble stage then lists AutoGluon on the leaderboard and may blend it. A fold finished by an
interrupted run is reused, an unfinished one fitted afresh. The job file, the metrics AutoGluon selects
checkpoints by, the offline backbone export and the conversion of its predictions are
pipeline/training/autogluon.py.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pandas as pd

from pipeline.context import Context
from pipeline.core.artifacts import content_key, fingerprint, is_done, read_json, write_stamp
from pipeline.core.errors import PipelineError
from pipeline.training.autogluon import autogluon_problem, read_results, write_job

log = logging.getLogger(__name__)

SCRIPT = Path(__file__).parents[1] / "jobs" / "autogluon_fit.py"


def job_file(ctx: Context, out: Path, folds: list[int], classes: list[str], fold_key: str) -> Path:
    """The fit script's instructions for this competition; fold_key marks which fold folders a rerun may reuse."""
    comp = ctx.competition
    return write_job(ctx.cfg.autogluon, out, ctx.work_dir / "folds.csv", comp.test, folds, classes, fold_key,
                     seed=ctx.cfg.train.seed, metric=ctx.cfg.competition.metric, task=comp.task)


def to_pipeline_files(ctx: Context, out: Path, classes: list[str], folds_hash: str) -> float:
    """oof_raw.csv / test_raw.csv (AutoGluon's columns) -> oof.parquet / test.parquet (ours)."""
    comp = ctx.cfg.competition
    return read_results(out, ctx.work_dir / "folds.csv", classes, folds_hash, task=comp.task,
                        label_separator=comp.label_separator, metric=comp.metric, backbone=ctx.cfg.autogluon.backbone)


def check(ctx: Context) -> None:
    """AutoGluon has no multi_label problem type: refused before any work (`auto` not yet decided: clean says why)."""
    if ctx.cfg.competition.task != "auto":
        autogluon_problem(ctx.cfg.competition.metric, 0, ctx.cfg.competition.task)


def run(ctx: Context) -> dict:
    cfg, out = ctx.cfg.autogluon, ctx.work_dir / "autogluon"
    check(ctx)
    python = Path(cfg.python)
    if not python.exists():
        raise PipelineError(f"autogluon.python: {python} not found; `make autogluon` creates .venv-autogluon "
                            "from requirements-autogluon.txt")
    stamp = read_json(ctx.work_dir / "folds.json", "run `make folds`")
    folds = cfg.folds if cfg.folds is not None else list(range(stamp["n_splits"]))
    train_paths = pd.read_csv(ctx.work_dir / "folds.csv", dtype=str, keep_default_na=False)["path"]
    test = ctx.competition.test
    # one fold's inputs (AutoGluon reads folds.csv, the train and test images, the test ids); the stage's key adds
    # the folds fitted, so a finished fold is reused when only the list of folds changes
    fold_key = fingerprint("autogluon", stamp["folds_hash"], content_key(train_paths), test["id"].tolist(),
                           content_key(test["path"]), cfg.model_dump(exclude={"python", "folds"}), ctx.cfg.train.seed,
                           ctx.cfg.competition.metric)
    fp = fingerprint(fold_key, folds)
    if is_done(out / "autogluon.json", fp, [out / "oof.parquet", out / "test.parquet"]):
        meta = read_json(out / "autogluon.json", "rerun `make autogluon`")
        log.info(f"autogluon: up to date; OOF {meta['metric']} {meta['oof_score']:.4f}")
        return meta
    job = job_file(ctx, out, folds, stamp["classes"], fold_key)
    result = subprocess.run([str(python), str(SCRIPT), str(job)])
    if result.returncode != 0:
        raise PipelineError(f"autogluon: {SCRIPT.name} failed with exit status {result.returncode} "
                            "(its output is above); run again to continue from the last finished fold")
    value = to_pipeline_files(ctx, out, stamp["classes"], stamp["folds_hash"])
    metric = ctx.cfg.competition.metric
    write_stamp(out / "autogluon.json", fp, metric=metric, oof_score=value, folds=folds)
    log.info(f"autogluon: OOF {metric} {value:.4f} on folds {folds}; {out / 'oof.parquet'} joins the ensemble "
             "leaderboard")
    return {"metric": metric, "oof_score": value}
