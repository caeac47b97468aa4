"""One experiment's out-of-fold and test predictions, with batched test-time augmentation.

TTA views (training/tta.py) of a batch go through the network together. Each view, all views merged and the
kept views merged are scored on the out-of-fold rows, so the user sees whether a view helps;
`predict.tta_policy=auto` keeps the views that improve OOF. The test set is only predicted, never used to
choose. That choice is made on the OOF rows it is scored on, so the kept views' score is selection-optimistic;
the `nested` figure (tta.nested_views: views chosen on the other folds, applied to each held-out fold) is the
honest one, and predict.json records both (oof_score, oof_score_nested). oof.parquet keeps the views chosen on
all rows, as the test rows do. Writes <runs_root>/<experiment>/{oof,test}.parquet with metadata (classes, folds
hash, TTA), test_folds.parquet (each fold model's test probabilities, column `fold`: pseudo-labels for fold k
must come from fold-k models only; test.parquet is their mean) and the stamp predict.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.core.artifacts import content_key, file_digest, fingerprint, is_done, read_json, write_stamp
from pipeline.core.config import PredictConfig, RuntimeConfig
from pipeline.core.errors import PipelineError
from pipeline.data.cache import decoded_images
from pipeline.scoring import tasks
from pipeline.scoring.predictions import write_parquet
from pipeline.scoring.tasks import score
from pipeline.training import runtime
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.fold import TrainingData, folds_to_train
from pipeline.training.heads import Head, pooled
from pipeline.training.runtime import Runtime
from pipeline.training.tta import choose_views, merge, nested_views, tta_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictSettings:
    """What one experiment's predictions read: its predict and runtime sections, the task, and where files go."""

    predict: PredictConfig
    runtime: RuntimeConfig
    train_folds: list[int] | None  # train.folds: the fold models to use (None: all)
    task: str
    metric: str
    label_separator: str
    runs_root: Path  # WORK/runs
    cache_dir: Path  # WORK/cache: the decoded test images
    max_pixels: int


def view_logits(model: torch.nn.Module, images: np.ndarray, views: list[str], rt: Runtime, norm: dict, batch_size: int,
                seed: int, ranges: dict | None = None) -> np.ndarray:
    """tta_logits under the runtime policy training used (autocast, memory format), so a model trained in
    bf16 channels_last on CUDA is also predicted that way; `ranges` bound the random<k> views (degrees, scale,
    shift)."""
    with rt.autocasting():
        return tta_logits(model, images, views, partial(rt.to_input, norm=norm), batch_size, seed, **(ranges or {}))


def view_table(per_view: np.ndarray, chosen: list[int], views: list[str], y: np.ndarray, metric: str, how: str,
               nested: np.ndarray | None = None, head: Head | None = None) -> dict:
    """OOF score of each view alone, of all views merged, of the kept views merged (chosen on all OOF rows:
    selection-optimistic) and, given `nested` (tta.nested_views), of the views chosen on the other folds."""
    table = {v: score(metric, y, merge(per_view[i:i + 1], how, head)) for i, v in enumerate(views)}
    table["all views"] = score(metric, y, merge(per_view, how, head))
    table[f"kept ({'+'.join(views[i] for i in chosen)})"] = score(metric, y, merge(per_view[chosen], how, head))
    if nested is not None:
        table["kept, nested (chosen on the other folds)"] = score(metric, y, nested)
    return table


def _runs_key(out_dir: Path, folds: list[int]) -> list[tuple[str, str]]:
    """The bytes predict reads of each fold run: best.json (its train key, classes, norm) and the weights."""
    keys = []
    for k in folds:
        files = [out_dir / f"fold{k}" / name for name in ("best.json", "best.safetensors")]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise PipelineError(f"{missing[0]}: not found; run `make train` first")
        keys.append((file_digest(files[0]), file_digest(files[1])))
    return keys


def predict_key(settings: PredictSettings, data: TrainingData, test_ids: pd.Series, test_paths: list[str],
                name: str) -> str:
    """The fingerprint of one experiment's predictions: its fold runs' stamps, the predict keys, the test set.
    The OOF rows and training images are the runs' own inputs; batch_size changes speed, not the probabilities."""
    folds = folds_to_train(settings.train_folds, data.n_splits)
    return fingerprint("predict", _runs_key(settings.runs_root / name, folds),
                       settings.predict.model_dump(exclude={"batch_size"}), settings.metric, test_ids.tolist(),
                       content_key(test_paths))


def is_predicted(settings: PredictSettings, data: TrainingData, test_ids: pd.Series, test_paths: list[str],
                 name: str) -> bool:
    """Whether predict_experiment would skip this experiment (its stamp matches and its files exist)."""
    out_dir = settings.runs_root / name
    outputs = [out_dir / f for f in ("oof.parquet", "test.parquet", "test_folds.parquet")]
    return is_done(out_dir / "predict.json", predict_key(settings, data, test_ids, test_paths, name), outputs)


def predict_experiment(settings: PredictSettings, backbone: str, data: TrainingData, test_ids: pd.Series,
                       test_paths: list[str], name: str | None = None) -> dict:
    """One experiment's predictions (`name` is its folder, default the backbone); skipped when its stamp matches."""
    cfg = settings.predict
    name = name or backbone
    out_dir = settings.runs_root / name
    outputs = [out_dir / f for f in ("oof.parquet", "test.parquet", "test_folds.parquet")]
    folds = folds_to_train(settings.train_folds, data.n_splits)
    fp = predict_key(settings, data, test_ids, test_paths, name)
    if is_done(out_dir / "predict.json", fp, outputs):
        log.info(f"predict: {name} up to date")
        return read_json(out_dir / "predict.json", "rerun `make predict`")
    rt = runtime.from_config(settings.runtime, "classification")  # the policy training used
    frame, classes, views = data.frame, data.classes, cfg.tta
    task, sep = settings.task, settings.label_separator
    oof_parts, test_logits, head = [], [], None
    ranges = {"degrees": cfg.tta_random_degrees, "scale": cfg.tta_random_scale, "shift": cfg.tta_random_shift}
    for k in folds:
        model, meta = load_checkpoint(out_dir / f"fold{k}", data.folds_hash, classes)
        model = rt.prepare(model)
        held = (frame["fold"] == k).to_numpy()
        fold_head = Head.from_meta(meta.get("head"), len(classes))
        oof = view_logits(model, data.images[held], views, rt, meta["norm"], cfg.batch_size, cfg.tta_seed, ranges)
        oof, head = pooled(fold_head, oof)  # numbers: each fold's own scaling applied here
        oof_parts.append((frame[held], oof))
        test_images = decoded_images(settings.cache_dir, test_paths, meta["image_size"], meta["in_chans"], "test",
                                     settings.max_pixels)
        test_logits.append(pooled(fold_head, view_logits(model, test_images, views, rt, meta["norm"],
                                                         cfg.batch_size, cfg.tta_seed, ranges))[0])
    rows = pd.concat([p[0] for p in oof_parts])
    per_view = np.concatenate([p[1] for p in oof_parts], axis=1)
    metric, y = settings.metric, tasks.truth(task, rows, classes, sep)
    head = None if task == "single_label" else head
    chosen = choose_views(per_view, y, metric, cfg.tta_policy, cfg.tta_merge, head)
    merged = merge(per_view[chosen], cfg.tta_merge, head)  # what oof.parquet holds: the views the test rows use
    fold_of = rows["fold"].to_numpy()
    nested, by_fold = (nested_views(per_view, y, fold_of, metric, cfg.tta_policy, cfg.tta_merge, head)
                       if len(np.unique(fold_of)) > 1 else (None, None))
    table = view_table(per_view, chosen, views, y, metric, cfg.tta_merge, nested, head)
    log.info(f"predict: {name} OOF {metric} by TTA view ({cfg.tta_merge} merge): "
             + ", ".join(f"{k} {v:.4f}" for k, v in table.items()))
    per_fold = [merge(lg[chosen], cfg.tta_merge, head) for lg in test_logits]
    test_proba = np.mean(per_fold, axis=0)  # mean over fold models
    meta = {"experiment": name, "backbone": backbone, "classes": classes, "folds_hash": data.folds_hash,
            "task": task, "folds": folds, "tta": [views[i] for i in chosen], "tta_candidates": views,
            "tta_merge": cfg.tta_merge,
            "metric": metric, "oof_score": score(metric, y, merged), "view_scores": table,
            "oof_score_nested": None if nested is None else score(metric, y, nested),
            "tta_by_fold": None if by_fold is None else {str(k): [views[i] for i in v] for k, v in by_fold.items()}}
    cols = tasks.columns(task, classes)
    oof = pd.DataFrame(merged, columns=cols)
    oof.insert(0, "id", rows["id"].to_numpy())
    oof.insert(1, "fold", rows["fold"].to_numpy())
    oof.insert(2, "label", rows["label"].to_numpy())
    oof.insert(3, "y", rows["y"].to_numpy())
    test = pd.DataFrame(test_proba, columns=cols)
    test.insert(0, "id", test_ids.to_numpy())
    write_parquet(out_dir / "oof.parquet", oof, meta)
    write_parquet(out_dir / "test.parquet", test, meta)
    write_parquet(out_dir / "test_folds.parquet", _per_fold_frame(test_ids, folds, per_fold, cols), meta)
    write_stamp(out_dir / "predict.json", fp, **meta)
    return meta


def _per_fold_frame(ids: pd.Series, folds: list[int], per_fold: list[np.ndarray], cols: list[str]) -> pd.DataFrame:
    """Each fold model's test predictions: id, fold, p_<class> (or pred) (one block of test rows per fold)."""
    frame = pd.DataFrame(np.concatenate(per_fold), columns=cols)
    frame.insert(0, "id", np.tile(ids.to_numpy(), len(folds)))
    frame.insert(1, "fold", np.repeat(folds, len(ids)))
    return frame


def fold_values(run_dir: Path, data: TrainingData, fold: int, task: str, rt: Runtime, batch_size: int = 256
                ) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) numbers on a fold run's held-out rows, no TTA: the class value of highest probability and
    the probability-weighted class value for single_label classes that are numbers (as columns 0 and 1), the
    predicted value (both columns) for regression. `make auto` compares a classifier and a regression of one
    integer label on these."""
    model, meta = load_checkpoint(run_dir, data.folds_hash, data.classes)
    model = rt.prepare(model)
    held = (data.frame["fold"] == fold).to_numpy()
    logits = view_logits(model, data.images[held], ["identity"], rt, meta["norm"], batch_size, 0)
    truth = data.frame.loc[held, "label"].astype(float).to_numpy()
    if task == "single_label":
        values = np.array([float(c) for c in data.classes])
        proba = torch.softmax(torch.from_numpy(np.asarray(logits[0], dtype=np.float32)), dim=1).numpy()
        return np.stack([values[proba.argmax(1)], proba @ values], axis=1), truth
    predicted = pooled(Head.from_meta(meta.get("head"), len(data.classes)), logits)[0][0].reshape(-1)
    return np.stack([predicted, predicted], axis=1), truth
