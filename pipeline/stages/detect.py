"""Detect stage (`make detect`): TinySSD or a torchvision detector (`detect.model.name`) on a detection folder --
train, evaluate, predict, submit. Orchestration and artifacts; the library is pipeline/detection/ (the k-fold
ensemble: ensemble.py). Each step's key holds the config sections it reads (pipeline/core/config/detect.py).

detect.folds.n_splits > 1 (the default): one detector per fold of the training images (folds.py: duplicate groups
kept together), each model's views (scales x mirror) of its out-of-fold, holdout and test images
(fold<k>/views.pt, keyed by the model and the decode, views and evaluate sections (but evaluate.tta) and the
test images), Weighted Boxes Fusion with thresholds chosen on OOF (fusion.py), then leaderboard.csv,
per_class.csv, oof_detections.csv, metrics.json and the fused submission (recomputed on every run: seconds).

detect.folds.n_splits = 1: one model, in three parts, each with its own stamp and key, each redone only when
what it reads changes:
- train: model.safetensors, model.json (stamp), history.csv, curves.png, last.safetensors + last.pt
  (resume state), mlflow.json (its MLflow run: params, per-epoch metrics, curves; pipeline/training/tracking.py).
  Key: train and validation rows and image bytes, classes, the train, augment and anchors sections and the
  model choice (model_choice). The per-epoch validation in history.csv decodes with the settings of the run
  that trained.
- evaluate: metrics.json (stamp; validation class error, bbox MAE, mAP@0.5, COCO mAP, chosen TTA).
  Key: the model's key and the decode and evaluate sections.
- predict: test_predictions.csv, gallery_val.png (predictions red, truth green), gallery_test.png,
  predict.json (stamp) and the submission SUBMISSIONS/<competition>.csv (image, PredictionString),
  written by the submission writer both tracks share. Key: the model's key, the chosen TTA, test ids
  and image bytes, the decode and predict sections. Test images are only predicted: changing one never retrains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from pipeline.context import Context
from pipeline.core.artifacts import (
    atomic_write,
    fingerprint,
    is_done,
    read_json,
    read_stamp,
    write_csv,
    write_json,
    write_stamp,
)
from pipeline.core.config import DetectConfig, DetectModelConfig, DetectTrainConfig, config_hash
from pipeline.data.quality import clean_csv
from pipeline.detection.anchors import auto_anchors, box_shapes
from pipeline.detection.augment import BoxAugment, BoxAugmentSettings
from pipeline.detection.data import Arrays, read_detection, split_arrays
from pipeline.detection.ensemble import (
    FoldModel,
    above_score,
    assemble_run,
    choose_submission,
    configuration_name,
    fold_fusion,
    fuse_chosen,
    view_detections,
    view_names,
)
from pipeline.detection.fit import DeadDetector, DetectionTrainer, dead_reason, evaluate
from pipeline.detection.folds import assign_folds, image_groups, main_class
from pipeline.detection.infer import TTA, Detector, class_table, gallery, submission_frame, targets_in_pixels
from pipeline.detection.tinyssd import TinySSD
from pipeline.detection.torchvision_models import NAMES, create, load_pretrained, model_keys
from pipeline.scoring import submission
from pipeline.stages.detect_classifier import rename
from pipeline.training import checkpoint, runtime, tracking
from pipeline.training.plots import plot_panels
from pipeline.training.runtime import Runtime

log = logging.getLogger(__name__)

METRICS = ("val_class_err", "val_bbox_mae", "map_50", "map")


def _arrays(ctx: Context, split, classes: list[str], name: str) -> Arrays:
    return split_arrays(split, classes, ctx.work_dir / "cache", ctx.cfg.detect.train.image_size, name)


def anchors_for(cfg: DetectConfig, targets: torch.Tensor) -> tuple[list[list[float]], list[float]]:
    """The configured anchors, or with anchors.mode=auto the k-means of these training boxes (anchors.py)."""
    anchors = cfg.anchors
    if anchors.mode == "fixed":
        return anchors.sizes, anchors.ratios
    return auto_anchors(box_shapes(targets), len(anchors.sizes), len(anchors.sizes[0]), len(anchors.ratios),
                        cfg.train.seed)


def augment_settings(cfg: DetectConfig) -> BoxAugmentSettings:
    aug = cfg.augment
    return BoxAugmentSettings(hflip=cfg.train.hflip, vflip=aug.vflip, crop_scale=aug.crop_scale, scale=aug.scale,
                              shift=aug.shift, colour=aug.colour, mosaic=aug.mosaic, min_visibility=aug.min_visibility)


def model_choice(model: DetectModelConfig) -> dict:
    """What of detect.model changes the trained weights (torchvision_models.model_keys), under the config's names:
    the model, its backbone keys when it reads them, the pretrained file's bytes."""
    keys = model_keys(model.name, model.backbone, model.fpn_channels, model.pretrained_path)
    return {"name": keys.pop("model"), **keys}


def train_inputs(cfg: DetectConfig) -> dict:
    """The sections the train step reads, as its key holds them (and its MLflow run's params)."""
    # patience null trains as before it existed: left out, so such detectors keep their keys
    # restart_dead_after acts on FCOS only: the other detectors keep their keys when it changes
    train = cfg.train.model_dump(exclude=({"patience"} if cfg.train.patience is None else set())
                                 | ({"restart_dead_after"} if cfg.model.name != "fcos" else set()))
    return {"model": model_choice(cfg.model), "train": train, "augment": cfg.augment.model_dump(),
            "anchors": cfg.anchors.model_dump()}


# Each step's key: what it reads of the config (whole sections) and the key of the step before it, so a changed
# key reruns exactly the steps that read it and those after them.
def train_key(cfg: DetectConfig, data_key: str, seed: int, runtime_keys: dict) -> str:
    return fingerprint(data_key, train_inputs(cfg), seed, runtime_keys)


def evaluate_key(cfg: DetectConfig, model_key: str) -> str:
    return fingerprint("detect-evaluate", model_key, cfg.decode.model_dump(), cfg.evaluate.model_dump())


def predict_key(cfg: DetectConfig, model_key: str, tta: str, test_key: str) -> str:
    return fingerprint("detect-predict", model_key, tta, test_key, cfg.decode.model_dump(), cfg.predict.model_dump())


def views_key(cfg: DetectConfig, model_key: str, test_key: str) -> str:
    """evaluate.tta is the single model's choice: the fold models' views are the views section."""
    return fingerprint("detect-views", model_key, cfg.decode.model_dump(), cfg.views.model_dump(),
                       cfg.evaluate.model_dump(exclude={"tta"}), test_key)


def _build(cfg: DetectConfig, n_classes: int, sizes: list[list[float]], ratios: list[float]) -> torch.nn.Module:
    """TinySSD with these anchors, or the torchvision detector detect.model.name names (its own anchors)."""
    model = cfg.model
    if model.name == "tinyssd":
        return TinySSD(n_classes, sizes, ratios)
    return create(model.name, n_classes, cfg.train.image_size, model.backbone, model.fpn_channels)


RESTART_SEED = 1000  # a restarted detector's seeds are its own plus this: far from the folds' seed + k


def model_key(stamp: dict) -> str:
    """The key of the weights a model.json stamps, which the later steps' keys hold: a restarted detector's own
    (_train), else its training key."""
    return stamp.get("model_key", stamp["fingerprint"])


def _train(ctx: Context, data_key: str, classes: list[str], train: Callable[[], Arrays], val: Arrays, rt: Runtime,
           out: Path, seed: int, extra: dict | None = None) -> tuple[torch.nn.Module, str, dict]:
    """Train one detector (or resume, or load when model.json matches); returns it, its key and the training
    summary. `train` decodes the training arrays only when training is needed (the biggest split).

    A detector dead after train.restart_dead_after epochs (fit.dead_reason) is restarted once from scratch with
    its seeds + RESTART_SEED. restart.json records the decision, so a resumed run goes straight on with the
    restart, whose checkpoints carry their own key (the weights' key the later steps hold)."""
    cfg = ctx.cfg.detect
    fp = train_key(cfg, data_key, seed, runtime.result_keys(ctx.cfg.runtime))
    stamp = read_stamp(out / "model.json") or {}
    if stamp.get("fingerprint") == fp and "summary" in stamp and (out / "model.safetensors").exists():
        model = rt.prepare(_build(cfg, len(classes), stamp["anchor_sizes"], stamp["anchor_ratios"]))
        model.load_state_dict(load_file(str(out / "model.safetensors")))
        log.info(f"detect: model up to date ({out / 'model.safetensors'})")
        return model, model_key(stamp), stamp["summary"]
    out.mkdir(parents=True, exist_ok=True)
    arrays = train()
    sizes, ratios = anchors_for(cfg, arrays.targets)
    kind = cfg.model.name
    if cfg.anchors.mode == "auto" and kind == "tinyssd":
        log.info(f"detect: anchors from the training boxes: sizes {sizes}, ratios {ratios}")
    where = f"fold {extra['fold']}" if extra and "fold" in extra else "the detector"
    fit = partial(_fit, ctx, classes, arrays, val, rt, out, sizes, ratios, extra)
    restart = read_stamp(out / "restart.json")
    if restart is None or restart.get("fingerprint") != fp:
        restart = None
        try:
            model, trainer, track = fit(cfg.train, fp, seed, cfg.train.restart_dead_after)
        except DeadDetector as dead:
            restart = {"reason": dead.reason, "epoch": dead.epoch, "seed": seed + RESTART_SEED}
            write_stamp(out / "restart.json", fp, **restart)
            log.warning(f"detect: warning: {where} restarts from scratch with seed {seed + RESTART_SEED}: after "
                        f"epoch {dead.epoch}, {dead.reason}")
    weights_key = fp
    if restart is not None:
        weights_key = fingerprint(fp, "restart", restart["seed"])
        again = cfg.train.model_copy(update={"seed": cfg.train.seed + RESTART_SEED})
        model, trainer, track = fit(again, weights_key, restart["seed"], None)
        check = min(cfg.train.restart_dead_after or 1, len(trainer.history),
                    *([1 + cfg.train.patience] if cfg.train.patience else [])) - 1
        if (reason := dead_reason(trainer.history[check], kind)) is not None:
            log.warning(f"detect: warning: {where} is dead after its restart too ({reason}); kept as it is, "
                        "try another detect.train.seed, a longer detect.train.warmup_epochs or a lower lr")
    history = pd.DataFrame(trainer.history)
    checkpoint.save_weights(out / "model.safetensors", model)
    write_csv(out / "history.csv", history)
    terms = [c for c in history.columns if c.startswith("train_") and c != "train_loss"]  # TinySSD: d2l's
    errors = {"errors": ["train_class_err", "val_class_err", "train_bbox_mae", "val_bbox_mae"]}
    plot_panels(history, {"loss": ["train_loss"] + ([] if kind == "tinyssd" else terms),
                          **(errors if kind == "tinyssd" else {}), "validation mAP": ["map_50", "map"]},
                out / "curves.png", f"{NAMES[kind]} on {ctx.name}", log=("errors",))
    # before the stamp (tracking.py)
    track.finish(history.to_dict("records"), [out / "history.csv", out / "curves.png"])
    final = history.iloc[-1]
    summary = {**{c: float(final[c]) for c in terms}, "epochs": len(history), "best_epoch": trainer.best_epoch,
               "train_seconds": float(history["seconds"].sum()), "device": str(rt.device),
               "peak_rss_gb": round(runtime.peak_rss_gb(), 2)}
    if restart is not None:  # what the kept weights come from, beside the numbers
        summary["restarted"] = {k: restart[k] for k in ("reason", "epoch", "seed")}
    write_stamp(out / "model.json", fp, classes=classes, summary=summary, anchor_sizes=sizes, anchor_ratios=ratios,
                model_key=weights_key, **(extra or {}))
    return model, weights_key, summary


def _fit(ctx: Context, classes: list[str], arrays: Arrays, val: Arrays, rt: Runtime, out: Path,
         sizes: list[list[float]], ratios: list[float], extra: dict | None, train_cfg: DetectTrainConfig, key: str,
         seed: int, dead_after: int | None) -> tuple[torch.nn.Module, DetectionTrainer, tracking.Run]:
    """One training run from `seed` (weights init and augmentation; train_cfg.seed: batch order) with checkpoints
    under `key` and its MLflow run (finished by the caller, with the pictures); raises DeadDetector from
    dead_after's check."""
    cfg = ctx.cfg.detect
    kind = cfg.model.name
    torch.manual_seed(seed)
    model = rt.prepare(_build(cfg, len(classes), sizes, ratios))
    if cfg.model.pretrained_path:  # before any training; a resumed run then loads its own last weights over these
        log.info(f"detect: initialised from the {load_pretrained(model, cfg.model.pretrained_path)}")
    settings = augment_settings(cfg)
    augment = BoxAugment(settings, arrays.images, arrays.targets, seed) if settings.active else None
    trainer = DetectionTrainer(model, train_cfg, arrays.images, arrays.targets, val.images, val.targets, val.sizes,
                               out, key, rt, augment, cfg.decode, cfg.evaluate, dead_after)
    params = {"model": NAMES[kind], **tracking.flatten({"detect": train_inputs(cfg)}), "seed": seed, **(extra or {})}
    track = tracking.start(ctx.tracking_settings(), out, kind, key, params, {"stage": "detect"})
    try:
        trainer.fit()
    except BaseException as exc:
        track.stop(exc)
        raise
    return model, trainer, track


def _evaluate(ctx: Context, data, model: torch.nn.Module, rt: Runtime, val: Arrays, model_fp: str,
              summary: dict) -> dict:
    """Validation metrics of the final model with the current decoding settings (NMS, thresholds, voting);
    tta auto scores every option and keeps hflip only when it raises mAP@0.5."""
    cfg, path = ctx.cfg.detect, ctx.work_dir / "detect" / "metrics.json"
    fp = evaluate_key(cfg, model_fp)
    if is_done(path, fp):
        metrics = read_json(path, "rerun `make detect`")
        log.info(f"detect: validation up to date ({path}): mAP@0.5 {metrics['map_50']:.4g}, tta {metrics['tta']}")
        return metrics
    options = TTA if cfg.evaluate.tta == "auto" else (cfg.evaluate.tta,)
    scored = evaluate(model, cfg.decode, rt, val.images, val.targets, val.sizes, cfg.train.batch_size,
                      cfg.evaluate.map_score_threshold, options)
    tta = max(options, key=lambda t: (scored[t]["map_50"], t == "none"))  # ties: the cheaper plain view
    metrics = scored[tta] | summary | {"tta": tta, "map_50_by_tta": {t: scored[t]["map_50"] for t in options},
                                       "nms_threshold": cfg.decode.nms_threshold,
                                       "box_voting": cfg.decode.box_voting, "val_source": data.val_source}
    write_stamp(path, fp, **metrics)
    if len(options) > 1:
        log.info("detect: validation mAP@0.5 by TTA: " + ", ".join(f"{t} {scored[t]['map_50']:.4f}" for t in options)
              + f"; kept {tta}")
    log.info("detect: validation " + ", ".join(f"{k} {metrics[k]:.4g}" for k in METRICS if k in metrics)
          + f" (training {summary['train_seconds']:.0f} s on {summary['device']}, "
          f"peak memory {summary.get('peak_rss_gb', float('nan')):.1f} GB)")
    return metrics


def _submission_settings(cfg: DetectConfig) -> dict:
    """The decoding and submission keys, as the submission's manifest records them."""
    return cfg.decode.model_dump() | cfg.predict.model_dump()


def _predict(ctx: Context, data, model: torch.nn.Module, rt: Runtime, val: Arrays, metrics: dict,
             model_fp: str) -> None:
    """Test detections, galleries and the submission, checked by the submission writer (every test image once,
    PredictionStrings that parse) and written with its manifest and history copy."""
    cfg, out = ctx.cfg.detect, ctx.work_dir / "detect"
    path = ctx.submissions_dir / f"{ctx.name}.csv"
    fp = predict_key(cfg, model_fp, metrics["tta"], data.test_key())
    if is_done(out / "predict.json", fp, [out / "test_predictions.csv", path]):
        log.info(f"detect: predictions up to date; submission {path}")
        return
    test = _arrays(ctx, data.test, data.classes, "test")
    detector = Detector(model, cfg.decode, rt, metrics["tta"])
    batch_size = cfg.train.batch_size
    detections = detector(test.images, test.sizes, cfg.predict.score_threshold, batch_size * rt.eval_batch_factor)
    frame = submission_frame(data.test.images, detections, data.classes)
    write_csv(out / "test_predictions.csv", frame)
    n = cfg.predict.gallery_images
    if n:
        shown = detector(torch.cat((val.images[:n], test.images[:n])), torch.cat((val.sizes[:n], test.sizes[:n])),
                         cfg.predict.gallery_score_threshold, batch_size)
        k = len(val.images[:n])
        gallery(val.images[:n], shown[:k], val.sizes[:n], data.classes, out / "gallery_val.png", truth=val.targets[:n])
        gallery(test.images[:n], shown[k:], test.sizes[:n], data.classes, out / "gallery_test.png")
    manifest = {"track": "detection", "model": NAMES[cfg.model.name], "model_key": model_fp, "classes": data.classes,
                "tta": metrics["tta"], **_submission_settings(cfg), "val_map_50": metrics["map_50"],
                "val_map": metrics["map"], "val_source": data.val_source, "config_hash": config_hash(cfg)}
    check = partial(submission.validate_detection, images=data.test.images["image"].tolist(), classes=data.classes)
    submission.write_submission(frame, ctx.submissions_dir, ctx.name, manifest, check)
    write_stamp(out / "predict.json", fp, submission=str(path))
    boxes = sum(len(s.split()) // 6 for s in frame["PredictionString"])
    log.info(f"detect: submission {path} ({len(frame)} images, {boxes} boxes at score >= "
             f"{cfg.predict.score_threshold}); pictures {out}/gallery_val.png, gallery_test.png, curves.png")


def _fold_views(ctx: Context, model: torch.nn.Module, model_fp: str, rt: Runtime, parts: dict[str, Arrays], out: Path,
                test_key: str) -> dict[str, dict[str, list[dict]]]:
    """{part: {view: detections}} of one fold model for its out-of-fold images, the holdout and test; cached in
    views.pt (stamp views.json: views_key)."""
    cfg = ctx.cfg.detect
    fp = views_key(cfg, model_fp, test_key)
    if is_done(out / "views.json", fp, [out / "views.pt"]):
        return torch.load(out / "views.pt", weights_only=True)
    found = {part: {v: view_detections(model, cfg.decode, rt, arrays, v, cfg.evaluate.map_score_threshold,
                                       cfg.train.batch_size) for v in view_names(cfg.views)}
             for part, arrays in parts.items()}
    atomic_write(out / "views.pt", lambda tmp: torch.save(found, tmp))
    write_stamp(out / "views.json", fp)
    return found


def _run_folds(ctx: Context, data, rt: Runtime, val: Arrays) -> None:
    """One detector per fold, views of each, WBF thresholds on OOF; then the blend of every configuration in WORK.
    The folds keep the duplicate groups of WORK/clean.csv together when the clean stage has written it."""
    cfg, root = ctx.cfg.detect, ctx.work_dir / "detect"
    name = configuration_name(cfg.folds.name, cfg.model)
    n_splits, seed = cfg.folds.n_splits, cfg.train.seed
    train, test = _arrays(ctx, data.train, data.classes, "train"), _arrays(ctx, data.test, data.classes, "test")
    names = data.train.images["image"].tolist()
    groups = image_groups(names, clean_csv(ctx.work_dir))
    strata = main_class(len(names), data.train.boxes["item"].to_numpy(), data.train.boxes["label"].to_numpy())
    fold = assign_folds(groups, strata, n_splits, seed)
    write_csv(root / "folds.csv", pd.DataFrame({"image": names, "group": groups, "fold": fold}))
    truth, val_truth = targets_in_pixels(train.targets, train.sizes), targets_in_pixels(val.targets, val.sizes)
    fold_models = []
    for k in range(n_splits):
        held, rest = np.nonzero(fold == k)[0], np.nonzero(fold != k)[0]
        key = fingerprint(data.key(), "fold", k, n_splits, [names[i] for i in held])
        model, fp, summary = _train(ctx, key, data.classes, lambda rest=rest: train.take(rest), train.take(held), rt,
                                    root / name / f"fold{k}", seed + k, {"fold": k})
        found = _fold_views(ctx, model, fp, rt, {"oof": train.take(held), "val": val, "test": test},
                            root / name / f"fold{k}", data.test_key())
        fold_models.append(FoldModel(held, found, fp, summary["train_seconds"]))
    run = assemble_run(name, view_names(cfg.views), fold_models, len(names), truth, val_truth,
                       fingerprint(data.key(), names, fold.tolist()), data.test_key())
    fused = fold_fusion(run, train.sizes, truth, val.sizes, val_truth, cfg.fusion, cfg.decode.max_detections)
    write_csv(root / name / "fusion_grid.csv", fused.grid)
    # the detect section beside its lists: the bundle of a blend rebuilds each configuration's detectors from it
    saved = {**run, "detect_config": cfg.model_dump(mode="json")}
    atomic_write(root / name / "detections.pt", lambda tmp: torch.save(saved, tmp))
    _submit_blend(ctx, data, train, val, test, truth, val_truth, run, fold)


def _load_runs(root: Path, current: dict) -> list[dict]:
    """Every configuration's detections.pt in WORK/detect made on the same folds, training data and test images
    as the current run (which comes first); others are named and left out of the blend."""
    runs = [current]
    for path in sorted(root.glob("*/detections.pt")):
        if path.parent.name == current["name"]:
            continue
        other = torch.load(path, weights_only=True)
        if other["split_key"] != current["split_key"]:
            log.info(f"detect: {path.parent.name} left out of the blend: trained on other folds or training data "
                  f"(rerun make detect with its config)")
        elif other["test_key"] != current["test_key"]:
            log.info(f"detect: {path.parent.name} left out of the blend: it predicted other test images "
                  f"(rerun make detect with its config)")
        else:
            runs.append(other)
    return runs


def _submit_blend(ctx: Context, data, train: Arrays, val: Arrays, test: Arrays, truth: list[dict],
                  val_truth: list[dict], current: dict, fold: np.ndarray) -> None:
    """The leaderboard of every configuration in WORK, their WBF blend when there are several, and the submission
    of the fusion with the best OOF mAP@0.5 (ensemble.choose_submission), renamed by the crop classifier when
    detect.classifier.enabled (detect_classifier.py)."""
    cfg, root = ctx.cfg.detect, ctx.work_dir / "detect"
    runs = _load_runs(root, current)
    result = choose_submission(runs, train.sizes, truth, val.sizes, val_truth, test.sizes, cfg.fusion,
                               cfg.decode.max_detections)
    if result.blend_grid is not None:
        write_csv(root / "fusion_grid.csv", result.blend_grid)
    chosen = result.chosen
    if len(runs) > 1:
        log.info(f"detect: {len(runs)} configurations in {root}: submitting {chosen['name']} (OOF mAP@0.5 "
              f"{chosen['oof_scores']['map_50']:.4f}, the best of {result.candidates} fusions on OOF: "
              f"selection-optimistic)")
    metrics = {**chosen["choice"], "oof_map_50": chosen["oof_scores"]["map_50"], "oof_map": chosen["oof_scores"]["map"],
               "views": chosen["views"], "submitted": chosen["name"], "configurations": [r["name"] for r in runs],
               "folds": cfg.folds.n_splits, "fold_keys": {r["name"]: r["fold_keys"] for r in runs},
               "val_source": data.val_source}
    if not cfg.classifier.enabled:
        per_class = class_table(result.oof, truth, data.classes)
        _write_fold_outputs(ctx, data, test, result.oof, result.test, result.board, per_class, metrics)
        return
    fused_val = fuse_chosen(chosen["val"], val.sizes, chosen["choice"], cfg.decode.max_detections) if len(val.sizes) \
        else []
    renamed = rename(ctx, data.key(), data.classes, fold, train, val, test, truth, val_truth,
                     {"oof": result.oof, "val": fused_val, "test": result.test})
    metrics |= renamed.metrics | {"oof_map_50": renamed.metrics["classifier"]["oof_map_50"],
                                  "oof_map": renamed.metrics["classifier"]["oof_map"]}
    _write_fold_outputs(ctx, data, test, renamed.oof, renamed.test, result.board + renamed.rows, renamed.per_class,
                        metrics)


def _write_fold_outputs(ctx: Context, data, test: Arrays, fused_oof: list[dict], fused_test: list[dict],
                        board: list[dict], per_class: pd.DataFrame, metrics: dict) -> None:
    """leaderboard.csv, per_class.csv, oof_detections.csv, metrics.json, galleries and the submission."""
    cfg, out = ctx.cfg.detect, ctx.work_dir / "detect"
    leaderboard = pd.DataFrame(board)
    write_csv(out / "leaderboard.csv", leaderboard)
    write_csv(out / "per_class.csv", per_class)
    oof_frame = submission_frame(data.train.images, fused_oof, data.classes)
    write_csv(out / "oof_detections.csv", oof_frame)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        log.info("detect: leaderboard (OOF: every training image predicted by the fold model that did not see it; "
              "val: the fixed holdout, never used for a choice)\n" + leaderboard.to_string(index=False))
        log.info("detect: OOF AP per class (fused views)\n" + per_class.to_string(index=False))
    log.info(f"detect: OOF mAP@0.5 {metrics['oof_map_50']:.4f}, COCO mAP {metrics['oof_map']:.4f} "
          f"(WBF iou {metrics['iou_thr']:g}, skip {metrics['skip_thr']:g}, {metrics['conf_type']}, chosen on OOF)")
    write_json(out / "metrics.json", metrics | {"per_class": per_class.to_dict("records")})
    frame = submission_frame(data.test.images, above_score(fused_test, cfg.predict.score_threshold), data.classes)
    write_csv(out / "test_predictions.csv", frame)
    n = cfg.predict.gallery_images
    if n:
        threshold = cfg.predict.gallery_score_threshold
        gallery(test.images[:n], above_score(fused_test[:n], threshold), test.sizes[:n], data.classes,
                out / "gallery_test.png")
        train = _arrays(ctx, data.train, data.classes, "train")
        gallery(train.images[:n], above_score(fused_oof[:n], threshold), train.sizes[:n], data.classes,
                out / "gallery_oof.png", truth=train.targets[:n])
    manifest = {"track": "detection", "model": metrics["submitted"], "folds": cfg.folds.n_splits,
                "views": metrics["views"], "wbf_iou": metrics["iou_thr"], "wbf_skip": metrics["skip_thr"],
                "wbf_conf": metrics["conf_type"], "classes": data.classes, **_submission_settings(cfg),
                "oof_map_50": metrics["oof_map_50"], "oof_map": metrics["oof_map"], "config_hash": config_hash(cfg)}
    check = partial(submission.validate_detection, images=data.test.images["image"].tolist(), classes=data.classes)
    submission.write_submission(frame, ctx.submissions_dir, ctx.name, manifest, check)
    log.info(f"detect: submission {ctx.submissions_dir / (ctx.name + '.csv')} ({len(frame)} images); "
          f"{out}/leaderboard.csv, per_class.csv, oof_detections.csv, gallery_oof.png, gallery_test.png")


def _warn_leaks(ctx: Context, leaks: pd.DataFrame | None) -> None:
    """Test images also listed for training: one warning line, and the run goes on (as classification's train/test
    duplicates): the submission needs their predictions all the same, but a score on them is a score on images the
    model trained on."""
    if leaks is None or not len(leaks):
        return
    first = leaks.iloc[0]
    test_csv = ctx.data_dir / ctx.cfg.detect.data.test_csv
    log.warning(f"detect: warning: {len(leaks)} test image(s) also listed for training (a train/test leak), e.g. "
                f"{test_csv} line {first['test_line']}: '{first['image']}' is {first['csv']} line {first['line']}; "
                "remove them from one of the files")


def run(ctx: Context) -> None:
    cfg = ctx.cfg.detect
    runtime.set_threads(ctx.cfg.runtime.threads)
    single = cfg.folds.n_splits == 1
    data = read_detection(ctx.data_dir, cfg.data, ctx.cfg.competition, cfg.train.seed, holdout=single)
    log.info(f"detect: {len(data.train.images)} train images ({len(data.train.boxes)} boxes), "
          f"{len(data.val.images)} val ({data.val_source}), "
          f"{len(data.test.images)} test; classes {data.classes}")
    _warn_leaks(ctx, data.leaks)
    rt = runtime.from_config(ctx.cfg.runtime, "detection")
    val = _arrays(ctx, data.val, data.classes, "val")
    if not single:
        _run_folds(ctx, data, rt, val)
        return
    out = ctx.work_dir / "detect"
    model, model_fp, summary = _train(ctx, data.key(), data.classes, lambda: _arrays(ctx, data.train, data.classes,
                                                                                      "train"),
                                      val, rt, out, cfg.train.seed, {"val_source": data.val_source})
    metrics = _evaluate(ctx, data, model, rt, val, model_fp, summary)
    _predict(ctx, data, model, rt, val, metrics, model_fp)
