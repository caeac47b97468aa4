"""The detect stage's second stage (detect.classifier.enabled): a crop classifier renames the fused boxes.

Crops of the training images' ground-truth boxes (pipeline/detection/crops.py) become a classification set whose
folds are the detector's (a crop belongs to its image's fold), trained by the classification track's fold
training under WORK/detect/crops/runs/<backbone>/fold<k> (resumed, skipped when its key matches). Fold k's
classifier names the fused OOF boxes of fold k's images, so no box is named by a model that saw its image; the mean
of the fold classifiers names the holdout and test boxes. The rule that combines classifier and detector (its
weight, and a class-agnostic merge of the boxes before renaming) is chosen on OOF mAP@0.5; the nested figure
(each fold's rule chosen on the other folds) is the honest one. The classifier's probabilities are cached in
WORK/detect/crops/probs.pt, keyed by the fold runs and the boxes they name.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.context import Context
from pipeline.core.artifacts import atomic_write, fingerprint, is_done, write_csv, write_stamp
from pipeline.core.config import ModelConfig, to_yaml
from pipeline.detection.crops import (
    agnostic_merge,
    choose_rule,
    combine,
    crop,
    ranked,
    rule_name,
    training_crops,
    with_votes,
)
from pipeline.detection.data import Arrays
from pipeline.detection.ensemble import map_or_nan, prefixed
from pipeline.detection.infer import class_table
from pipeline.training import runtime
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.fold import FoldSettings, TrainingData, run_key, train_fold
from pipeline.training.inference import view_logits

log = logging.getLogger(__name__)
CROP_BATCH = 256  # crops per forward pass (with their views); the bundle's rename step uses the same


@dataclass
class Renamed:
    """The second stage's result: the chosen rule's OOF, holdout and test detections, its leaderboard rows, the
    per-class table of the detector alone beside it, and what metrics.json records."""

    oof: list[dict]
    val: list[dict]
    test: list[dict]
    rows: list[dict]
    per_class: pd.DataFrame
    metrics: dict


def _settings(ctx: Context) -> tuple[FoldSettings, str]:
    cfg = ctx.cfg.detect
    ccfg = cfg.classifier
    train = ccfg.train.model_copy(update={"hflip": cfg.train.hflip})  # mirrors mean what they mean to the detector
    model = ModelConfig(backbones=[ccfg.backbone], pretrained=False, pretrained_path=ccfg.pretrained_path)
    settings = FoldSettings(model, train, ctx.cfg.runtime, "single_label", "accuracy", " ",
                            ctx.work_dir / "detect" / "crops" / "runs", to_yaml(ctx.cfg),
                            ctx.tracking_settings(),
                            ctx.name, "detect")
    return settings, ccfg.backbone


def _crop_set_keys(ctx: Context, data_key: str, fold: np.ndarray) -> tuple[str, str]:
    """(the crops' key, the folds hash) of the classification set made from the training boxes."""
    ccfg = ctx.cfg.detect.classifier
    key = fingerprint("detect-crops", data_key, fold.tolist(), ccfg.train.image_size, ccfg.margin, ccfg.copies,
                      ccfg.jitter, ccfg.train.seed)
    return key, fingerprint("detect-crops-folds", data_key, fold.tolist())


def _training_data(ctx: Context, data_key: str, classes: list[str], train: Arrays, fold: np.ndarray) -> TrainingData:
    ccfg = ctx.cfg.detect.classifier
    size = ccfg.train.image_size
    crops = training_crops(train.images, train.targets, fold, size, ccfg.margin, ccfg.copies, ccfg.jitter,
                           ccfg.train.seed)
    frame = pd.DataFrame({"id": [f"box{i}" for i in range(len(crops.labels))],
                          "label": [classes[c] for c in crops.labels], "y": crops.labels, "fold": crops.fold,
                          "image": crops.image})
    key, folds_hash = _crop_set_keys(ctx, data_key, fold)
    n_splits = int(fold.max()) + 1
    log.info(f"detect: classifier crops: {len(frame)} ({len(frame) // (1 + ccfg.copies)} boxes x {1 + ccfg.copies}) "
             f"at {size} px, {n_splits} folds")
    return TrainingData(frame, crops.images, key, 3, classes, folds_hash, n_splits)


def crop_views(ctx: Context) -> list[str]:
    """The classifier's test-time views: mirrors only where they mean what they mean to the detector."""
    return ["identity", "hflip"] if ctx.cfg.detect.train.hflip else ["identity"]


def classifier_runs(ctx: Context, data_key: str, classes: list[str], fold: np.ndarray) -> list[tuple[Path, str]]:
    """Each fold classifier's run folder and the key its best.json carries when this config trained it (train_fold's
    run_key), without making the crops."""
    settings, backbone = _settings(ctx)
    key, folds_hash = _crop_set_keys(ctx, data_key, fold)
    n_splits = int(fold.max()) + 1
    keyed = TrainingData(pd.DataFrame(), np.zeros(0, np.uint8), key, 3, classes, folds_hash, n_splits)
    return [(settings.runs_root / backbone / f"fold{k}", run_key(settings, backbone, k, keyed))
            for k in range(n_splits)]


def _load_classifiers(ctx: Context, data_key: str, classes: list[str], fold: np.ndarray,
                      rt: runtime.Runtime) -> list[tuple[torch.nn.Module, dict]]:
    """(model on the runtime's device, its input normalisation) of each fold classifier."""
    settings, backbone = _settings(ctx)
    _, folds_hash = _crop_set_keys(ctx, data_key, fold)
    models = []
    for k in range(int(fold.max()) + 1):
        model, meta = load_checkpoint(settings.runs_root / backbone / f"fold{k}", folds_hash, classes)
        models.append((rt.prepare(model), meta["norm"]))
    return models


def _probs(models: list[tuple[torch.nn.Module, dict]], crops: np.ndarray, index: np.ndarray, views: list[str],
           rt: runtime.Runtime, n_classes: int, fold: np.ndarray | None = None) -> np.ndarray:
    """(M, C) class probabilities of the crops (each classifier's views averaged): with `fold` (the OOF part) the
    crops of fold k's images named by fold k's classifier alone, else the mean of the fold classifiers."""
    out = np.zeros((len(index), n_classes), dtype=np.float32)
    for k, (model, norm) in enumerate(models):
        rows = np.nonzero(fold[index] == k)[0] if fold is not None else np.arange(len(index))
        if not len(rows):
            continue
        logits = view_logits(model, crops[rows], views, rt, norm, CROP_BATCH, 0)
        p = torch.softmax(torch.from_numpy(logits), -1).mean(0).numpy()
        out[rows] += p if fold is not None else p / len(models)
    return out


def _boxes_digest(boxes: list[dict], per_image: int) -> str:
    digest = hashlib.sha256()
    for d in boxes:
        digest.update(d["boxes"][:per_image].float().numpy().tobytes() + b"|")
    return digest.hexdigest()[:16]


def _crops(images: torch.Tensor, sizes: torch.Tensor, boxes: list[dict], per_image: int, size: int,
           margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Crops of each image's first `per_image` boxes (pixels of the original image) and their images' rows."""
    side = images.shape[-1]
    parts, index = [], []
    for i, d in enumerate(boxes):
        b = d["boxes"][:per_image].float()
        parts.append(b / sizes[i].float().repeat(2) * side)
        index += [i] * len(b)
    if not index:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    return crop(images, torch.from_numpy(index), torch.cat(parts), size, margin), index


def _split_by_image(probs: np.ndarray, index: np.ndarray, n_images: int, n_classes: int) -> list[np.ndarray]:
    counts = np.bincount(index, minlength=n_images)
    return list(np.split(probs.reshape(-1, n_classes), np.cumsum(counts)[:-1]))


def rename(ctx: Context, data_key: str, classes: list[str], fold: np.ndarray, train: Arrays, val: Arrays,
           test: Arrays, truth: list[dict], val_truth: list[dict], fused: dict[str, list[dict]]) -> Renamed:
    """Train (or load) the fold classifiers, name the fused boxes of `fused` (parts oof, val, test) and choose the
    rule on OOF."""
    cfg = ctx.cfg.detect
    ccfg = cfg.classifier
    settings, backbone = _settings(ctx)
    tdata = _training_data(ctx, data_key, classes, train, fold)
    n_splits = tdata.n_splits
    for k in range(n_splits):
        train_fold(settings, backbone, k, tdata)
    run_keys = [run_key(settings, backbone, k, tdata) for k in range(n_splits)]
    views = crop_views(ctx)
    n_classes, per_image, size = len(classes), ccfg.boxes_per_image, ccfg.train.image_size
    parts = {"oof": (train, ranked(fused["oof"])), "val": (val, ranked(fused["val"])),
             "test": (test, ranked(fused["test"]))}
    variants: dict[float | None, dict[str, list[dict]]] = {None: {p: with_votes(b, n_classes)
                                                                  for p, (_, b) in parts.items()}}
    for iou in ccfg.merge_iou:
        variants[iou] = {p: agnostic_merge(b, iou, n_classes) for p, (_, b) in parts.items()}
    path, stamp = ctx.work_dir / "detect" / "crops" / "probs.pt", ctx.work_dir / "detect" / "crops" / "probs.json"
    key = fingerprint("detect-crop-probs", run_keys, views, per_image, ccfg.margin, size,
                      {str(m): {p: _boxes_digest(b, per_image) for p, b in v.items()} for m, v in variants.items()})
    if is_done(stamp, key, [path]):
        probs = torch.load(path, weights_only=False)
    else:  # the fold classifiers are loaded only when their probabilities are not cached
        rt = runtime.from_config(ctx.cfg.runtime, "classification")
        models = _load_classifiers(ctx, data_key, classes, fold, rt)
        probs = {}
        for merge, boxes in variants.items():
            for part, (arrays, _) in parts.items():
                images, index = _crops(arrays.images, arrays.sizes, boxes[part], per_image, size, ccfg.margin)
                out = _probs(models, images, index, views, rt, n_classes, fold if part == "oof" else None)
                probs[(str(merge), part)] = _split_by_image(out, index, len(arrays.images), n_classes)
        atomic_write(path, lambda tmp: torch.save(probs, tmp))
        write_stamp(stamp, key, folds=n_splits, views=views)
    rules = [(w, m) for m in variants for w in [*ccfg.weights, 1.0]]
    rules = list(dict.fromkeys(rules))

    def apply(rule, part: str) -> list[dict]:
        weight, merge = rule
        return combine(variants[merge][part], probs[(str(merge), part)], weight, ccfg.top_k,
                       cfg.decode.max_detections)

    candidates = {r: apply(r, "oof") for r in rules}
    choice = choose_rule(candidates, truth, fold)
    write_csv(ctx.work_dir / "detect" / "crops" / "rules.csv", choice.grid)
    alone, chosen = (1.0, None), choice.rule
    oof, val_dets, test_dets = candidates[chosen], apply(chosen, "val"), apply(chosen, "test")
    alone_oof = candidates[alone]
    name = rule_name(*chosen)
    rows = [{"entry": f"second stage: {name} (chosen on OOF)", "kind": "classifier", "views": "+".join(views),
             **prefixed("oof", choice.oof), **prefixed("val", map_or_nan(val_dets, val_truth))},
            {"entry": f"second stage, nested: rule chosen on the other folds ({', '.join(choice.nested_rules)})",
             "kind": "classifier (nested)", **prefixed("oof", choice.nested)}]
    detector = class_table(alone_oof, truth, classes)
    renamed = class_table(oof, truth, classes)
    per_class = detector.rename(columns={"ap_50": "detector_ap_50", "ap": "detector_ap"})
    per_class["classifier_ap_50"], per_class["classifier_ap"] = renamed["ap_50"], renamed["ap"]
    if val_truth:  # the holdout, never used for a choice
        per_class["val_detector_ap_50"] = class_table(apply(alone, "val"), val_truth, classes)["ap_50"]
        per_class["val_classifier_ap_50"] = class_table(val_dets, val_truth, classes)["ap_50"]
    oof_alone = map_or_nan(alone_oof, truth)
    log.info(f"detect: second stage ({backbone} on {size} px crops, {n_splits} folds): OOF mAP@0.5 detector alone "
             f"{oof_alone['map_50']:.4f}, {name} {choice.oof['map_50']:.4f} (chosen on OOF), nested "
             f"{choice.nested['map_50']:.4f}")
    metrics = {"classifier": {"rule": name, "weight": chosen[0], "merge_iou": chosen[1], "backbone": backbone,
                              "oof_map_50_detector": oof_alone["map_50"], "oof_map_50": choice.oof["map_50"],
                              "oof_map": choice.oof["map"], "oof_map_50_nested": choice.nested["map_50"],
                              "nested_rules": choice.nested_rules}}
    return Renamed(oof, val_dets, test_dets, rows, per_class, metrics)


def rename_test(ctx: Context, data_key: str, classes: list[str], fold: np.ndarray, test: Arrays,
                fused_test: list[dict], weight: float, merge_iou: float | None, per_image: int, size: int,
                margin: float, views: list[str], top_k: int, max_detections: int) -> list[dict]:
    """The fused test detections renamed by the rule (weight, merge_iou) as rename() names them, the probabilities
    recomputed from the fold classifiers' checkpoints: the bundle stage checks its spec with it."""
    n_classes = len(classes)
    boxes = ranked(fused_test)
    boxes = with_votes(boxes, n_classes) if merge_iou is None else agnostic_merge(boxes, merge_iou, n_classes)
    rt = runtime.from_config(ctx.cfg.runtime, "classification")
    models = _load_classifiers(ctx, data_key, classes, fold, rt)
    crops, index = _crops(test.images, test.sizes, boxes, per_image, size, margin)
    probs = _split_by_image(_probs(models, crops, index, views, rt, n_classes), index, len(test.images), n_classes)
    return combine(boxes, probs, weight, top_k, max_detections)
