"""The AutoGluon baseline's files on the pipeline's side: the job file pipeline/jobs/autogluon_fit.py reads
(problem type and metrics for the competition's, the backbone), and its CSV predictions turned into the pipeline's
OOF and test parquet files.

AutoGluon evaluates and selects checkpoints by the competition's metric (AUTOGLUON_METRICS). Offline
(autogluon.pretrained=false) the backbone comes from a local export of the timm model, because AutoGluon 1.6
ignores `pretrained=False` and fetches hub weights; online it uses the hub name. single_label is classification;
regression and ordinal are AutoGluon regression problems on the target (ordinal: the grade index, as the
pipeline's own models regress it), their predictions one `pred` column. MultiModalPredictor has no multi-label
problem type, so a multi_label competition is refused in one line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch

from pipeline.core.artifacts import write_json
from pipeline.core.config import AutoGluonConfig
from pipeline.core.errors import PipelineError
from pipeline.scoring import tasks
from pipeline.scoring.predictions import write_parquet
from pipeline.scoring.tasks import columns, score

log = logging.getLogger(__name__)


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


def write_job(cfg: AutoGluonConfig, out: Path, folds_csv: Path, test: pd.DataFrame, folds: list[int],
              classes: list[str], fold_key: str, *, seed: int, metric: str, task: str) -> Path:
    """The fit script's instructions (out/job.json) for the competition's `test` rows (id, path); fold_key marks
    which fold folders a rerun may reuse."""
    checkpoint = (cfg.backbone if cfg.pretrained else
                  str(export_timm(cfg.backbone, out / f"timm_{cfg.backbone}", seed).resolve()))
    source = "the hub (pretrained)" if cfg.pretrained else "a local export (random init, offline)"
    log.info(f"autogluon: backbone {cfg.backbone} from {source}")
    job = {"folds_csv": str(folds_csv.resolve()), "test_ids": test["id"].tolist(),
           "test_paths": test["path"].tolist(), "classes": classes, "folds": folds, "out": str(out.resolve()),
           "presets": cfg.presets, "time_limit": cfg.time_limit, "seed": seed, "verbosity": 2,
           "fold_key": fold_key, **autogluon_problem(metric, len(classes), task),
           "columns": columns(task, classes) if task != "single_label" else classes,
           "hyperparameters": {"model.names": ["timm_image"], "model.timm_image.checkpoint_name": checkpoint,
                               "model.timm_image.image_size": cfg.image_size, "optim.max_epochs": cfg.epochs,
                               "optim.lr": cfg.lr, "env.per_gpu_batch_size": cfg.batch_size, "env.num_workers": 0,
                               "env.num_workers_inference": 0,
                               **({} if torch.cuda.is_available() else {"env.num_gpus": 0})}}
    return write_json(out / "job.json", job)


def read_results(out: Path, folds_csv: Path, classes: list[str], folds_hash: str, *, task: str, label_separator: str,
                 metric: str, backbone: str) -> float:
    """oof_raw.csv / test_raw.csv (AutoGluon's columns) -> oof.parquet / test.parquet (ours); the OOF score."""
    raw = pd.read_csv(out / "oof_raw.csv", dtype={"id": str})
    truth = pd.read_csv(folds_csv, dtype={"id": str, "label": str}, keep_default_na=False)
    truth = truth[truth["fold"] >= 0].set_index("id")  # extra rows (fold -1) are never OOF rows; their ids may repeat
    sep = label_separator
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
    value = score(metric, tasks.truth(task, oof, classes, sep), proba)
    meta = {"backbone": f"autogluon/{backbone}", "classes": classes, "folds_hash": folds_hash,
            "metric": metric, "oof_score": value}
    write_parquet(out / "oof.parquet", oof, meta)
    write_parquet(out / "test.parquet", test, meta)
    return value
