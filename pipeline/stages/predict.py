"""Predict stage: out-of-fold and test predictions of every experiment, with batched test-time augmentation
(training/inference.py predicts one experiment; its module doc says how TTA views are chosen and scored)."""

from __future__ import annotations

from pipeline.context import Context
from pipeline.training.inference import predict_experiment


def run(ctx: Context) -> dict:
    """OOF and test predictions of every experiment (after the train stage: pipeline/orchestrate.py runs it first)."""
    test_paths = list(ctx.competition.test["path"])
    shared: dict = {}
    scores = {}
    for exp in ctx.selected_experiments():
        ectx = ctx.for_experiment(exp)
        data = ectx.training_data(shared)
        scores[exp.name] = predict_experiment(ectx.predict_settings(), exp.backbone, data, ctx.competition.test["id"],
                                              test_paths, exp.name)["oof_score"]
    ctx.write_experiments_table()
    return scores
