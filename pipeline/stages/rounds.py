"""Rounds stage: rounds 2, 3, ... (rounds.plan), each trained with pseudo-labels of the round before.

Round 1 is model.backbones (the train and predict stages). For round r it blends round r-1's
predictions into pseudo-labels (pipeline/scoring/pseudo.py: the fold-k rows come from round r-1's fold-k
models only, unless rounds.plan[i].pseudo.source=all; hard labels, or with pseudo.labels=soft the
blend's probability vectors as targets), writes them to WORK/rounds/round<r>/pseudo.csv (id, path,
label, fold, confidence; soft: the p_ targets) with pseudo.json (thresholds and counts per fold),
then trains and predicts each of the round's experiments like any other: the
fold-k model adds the pseudo rows of fold k to its training rows (training/fold.py: training_rows), never to its
validation rows, so the OOF files hold competition rows only and join the same ensemble. A fold
run's key covers its own pseudo rows, so new pseudo-labels retrain exactly the folds they change.
"""

from __future__ import annotations

import logging
import time

import pandas as pd

from pipeline.context import Context
from pipeline.core import experiments
from pipeline.core.artifacts import fingerprint, read_json, write_csv, write_stamp
from pipeline.core.config import PseudoConfig
from pipeline.core.errors import PipelineError
from pipeline.core.locks import Lock
from pipeline.scoring import pseudo
from pipeline.scoring.metrics import score
from pipeline.scoring.predictions import prob_columns, read_parquet_meta
from pipeline.training import parallel, runtime, schedule
from pipeline.training.fold import folds_to_train
from pipeline.training.inference import predict_experiment

log = logging.getLogger(__name__)


def _read_round(ctx: Context, names: list[str], folds_hash: str, source: str) -> tuple[list, list]:
    """Each experiment's OOF frame and its test predictions: test_folds.parquet (source fold) or test.parquet."""
    oofs, tests = [], []
    test_file = "test_folds.parquet" if source == "fold" else "test.parquet"
    for name in names:
        folder = ctx.work_dir / "runs" / name
        files = [folder / "oof.parquet", folder / test_file]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise PipelineError(f"{missing[0]}: not found; run `make predict` (every experiment) before `make rounds`")
        if read_parquet_meta(files[0]).get("folds_hash") != folds_hash:
            raise PipelineError(f"{files[0]}: made on another split; rerun `make predict`")
        oofs.append(pd.read_parquet(files[0]))
        tests.append(pd.read_parquet(files[1]))
    return oofs, tests


def build_pseudo(ctx: Context, names: list[str], cfg: PseudoConfig, folds: list[int],
                 stamp: dict) -> tuple[pd.DataFrame, dict[int, float], float]:
    """The pseudo rows the next round's fold models learn from, made from the experiments `names`; each fold's
    threshold; the OOF score of their blend."""
    classes = stamp["classes"]
    oofs, tests = _read_round(ctx, names, stamp["folds_hash"], cfg.source)
    oof = pseudo.blend_oof(oofs, classes)
    if cfg.source == "fold":
        per_fold = {k: pseudo.blend_test(tests, classes, k) for k in folds}
    else:  # the naive variant: every fold model learns from the all-fold ensemble
        everyone = pseudo.blend_test(tests, classes, None)
        per_fold = dict.fromkeys(folds, everyone)
    test = ctx.competition.test
    paths = pd.Series(test["path"].to_numpy(), index=test["id"].astype(str).to_numpy())
    for k in per_fold:
        per_fold[k].index = per_fold[k].index.astype(str)
    rows, thresholds = pseudo.make_pseudo(oof, per_fold, classes, paths, cfg.threshold, cfg.target_precision,
                                          cfg.max_per_class, cfg.labels, cfg.temperature)
    blend_score = score(ctx.cfg.competition.metric, oof["y"].to_numpy(), oof[prob_columns(classes)].to_numpy())
    return rows, thresholds, blend_score


def check(ctx: Context) -> None:
    """Pseudo-label rounds need a single_label task (`auto` not yet decided: the reader says why in clean)."""
    task = ctx.cfg.competition.task
    if ctx.cfg.rounds.plan and task not in ("single_label", "auto"):
        raise PipelineError(f"rounds.plan: pseudo-label rounds are for single_label tasks only, this one is "
                            f"{task}; set rounds.plan=[]")


def run(ctx: Context) -> dict:
    """Every configured round after round 1, in order (after the predict stage: pipeline/orchestrate.py)."""
    check(ctx)
    plan = ctx.cfg.rounds.plan
    if not plan:
        return {}
    workers = ctx.parallel_workers(ctx.cfg.runtime.parallel_runs)  # a round has several runs: start them all
    if workers:
        ctx.run_workers("rounds", workers)
    runtime.set_threads(ctx.cfg.runtime.threads)
    cfg = ctx.cfg
    stamp = read_json(ctx.work_dir / "folds.json", "run `make folds`")
    folds = folds_to_train(cfg.train.folds, stamp["n_splits"])
    previous = [e.name for e in experiments.resolve(cfg.model, cfg.train, cfg.predict)]
    test_paths = list(ctx.competition.test["path"])
    results = {}
    for r, (spec, exps) in enumerate(zip(plan, experiments.round_experiments(cfg.model, cfg.train, cfg.predict, plan),
                                         strict=True), start=2):
        started = time.perf_counter()
        folder = ctx.work_dir / "rounds" / f"round{r}"
        with Lock(ctx.lock_path(f"rounds-round{r}"), "rounds", log.info):  # pseudo.csv: one writer at a time
            rows, thresholds, blend_score = build_pseudo(ctx, previous, spec.pseudo, folds, stamp)
            write_csv(folder / "pseudo.csv", rows)
            counts = rows.groupby("fold").size().reindex(folds, fill_value=0)
            write_stamp(folder / "pseudo.json", fingerprint(rows.to_numpy().tolist()), round=r, made_from=previous,
                        source=spec.pseudo.source, labels=spec.pseudo.labels,
                        thresholds={str(k): t for k, t in thresholds.items()},
                        rows_per_fold={str(k): int(n) for k, n in counts.items()}, previous_blend_oof=blend_score)
        log.info(f"rounds: round {r}: pseudo-labels from {'+'.join(previous)} ({spec.pseudo.source} source, previous "
              f"blend OOF {cfg.competition.metric} {blend_score:.4f}): "
              + ", ".join(f"fold {k} {counts[k]} rows at >= {thresholds[k]:.4f}" for k in folds))
        shared: dict = {}
        trainings, predictions = [], []
        for exp in exps:
            ectx = ctx.for_experiment(exp)
            plain = ectx.training_data(shared)
            data = ectx.with_pseudo(plain, rows)
            settings = ectx.fold_settings()
            trainings += [schedule.fold_job(settings, exp.backbone, exp.name, k, data) for k in folds]
            psettings = ectx.predict_settings()
            predictions.append(schedule.Job(
                exp.name, exp.name, psettings.runs_root / exp.name / ".predict.lock", len(folds),
                lambda s=psettings, e=exp, d=plain: predict_experiment(s, e.backbone, d, ctx.competition.test["id"],
                                                                       test_paths, e.name)["oof_score"]))
        # every process (workers too) waits for the round's runs: the next round's pseudo-labels need all of them
        schedule.run_jobs(trainings, "rounds", log.info)
        results.update(schedule.run_jobs(predictions, "rounds", log.info))
        log.info(f"rounds: round {r} done in {time.perf_counter() - started:.1f} s: OOF {cfg.competition.metric} "
              + ", ".join(f"{e.name} {results[e.name]:.4f}" for e in exps))
        previous = [e.name for e in exps]
    if not parallel.in_worker():
        ctx.write_experiments_table()
    return results
