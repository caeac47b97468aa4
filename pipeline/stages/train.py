"""Train stage: every experiment on every fold (training/fold.py trains one, under WORK/runs/<experiment>/fold<k>/).

An experiment (core/experiments.py) is a backbone with its own resolved train and model keys; a bare backbone name
is an experiment of that name. A finished run is skipped; an interrupted one resumes. A table of the best metric
per experiment and fold ends the stage, and WORK/experiments.csv is brought up to date.
"""

from __future__ import annotations

import logging

import pandas as pd

from pipeline.context import Context
from pipeline.core.errors import PipelineError
from pipeline.training import distributed, parallel, runtime, schedule
from pipeline.training.fold import folds_to_train

log = logging.getLogger(__name__)


def check(ctx: Context) -> None:
    """Class weights weigh class indices: single_label only, refused before any work (the trainer refuses too)."""
    task = ctx.cfg.competition.task
    if task in ("single_label", "auto"):
        return
    for exp in ctx.selected_experiments():
        if exp.train.class_weights != "none":
            where = "" if exp.train.class_weights == ctx.cfg.train.class_weights else f" (experiment {exp.name})"
            raise PipelineError(f"train.class_weights{where}: for single_label tasks only; this one is {task}; "
                                "set train.class_weights=none")


def run(ctx: Context) -> dict:
    """Every experiment on every fold (the folds stage must be done: pipeline/orchestrate.py runs it first).

    Each run is trained under its lock (training/schedule.py), longest first: a run another process holds is come
    back to at the end. With runtime.parallel_runs=N, N worker processes train the runs first, then this process
    checks each (all up to date, unless a worker died) and prints the table.
    """
    _, world = distributed.setup()
    chosen = [(exp, ctx.for_experiment(exp)) for exp in ctx.selected_experiments()]
    if distributed.is_main():  # one process fills the image caches; the others wait
        for _, ectx in chosen:
            ectx.training_data()
    distributed.barrier()
    shared: dict = {}
    jobs = []
    for exp, ectx in chosen:
        data = ectx.training_data(shared)
        settings = ectx.fold_settings()
        for fold in folds_to_train(ctx.cfg.train.folds, data.n_splits):
            jobs.append(schedule.fold_job(settings, exp.backbone, exp.name, fold, data))
    if world == 1 and not parallel.in_worker():
        workers = ctx.parallel_workers(sum(not job.done() for job in jobs))
        if workers:
            ctx.run_workers("train", workers)
    runtime.set_threads(ctx.cfg.runtime.threads)
    if world > 1 and distributed.is_main():
        log.info(f"train: distributed over {world} processes ({distributed.backend()})")
    done = schedule.run_jobs(jobs, "train", distributed.say, wait=not parallel.in_worker(), locking=world == 1)
    results = {job_key: meta["metric"] for job_key, meta in done.items()}
    if not distributed.is_main() or parallel.in_worker():  # the parent of the workers prints the table
        return results
    table = pd.Series(results).unstack()
    table.columns = [f"fold{k}" for k in table.columns]
    table = table.assign(mean=table.mean(axis=1)).to_string(float_format=lambda v: f"{v:.4f}")
    log.info(f"train: best val {ctx.cfg.competition.metric} per experiment and fold\n{table}")
    ctx.write_experiments_table()
    return results

