"""Segment stage (`make segment`): masks in, run-length encodings out. Orchestration and artifacts; the library is
pipeline/segmentation/ (reader, models, fit, infer, post, submit). Each step's key holds what it reads.

- folds: WORK/segment/folds.csv, stratified on which classes an image holds, duplicate groups of WORK/clean.csv
  kept together (recomputed on every run: the same seed gives the same folds).
- per fold k, WORK/segment/fold<k>/:
  - train: model.safetensors, model.json (stamp), history.csv, curves.png, last.* (resume), best.safetensors and
    mlflow.json (its MLflow run: params, per-epoch metrics, curves; pipeline/training/tracking.py).
    Key: the images' and masks' content, the images the fold holds out, segment.model, segment.train and the
    runtime keys that change results.
  - oof_views.npy (+ oof.json): uint8 probabilities of the held-out images, every view segment.views enables.
    Key: the model's key and the views.
  - test.npy (+ test.json): uint8 probabilities of the test images with the views chosen on OOF. Key: the model's
    key, the chosen views and the test images' content.
- then, from those files (seconds, on every run): the views with the best OOF Dice, per-class threshold and
  smallest component chosen on OOF Dice (and nested over the folds for the honest figure), leaderboard.csv,
  metrics.json, gallery_oof.png, oof.npy and the submission SUBMISSIONS/<competition>.csv in the sample
  submission's form, checked before it is written (pipeline/segmentation/submit.py).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from pipeline.context import Context
from pipeline.core.artifacts import (
    atomic_write,
    content_key,
    file_digest,
    fingerprint,
    is_done,
    read_stamp,
    write_csv,
    write_json,
    write_stamp,
)
from pipeline.core.config import SegmentConfig, config_hash
from pipeline.data.cache import cached_decode
from pipeline.data.quality import clean_csv
from pipeline.detection.folds import assign_folds, image_groups
from pipeline.scoring.submission import write_submission
from pipeline.segmentation import models
from pipeline.segmentation.arrays import mask_array, masks_key, presence, presence_strata
from pipeline.segmentation.data import SegmentationData, read_segmentation
from pipeline.segmentation.fit import SegmentationTrainer
from pipeline.segmentation.gallery import gallery
from pipeline.segmentation.infer import combine, predict_views, view_sets
from pipeline.segmentation.metrics import dice
from pipeline.segmentation.post import choose, drop_small, grid_scores, nested, to_masks
from pipeline.segmentation.rle import encode
from pipeline.segmentation.submit import build_frame, validate_segmentation
from pipeline.training import checkpoint, runtime, tracking
from pipeline.training.plots import plot_panels
from pipeline.training.runtime import Runtime

log = logging.getLogger(__name__)


def read_data(ctx: Context) -> SegmentationData:
    cfg = ctx.cfg.segment
    comp = ctx.cfg.competition.model_copy(update={"train_csv": cfg.data.train_csv, "test_csv": cfg.data.test_csv})
    return read_segmentation(ctx.data_dir, comp, cfg.data.masks_dir)


def model_inputs(cfg: SegmentConfig) -> dict:
    """What of segment.model changes the trained weights: the sections, and the pretrained file's bytes."""
    path = cfg.model.pretrained_path
    return {"model": cfg.model.model_dump(), "pretrained_bytes": file_digest(Path(path)) if path else None,
            "train": cfg.train.model_dump()}


def _build(cfg: SegmentConfig, n_classes: int) -> torch.nn.Module:
    return models.create(cfg.model.arch, cfg.model.encoder, n_classes, cfg.model.encoder_weights)


def _train(ctx: Context, key: str, n_classes: int, images: np.ndarray, masks: np.ndarray, rest: np.ndarray,
           held: np.ndarray, rt: Runtime, out: Path, seed: int) -> tuple[torch.nn.Module, str, dict]:
    """One fold model: loaded when model.json matches its key, else trained (resuming from last.*)."""
    cfg = ctx.cfg.segment
    fp = fingerprint("segment-train", key, model_inputs(cfg), seed, runtime.result_keys(ctx.cfg.runtime))
    stamp = read_stamp(out / "model.json") or {}
    if stamp.get("fingerprint") == fp and (out / "model.safetensors").exists():
        model = rt.prepare(_build(cfg, n_classes))
        model.load_state_dict(load_file(str(out / "model.safetensors")))
        log.info(f"segment: {out.name} model up to date ({out / 'model.safetensors'})")
        return model, fp, stamp["summary"]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = rt.prepare(_build(cfg, n_classes))
    if cfg.model.pretrained_path:  # before training; a resumed run then loads its own last weights over these
        log.info(f"segment: initialised the {models.load_pretrained(model, Path(cfg.model.pretrained_path))}")
    train_cfg = cfg.train.model_copy(update={"seed": seed})
    trainer = SegmentationTrainer(model, train_cfg, images, masks, rest, held, out, fp, rt)
    tcfg = ctx.cfg.tracking
    params = {"model": f"{cfg.model.arch}-{cfg.model.encoder}", "fold": out.name,
              **tracking.flatten({"segment": {"model": cfg.model.model_dump(), "train": train_cfg.model_dump()}})}
    track = tracking.start(tracking.Settings(tcfg.backend, tcfg.uri, tcfg.experiment or ctx.name, ctx.work_dir), out,
                           params["model"], fp, params, {"stage": "segment"})
    try:
        history = pd.DataFrame(trainer.fit())
    except BaseException as exc:
        track.stop(exc)
        raise
    checkpoint.save_weights(out / "model.safetensors", model)
    write_csv(out / "history.csv", history)
    plot_panels(history, {"loss": ["train_loss"], "validation Dice": ["val_dice", "val_dice_post"]}, out / "curves.png",
                f"{cfg.model.arch} {cfg.model.encoder}, {out.name}")
    track.finish(history.to_dict("records"), [out / "history.csv", out / "curves.png"])  # before the stamp
    best = history.loc[history["epoch"] == trainer.best_epoch].iloc[0]
    summary = {"epochs": len(history), "best_epoch": trainer.best_epoch, "val_dice": float(best["val_dice_post"]),
               "train_seconds": float(history["seconds"].sum()), "device": str(rt.device)}
    write_stamp(out / "model.json", fp, summary=summary)
    return model, fp, summary


def _predicted(out: Path, name: str, fp: str, predict) -> np.ndarray:
    """out/<name>.npy (stamp <name>.json with key fp), written by predict(memmap-path) when missing or stale."""
    path, stamp = out / f"{name}.npy", out / f"{name}.json"
    if not is_done(stamp, fp, [path]):
        atomic_write(path, predict)
        write_stamp(stamp, fp)
    return np.load(path, mmap_mode="r")


def _write_npy(images: np.ndarray, rows: np.ndarray | None, model, views, batch: int, rt: Runtime, combined: bool,
               n_classes: int, size: int):
    """A writer of the uint8 probabilities of images[rows] (all of them: None) into a .npy memmap, batch by batch
    (never all of them as floats); the rows are read only when it runs."""
    n = len(images) if rows is None else len(rows)
    shape = (n, n_classes, size, size) if combined else (n, len(views), n_classes, size, size)

    def write(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        predict_views(model, images if rows is None else images[rows], views, batch, rt, out=out, combined=combined)
        out.flush()

    return write


def _choose_views(fold_oof: list[np.ndarray], helds: list[np.ndarray], masks: np.ndarray, all_views: tuple[str, ...],
                  candidates: list[tuple[str, ...]]) -> tuple[tuple[str, ...], dict[str, float]]:
    """The view set with the best OOF Dice at threshold 0.5 (ties: the fewer views, tried first)."""
    scores = {}
    for views in candidates:
        pick = [all_views.index(v) for v in views]
        per_image = [dice(combine(oof[:, pick]) >= 128, masks[np.sort(held)].astype(bool))
                     for oof, held in zip(fold_oof, helds, strict=True)]
        scores["+".join(views)] = float(np.concatenate(per_image).mean())
    best = max(candidates, key=lambda v: (scores["+".join(v)], -len(v)))
    return best, scores


def _submission(ctx: Context, data: SegmentationData, tests: list[np.ndarray], thresholds: list[float],
                areas: list[int]) -> pd.DataFrame:
    """RLE of every test image and class: the rounded mean of the fold models' maps, resized to the image and
    post-processed, `predict.chunk` images at a time."""
    rles: dict[tuple[str, str], str] = {}
    chunk = ctx.cfg.segment.predict.chunk
    for start in range(0, len(data.test), chunk):
        probs = combine(np.stack([np.asarray(t[start:start + chunk]) for t in tests], 1))
        for j, p in enumerate(probs):
            i = start + j
            for c, mask in zip(data.classes, to_masks(p, data.test.shape(i), thresholds, areas), strict=True):
                rles[(data.test.ids[i], c)] = encode(mask)
    return build_frame(data, rles)


def _choose_post(cfg: SegmentConfig, classes: list[str], oof: np.ndarray, masks: np.ndarray, fold: np.ndarray,
                 summaries: list[dict]) -> tuple[dict, list[dict]]:
    """Per class, the threshold and smallest component with the best OOF Dice (for the submission) and the nested
    figure; the metrics and the leaderboard rows (per fold: nested; OOF: at 0.5, chosen, nested)."""
    grid = cfg.thresholds
    thresholds, areas, optimistic, honest, plain, per_class = [], [], [], [], [], []
    for c, name in enumerate(classes):
        scores = grid_scores(oof[:, c], masks[:, c], grid.probability, grid.min_area)
        best = choose(scores, grid.probability, grid.min_area)
        fair, choices = nested(scores, fold, grid.probability, grid.min_area)
        thresholds.append(best.threshold)
        areas.append(best.min_area)
        optimistic.append(best.score)
        honest.append(fair)
        plain.append(dice(oof[:, c] >= 128, masks[:, c].astype(bool)))
        per_class.append({"class": name, "threshold": best.threshold, "min_area": best.min_area,
                          "oof_dice_0.5": float(plain[-1].mean()), "oof_dice_chosen": best.score,
                          "nested_dice": float(fair.mean()),
                          "nested_choices": [(x.threshold, x.min_area) for x in choices]})
    honest_arr, plain_arr = np.stack(honest, 1), np.stack(plain, 1)  # (N, C)
    metrics = {"oof_dice_0.5": float(plain_arr.mean()), "oof_dice_chosen": float(np.mean(optimistic)),
               "nested_dice": float(honest_arr.mean()), "thresholds": dict(zip(classes, thresholds, strict=True)),
               "min_area": dict(zip(classes, areas, strict=True)), "folds": len(summaries),
               "train_seconds": float(sum(s["train_seconds"] for s in summaries)), "per_class": per_class}

    def row(part: str, scoring: str, means: np.ndarray, **extra) -> dict:
        return {"part": part, "scoring": scoring, **extra, "dice": float(np.mean(means)),
                **{f"dice_{c}": float(v) for c, v in zip(classes, means, strict=True)}}

    board = [row(f"fold{k}", "nested (honest)", honest_arr[fold == k].mean(0), images=int((fold == k).sum()),
                 epochs=summary["epochs"], best_epoch=summary["best_epoch"], val_dice=summary["val_dice"])
             for k, summary in enumerate(summaries)]
    board += [row("OOF", "threshold 0.5", plain_arr.mean(0), images=len(fold)),
              row("OOF", "chosen on OOF (optimistic)", np.array(optimistic), images=len(fold)),
              row("OOF", "nested (honest)", honest_arr.mean(0), images=len(fold))]
    return metrics, board


def run(ctx: Context) -> dict:
    cfg = ctx.cfg.segment
    runtime.set_threads(ctx.cfg.runtime.threads)
    data = read_data(ctx)
    log.info(f"segment: {len(data.train)} train images, {len(data.test)} test; classes {data.classes} "
             f"({data.mask_form} masks, {data.submission_form} submission)")
    rt = runtime.from_config(ctx.cfg.runtime, "segmentation")
    root, size, n_classes = ctx.work_dir / "segment", cfg.train.image_size, len(data.classes)
    cache = ctx.work_dir / "cache"
    images_key, test_key = content_key(data.train.paths), content_key(data.test.paths)
    images = cached_decode(cache, images_key, data.train.paths, size, 3, "segment-train")
    m_key = masks_key(data, ctx.data_dir / cfg.data.train_csv)
    masks = mask_array(data, cache, m_key, size)
    held_classes = presence(masks)

    n_splits, seed = cfg.folds.n_splits, cfg.train.seed
    groups = image_groups(data.train.ids, clean_csv(ctx.work_dir))
    fold = assign_folds(groups, presence_strata(held_classes, n_splits), n_splits, seed, key="segment.folds.n_splits")
    write_csv(root / "folds.csv", pd.DataFrame({"image": data.train.ids, "group": groups, "fold": fold}))

    all_views = view_sets(cfg.views.hflip, cfg.views.vflip)[-1]
    batch = cfg.train.batch_size
    fold_models, helds, fold_oof, summaries = [], [], [], []
    for k in range(n_splits):
        held, rest = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        key = fingerprint(images_key, m_key, size, "fold", k, n_splits, [data.train.ids[i] for i in held])
        out = root / f"fold{k}"
        model, fp, summary = _train(ctx, key, n_classes, images, masks, rest, held, rt, out, seed + k)
        oof = _predicted(out, "oof_views", fingerprint("segment-oof", fp, all_views),
                         _write_npy(images, np.sort(held), model, all_views, batch, rt, False, n_classes, size))
        fold_models.append((model, fp))
        helds.append(np.sort(held))
        fold_oof.append(oof)
        summaries.append(summary)

    candidates = view_sets(cfg.views.hflip, cfg.views.vflip)
    views, view_scores = _choose_views(fold_oof, helds, masks, all_views, candidates)
    log.info("segment: OOF Dice by views (threshold 0.5): "
             + ", ".join(f"{v} {s:.4f}" for v, s in view_scores.items()) + f"; kept {'+'.join(views)}")
    pick = [all_views.index(v) for v in views]

    def assemble(tmp: Path) -> None:  # fold by fold into a memmap: one fold's maps in memory at a time
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(data.train), n_classes, size, size))
        for held, oof in zip(helds, fold_oof, strict=True):
            out[held] = combine(oof[:, pick])
        out.flush()

    atomic_write(root / "oof.npy", assemble)
    oof_all = np.load(root / "oof.npy", mmap_mode="r")

    test_images = cached_decode(cache, test_key, data.test.paths, size, 3, "segment-test")
    tests = [_predicted(root / f"fold{k}", "test", fingerprint("segment-test", fp, views, test_key),
                        _write_npy(test_images, None, model, views, batch, rt, True, n_classes, size))
             for k, (model, fp) in enumerate(fold_models)]

    metrics, board = _choose_post(cfg, data.classes, oof_all, masks, fold, summaries)
    metrics |= {"views": list(views), "view_scores": view_scores}
    thresholds, areas = list(metrics["thresholds"].values()), list(metrics["min_area"].values())
    leaderboard = pd.DataFrame(board)
    write_csv(root / "leaderboard.csv", leaderboard)
    write_json(root / "metrics.json", metrics)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        log.info("segment: leaderboard (OOF: each training image predicted by the fold model that did not train "
                 "on it)\n" + leaderboard.to_string(index=False))
    log.info(f"segment: OOF Dice {metrics['oof_dice_0.5']:.4f} at threshold 0.5, {metrics['oof_dice_chosen']:.4f} "
             f"with thresholds {thresholds} and min areas {areas} chosen on OOF, nested (honest) "
             f"{metrics['nested_dice']:.4f}")

    n = min(cfg.predict.gallery_images, len(data.train))
    if n:
        shown = np.stack([np.stack([drop_small((oof_all[i, c] >= thresholds[c] * 255)[None], areas[c])[0]
                                    for c in range(n_classes)]) for i in range(n)])
        gallery(np.asarray(images[:n]), np.asarray(masks[:n]), shown, data.train.ids[:n], data.classes,
                root / "gallery_oof.png")

    frame = _submission(ctx, data, tests, thresholds, areas)
    manifest = {"track": "segmentation", "model": f"{cfg.model.arch}-{cfg.model.encoder}", "folds": n_splits,
                "views": list(views), "thresholds": metrics["thresholds"], "min_area": metrics["min_area"],
                "classes": data.classes, "oof_dice_chosen": metrics["oof_dice_chosen"],
                "nested_dice": metrics["nested_dice"], "config_hash": config_hash(cfg)}
    path = write_submission(frame, ctx.submissions_dir, ctx.name, manifest,
                            partial(validate_segmentation, data=data))
    log.info(f"segment: submission {path} ({len(frame)} rows, {data.submission_form} form); "
             f"{root}/leaderboard.csv, metrics.json, gallery_oof.png")
    return metrics
