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
from pipeline.training import distributed, runtime
from pipeline.training.fold import folds_to_train, train_fold

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
    """Every experiment on every fold (the folds stage must be done: pipeline/orchestrate.py runs it first)."""
    _, world = distributed.setup()
    chosen = [(exp, ctx.for_experiment(exp)) for exp in ctx.selected_experiments()]
    if distributed.is_main():  # one process fills the image caches; the others wait
        for _, ectx in chosen:
            ectx.training_data()
    distributed.barrier()
    runtime.set_threads(ctx.cfg.runtime.threads)
    if world > 1 and distributed.is_main():
        log.info(f"train: distributed over {world} processes ({distributed.backend()})")
    shared: dict = {}
    results = {}
    for exp, ectx in chosen:
        data = ectx.training_data(shared)
        settings = ectx.fold_settings()
        for fold in folds_to_train(ctx.cfg.train.folds, data.n_splits):
            results[(exp.name, fold)] = train_fold(settings, exp.backbone, fold, data, name=exp.name)["metric"]
    if not distributed.is_main():
        return results
    table = pd.Series(results).unstack()
    table.columns = [f"fold{k}" for k in table.columns]
    table = table.assign(mean=table.mean(axis=1)).to_string(float_format=lambda v: f"{v:.4f}")
    log.info(f"train: best val {ctx.cfg.competition.metric} per experiment and fold\n{table}")
    ctx.write_experiments_table()
    return results
