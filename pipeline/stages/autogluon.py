"""AutoGluon stage: the course's baseline ("AutoGluon, 15 lines, 96%") on the pipeline's own folds.

AutoGluon runs in its own environment (requirements-autogluon.txt), so this stage prepares a job
file, runs pipeline/jobs/autogluon_fit.py with that interpreter, and turns its CSV probabilities into
WORK/autogluon/{oof,test}.parquet in the pipeline's schema, with the folds hash and classes: the
ensemble stage then lists AutoGluon on the leaderboard and may blend it. AutoGluon evaluates and
selects checkpoints by the competition's metric (AUTOGLUON_METRICS). A fold finished by an
interrupted run is reused, an unfinished one fitted afresh. Offline (the default,
autogluon.pretrained=false) the backbone comes from a local export of the timm model, because
AutoGluon 1.6 ignores `pretrained=False` and fetches hub weights; online it uses the hub name.

Tasks (pipeline/scoring/tasks.py): single_label is classification; regression and ordinal are AutoGluon
regression problems on the target (ordinal: the grade index, as the pipeline's own models regress it),
their predictions one `pred` column. MultiModalPredictor has no multi-label problem type, so a
multi_label competition is refused in one line.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch

from pipeline.context import Context
from pipeline.core.artifacts import content_key, fingerprint, is_done, read_json, write_json, write_stamp
from pipeline.core.errors import PipelineError
from pipeline.scoring import tasks
from pipeline.scoring.predictions import write_parquet
from pipeline.scoring.tasks import columns, score

log = logging.getLogger(__name__)

SCRIPT = Path(__file__).parents[1] / "jobs" / "autogluon_fit.py"

# competition.metric -> AutoGluon's (eval_metric, validation_metric) for (multiclass, binary) problems.
# MultiModalPredictor validates on no multiclass AUC; log_loss also ranks by the probabilities.
AUTOGLUON_METRICS = {
    "accuracy": {"multiclass": ("accuracy", "accuracy"), "binary": ("accuracy", "accuracy")},
    "log_loss": {"multiclass": ("log_loss", "log_loss"), "binary": ("log_loss", "log_loss")},
    "macro_f1": {"multiclass": ("f1_macro", "f1_macro"), "binary": ("f1_macro", "f1_macro")},
    "roc_auc": {"multiclass": ("roc_auc_ovr", "log_loss"), "binary": ("roc_auc", "roc_auc")},
    # numbers (regression, and ordinal grades regressed like the pipeline's models do; qwk is scored here);
    # MultiModalPredictor validates regression on no mae, so mae selects checkpoints by rmse
    "rmse": {"regression": ("rmse", "rmse")}, "mae": {"regression": ("mae", "rmse")},
    "r2": {"regression": ("r2", "r2")}, "qwk": {"regression": ("rmse", "rmse")},
}


def autogluon_problem(metric: str, n_classes: int, task: str = "single_label") -> dict[str, str]:
    """problem_type, eval_metric and validation_metric of MultiModalPredictor for the competition metric."""
    if task == "multi_label":
        raise PipelineError("autogluon: multi_label tasks are not supported: AutoGluon's MultiModalPredictor has no "
                            "multi-label problem type; blend the pipeline's own models (`make ensemble`)")
    problem = "regression" if task in ("regression", "ordinal") else "binary" if n_classes == 2 else "multiclass"
    eval_metric, validation_metric = AUTOGLUON_METRICS[metric][problem]
    return {"problem_type": problem, "eval_metric": eval_metric, "validation_metric": validation_metric}


def as_probabilities(raw: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """AutoGluon's probability columns in the pipeline's class order, rows summing to 1.

    A class a fold never trained on has no column (probability 0), and CSV rounding leaves sums a
    little off 1: OOF and test rows go through this same step, so blends see both alike.
    """
    proba = raw.reindex(columns=classes, fill_value=0.0).to_numpy(np.float64)
    total = proba.sum(1, keepdims=True)
    if not np.isfinite(proba).all() or (proba < 0).any() or (total <= 0).any():
        raise PipelineError("autogluon: AutoGluon wrote probabilities that are negative, missing or all zero in a row")
    return proba / total


def export_timm(backbone: str, folder: Path, seed: int = 0) -> Path:
    """A folder AutoGluon's timm_image model loads offline: config.json + headless pytorch_model.bin.

    The random initial weights follow `seed`, so a rerun (or a refitted fold) starts from the same ones.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    simple = {k: v for k, v in model.pretrained_cfg.items()
              if isinstance(v, str | int | float | bool | list | tuple | type(None))}
    write_json(folder / "config.json",
               {"architecture": backbone, "num_features": model.num_features, "pretrained_cfg": simple})
    return folder


def job_file(ctx: Context, out: Path, folds: list[int], classes: list[str], fold_key: str) -> Path:
    """The fit script's instructions; fold_key marks which fold folders a rerun may reuse."""
    cfg = ctx.cfg.autogluon
    checkpoint = (cfg.backbone if cfg.pretrained else
                  str(export_timm(cfg.backbone, out / f"timm_{cfg.backbone}", ctx.cfg.train.seed).resolve()))
    source = "the hub (pretrained)" if cfg.pretrained else "a local export (random init, offline)"
    log.info(f"autogluon: backbone {cfg.backbone} from {source}")
    comp = ctx.competition
    job = {"folds_csv": str((ctx.work_dir / "folds.csv").resolve()), "test_ids": comp.test["id"].tolist(),
           "test_paths": comp.test["path"].tolist(), "classes": classes, "folds": folds, "out": str(out.resolve()),
           "presets": cfg.presets, "time_limit": cfg.time_limit, "seed": ctx.cfg.train.seed, "verbosity": 2,
           "fold_key": fold_key, **autogluon_problem(ctx.cfg.competition.metric, len(classes), comp.task),
           "columns": columns(comp.task, classes) if comp.task != "single_label" else classes,
           "hyperparameters": {"model.names": ["timm_image"], "model.timm_image.checkpoint_name": checkpoint,
                               "model.timm_image.image_size": cfg.image_size, "optim.max_epochs": cfg.epochs,
                               "optim.lr": cfg.lr, "env.per_gpu_batch_size": cfg.batch_size, "env.num_workers": 0,
                               "env.num_workers_inference": 0,
                               **({} if torch.cuda.is_available() else {"env.num_gpus": 0})}}
    return write_json(out / "job.json", job)


def to_pipeline_files(ctx: Context, out: Path, classes: list[str], folds_hash: str) -> float:
    """oof_raw.csv / test_raw.csv (AutoGluon's columns) -> oof.parquet / test.parquet (ours)."""
    raw = pd.read_csv(out / "oof_raw.csv", dtype={"id": str})
    truth = pd.read_csv(ctx.work_dir / "folds.csv", dtype={"id": str, "label": str}, keep_default_na=False)
    truth = truth[truth["fold"] >= 0].set_index("id")  # extra rows (fold -1) are never OOF rows; their ids may repeat
    task, sep = ctx.cfg.competition.task, ctx.cfg.competition.label_separator
    cols = columns(task, classes)
    number = task in ("regression", "ordinal")
    proba = raw[["pred"]].to_numpy(np.float64) if number else as_probabilities(raw, classes)
    oof = pd.DataFrame(proba, columns=cols)
    oof.insert(0, "id", raw["id"].to_numpy())
    oof.insert(1, "fold", raw["fold"].to_numpy())
    oof.insert(2, "label", truth.loc[raw["id"], "label"].to_numpy())
    oof.insert(3, "y", truth.loc[raw["id"], "y"].to_numpy())
    test_raw = pd.read_csv(out / "test_raw.csv", dtype={"id": str})
    test = pd.DataFrame(test_raw[["pred"]].to_numpy(np.float64) if number else as_probabilities(test_raw, classes),
                        columns=cols)
    test.insert(0, "id", test_raw["id"].to_numpy())
    metric = ctx.cfg.competition.metric
    value = score(metric, tasks.truth(task, oof, classes, sep), proba)
    meta = {"backbone": f"autogluon/{ctx.cfg.autogluon.backbone}", "classes": classes, "folds_hash": folds_hash,
            "metric": metric, "oof_score": value}
    write_parquet(out / "oof.parquet", oof, meta)
    write_parquet(out / "test.parquet", test, meta)
    return value


def run(ctx: Context) -> dict:
    cfg, out = ctx.cfg.autogluon, ctx.work_dir / "autogluon"
    autogluon_problem(ctx.cfg.competition.metric, 0, ctx.cfg.competition.task)  # multi_label: refused first
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
