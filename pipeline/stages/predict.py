"""Predict stage: out-of-fold and test predictions of every experiment, with batched test-time augmentation
(training/inference.py predicts one experiment; its module doc says how TTA views are chosen and scored).

Each experiment's predictions are made under its lock (runs/<experiment>/.predict.lock, training/schedule.py), so
processes sharing WORK, and the workers of runtime.parallel_runs, each predict different experiments."""

from __future__ import annotations

import logging

from pipeline.context import Context
from pipeline.training import parallel, runtime, schedule
from pipeline.training.inference import is_predicted, predict_experiment

log = logging.getLogger(__name__)


def run(ctx: Context) -> dict:
    """OOF and test predictions of every experiment (after the train stage: pipeline/orchestrate.py runs it first)."""
    runtime.set_threads(ctx.cfg.runtime.threads)
    test_paths, test_ids = list(ctx.competition.test["path"]), ctx.competition.test["id"]
    shared: dict = {}
    jobs = []
    for exp in ctx.selected_experiments():
        ectx = ctx.for_experiment(exp)
        data = ectx.training_data(shared)
        settings = ectx.predict_settings()
        cost = (len(data.frame) + len(test_paths)) * exp.train.image_size ** 2 * max(1, len(exp.predict.tta))
        jobs.append(schedule.Job(exp.name, exp.name, settings.runs_root / exp.name / ".predict.lock", cost,
                                 lambda s=settings, e=exp, d=data: predict_experiment(
                                     s, e.backbone, d, test_ids, test_paths, e.name)["oof_score"],
                                 lambda s=settings, e=exp, d=data: is_predicted(s, d, test_ids, test_paths, e.name)))
    workers = [] if parallel.in_worker() else ctx.parallel_workers(sum(not job.done() for job in jobs))
    if workers:
        ctx.run_workers("predict", workers)
    scores = schedule.run_jobs(jobs, "predict", wait=not parallel.in_worker(), say=log.info)
    if not parallel.in_worker():
        ctx.write_experiments_table()
    return scores

