"""Tune stage: an Optuna study over any config keys, scored by short trainings on chosen folds.

Each trial takes the resolved config, sets the sampled keys, trains `tune.epochs` epochs on each
of `tune.folds` (under WORK/tune/trials/, not WORK/runs) and reports the val metric after every
epoch, so the pruner can stop bad trials early. The search space is checked against the config
before the study starts. Trials that diverge (non-finite training loss) or run out of memory are
recorded as failed and the study goes on; a config error or a bug stops the study with its message.
The study lives in SQLite (WORK/optuna.db) by default, or in any database SQLAlchemy reaches
(`tune.storage: postgresql://user@host/db`, `make tune STORAGE=... JOBS=...`, on one machine or
several): run it again and it continues; several processes on the same storage share it, and
together they finish exactly `tune.n_trials` completed and pruned trials (tuning.claim). Writes
WORK/tune/best.yaml (the best parameters as a partial config, which later stages merge unless
USE_TUNED=0), trials.csv and plots. The Optuna machinery is pipeline/training/tuning.py; this
module builds the objective from the context (training data, fold settings) and writes the artifacts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import optuna
import pandas as pd
import yaml

from pipeline.context import Context
from pipeline.core.artifacts import content_key, fingerprint, read_json, write_csv, write_text
from pipeline.core.config import Config, read_yaml
from pipeline.core.errors import PipelineError
from pipeline.scoring import tasks
from pipeline.stages import train
from pipeline.training import tuning
from pipeline.training.fold import train_fold
from pipeline.training.tuning import TrainFn, as_tree

log = logging.getLogger(__name__)


def train_trial(ctx: Context, trial_dir: Path) -> TrainFn:
    """The real objective: short trainings on tune.folds, reporting every epoch."""

    def fn(cfg: Config, report: Callable[[int, float], None]) -> float:
        trial_ctx = Context(cfg, ctx.data_dir, ctx.work_dir, ctx.submissions_dir)
        shared: dict = {}
        scores = []
        for i, fold in enumerate(ctx.cfg.tune.folds):
            for exp in trial_ctx.selected_experiments():  # each with its own resolved keys
                exp_ctx = trial_ctx.for_experiment(exp)
                data = exp_ctx.training_data(shared)

                def on_epoch(epoch: int, value: float, i: int = i) -> None:
                    report(i * cfg.train.epochs + epoch, value)

                meta = train_fold(exp_ctx.fold_settings(trial_dir, "tune"), exp.backbone, fold, data,
                                  on_epoch=on_epoch, name=exp.name)
                scores.append(meta["metric"])
        return float(sum(scores) / len(scores))

    return fn


def study_name(ctx: Context) -> str:
    """<competition>-<key of what the trials read>: the split, the training images' bytes, the config the trials start
    from, the search space and the tune keys but the budget (n_trials, timeout) and the storage. A study continues while
    these stay the same; change one and a new study starts (earlier ones stay in the storage)."""
    cfg, folds = ctx.cfg.tune, read_json(ctx.work_dir / "folds.json", "run `make folds`")
    paths = pd.read_csv(ctx.work_dir / "folds.csv", dtype=str, keep_default_na=False)["path"]
    key = fingerprint("tune", folds["folds_hash"], content_key(paths), ctx.input_channels(), ctx.cfg.competition.metric,
                      ctx.cfg.model.model_dump(),
                      ctx.cfg.train.model_dump(exclude={"folds", "num_workers", "threads", "device"}
                                               | ({"loss"} if ctx.cfg.competition.task == "single_label" else set())),
                      read_yaml(Path(cfg.space)), cfg.model_dump(exclude={"space", "n_trials", "timeout", "storage"}))
    return f"{ctx.name}-{key}"


def open_study(ctx: Context) -> optuna.Study:
    cfg = ctx.cfg.tune
    url = cfg.storage or f"sqlite:///{(ctx.work_dir / 'optuna.db').resolve()}"
    return tuning.open_study(study_name(ctx), url, tasks.greater_is_better(ctx.cfg.competition.metric), cfg.seed,
                             cfg.pruner)  # every task's metric has a direction


def objective(ctx: Context, space: dict, train_fn: TrainFn | None = None) -> Callable[[optuna.Trial], float]:
    """A trial of the study: `train_fn` (a stand-in in tests) or short real trainings on tune.folds."""
    cfg = ctx.cfg.tune
    return tuning.objective(ctx.cfg, space, cfg.n_trials, cfg.epochs, ctx.work_dir / "tune" / "trials",
                            lambda trial_dir: train_fn or train_trial(ctx, trial_dir), ctx.cfg.competition.metric)


def check(ctx: Context) -> None:
    """The search space, the storage URL and what the trials train: refused before the folds are made."""
    cfg = ctx.cfg.tune
    tuning.check_space(tuning.load_space(Path(cfg.space)), ctx.cfg, Path(cfg.space))
    if cfg.storage is not None:
        tuning.check_storage(cfg.storage)
    train.check(ctx)


def run(ctx: Context, train_fn: TrainFn | None = None) -> dict:
    """Run (or continue) the study up to tune.n_trials, then write best.yaml, trials.csv and plots.

    Only completed and pruned trials count toward tune.n_trials: failed ones (and ones a killed
    process left running) are retried, so a rerun after a fix still runs the whole budget. A run
    stops after tune.n_trials failed trials in a row, and fails when no trial ever completed.
    """
    cfg = ctx.cfg.tune
    check(ctx)
    space = tuning.load_space(Path(cfg.space))
    ctx.work_dir.mkdir(parents=True, exist_ok=True)  # the folds it trains on come first (pipeline/orchestrate.py)
    study = open_study(ctx)
    done, taken = tuning.claimed(study)
    log.info(f"tune: study '{study.study_name}' has {done} finished trials ({taken - done} running); running up to "
          f"{cfg.n_trials} ({cfg.pruner} pruner, seed {cfg.seed})")
    if done < cfg.n_trials:  # running trials may be a killed worker's: `claim` waits until their heartbeat is stale
        tuning.optimize(study, objective(ctx, space, train_fn), cfg.n_trials, cfg.timeout)
    return write_results(ctx, study)


def write_results(ctx: Context, study: optuna.Study) -> dict:
    out = ctx.work_dir / "tune"
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration"))
    write_csv(out / "trials.csv", frame)
    states = frame["state"].value_counts().to_dict() if len(frame) else {}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        reasons = sorted({t.user_attrs["fail_reason"].splitlines()[0][:160] for t in study.trials
                          if "fail_reason" in t.user_attrs})
        why = f"; failures: {' | '.join(reasons)}" if reasons else ""
        raise PipelineError(f"tune: no trial completed ({states}){why}; best.yaml not written")
    best = study.best_trial
    header = (f"# Best of {len(study.trials)} trials (trial {best.number}, "
              f"{ctx.cfg.competition.metric} {best.value:.4f}).\n")
    write_text(out / "best.yaml", header + "# Merged into later stages' config; USE_TUNED=0 ignores it.\n" +
               yaml.safe_dump(as_tree(best.params), sort_keys=True))
    plots = tuning.write_plots(study, out)
    log.info(f"tune: trials by state {states}; best trial {best.number}: {best.value:.4f} {json.dumps(best.params)}")
    log.info(f"tune: wrote {out / 'best.yaml'}, {out / 'trials.csv'} and {len(plots)} plots")
    return {"states": states, "best_value": best.value, "best_params": best.params, "plots": plots}


