"""Detect stage (`make detect`): TinySSD or a torchvision detector (`detect.model`) on a detection folder --
train, evaluate, predict, submit.

detect.folds > 1 (the default): one detector per fold of the training images (folds.py: duplicate groups
kept together), each model's views (scales x mirror) of its out-of-fold, holdout and test images
(fold<k>/views.pt, keyed by the model, view and decoding keys and the test images), Weighted Boxes
Fusion with thresholds chosen on OOF (fusion.py), then leaderboard.csv, per_class.csv,
oof_detections.csv, metrics.json and the fused submission (recomputed on every run: seconds).

detect.folds = 1: one model, in three parts, each with its own stamp and key, each redone only when
what it reads changes:
- train: model.safetensors, model.json (stamp), history.csv, curves.png, last.safetensors + last.pt
  (resume state), mlflow.json (its MLflow run: params, per-epoch metrics, curves; pipeline/training/tracking.py).
  Key: train and validation rows and image bytes, classes, TRAIN_KEYS, the model choice (model_keys). The
  per-epoch validation in
  history.csv decodes with the settings of the run that trained.
- evaluate: metrics.json (stamp; validation class error, bbox MAE, mAP@0.5, COCO mAP, chosen TTA).
  Key: the model's key and EVALUATE_KEYS.
- predict: test_predictions.csv, gallery_val.png (predictions red, truth green), gallery_test.png,
  predict.json (stamp) and the submission SUBMISSIONS/<competition>.csv (image, PredictionString),
  written by the submission writer both tracks share. Key: the model's key, the chosen TTA, test ids
  and image bytes, PREDICT_KEYS. Test images are only predicted: changing one never retrains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
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
from pipeline.core.config import config_hash
from pipeline.detection.anchors import auto_anchors, box_shapes
from pipeline.detection.augment import BoxAugment, BoxAugmentSettings
from pipeline.detection.data import box_targets, decoded, read_detection
from pipeline.detection.fit import DetectionTrainer, evaluate
from pipeline.detection.folds import assign_folds, image_groups, main_class
from pipeline.detection.fusion import choose, fuse
from pipeline.detection.infer import TTA, Detector, class_table, gallery, map_of, submission_frame, targets_in_pixels
from pipeline.detection.tinyssd import TinySSD
from pipeline.detection.torchvision_models import NAMES, create, load_pretrained, model_keys
from pipeline.scoring import submission
from pipeline.training import checkpoint, runtime, tracking
from pipeline.training.plots import plot_panels
from pipeline.training.runtime import Runtime

log = logging.getLogger(__name__)

AUGMENT_KEYS = ("vflip", "crop_scale", "scale", "shift", "colour", "mosaic", "min_visibility")
ANCHOR_KEYS = ("anchors", "anchor_sizes", "anchor_ratios")
TRAIN_KEYS = ("image_size", "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "loss",
              "negative_ratio", "hflip", "seed", *AUGMENT_KEYS, *ANCHOR_KEYS)
DECODE_KEYS = ("nms_threshold", "box_voting", "max_detections")
EVALUATE_KEYS = ("tta", "map_score_threshold", *DECODE_KEYS)
PREDICT_KEYS = ("score_threshold", "gallery_images", "gallery_score_threshold", *DECODE_KEYS)
VIEW_KEYS = ("tta_scales", "fusion_hflip", "map_score_threshold", *DECODE_KEYS)
METRICS = ("val_class_err", "val_bbox_mae", "map_50", "map")


@dataclass
class Arrays:
    """One split as the network sees it, decoded once per stage run."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    targets: torch.Tensor  # (N, G, 5) normalised boxes, class -1 pads
    sizes: torch.Tensor  # (N, 2) width, height in pixels

    def take(self, idx) -> Arrays:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Arrays(self.images[idx], self.targets[idx], self.sizes[idx])


def _arrays(ctx: Context, split, classes: list[str], name: str) -> Arrays:
    size = ctx.cfg.detect.image_size
    if not len(split.images):
        return Arrays(torch.zeros(0, 3, size, size, dtype=torch.uint8), box_targets(split, classes), torch.zeros(0, 2))
    return Arrays(decoded(split, ctx.work_dir / "cache", size, f"detect-{name}"), box_targets(split, classes),
                  torch.tensor(split.images[["width", "height"]].to_numpy(), dtype=torch.float32))


def _keys(cfg, names: tuple[str, ...]) -> dict:
    return {k: getattr(cfg, k) for k in names}


def anchors_for(cfg, targets: torch.Tensor) -> tuple[list[list[float]], list[float]]:
    """The configured anchors, or with anchors=auto the k-means of these training boxes (anchors.py)."""
    if cfg.anchors == "fixed":
        return cfg.anchor_sizes, cfg.anchor_ratios
    return auto_anchors(box_shapes(targets), len(cfg.anchor_sizes), len(cfg.anchor_sizes[0]), len(cfg.anchor_ratios),
                        cfg.seed)


def augment_settings(cfg) -> BoxAugmentSettings:
    return BoxAugmentSettings(hflip=cfg.hflip, vflip=cfg.vflip, crop_scale=cfg.crop_scale, scale=cfg.scale,
                              shift=cfg.shift, colour=cfg.colour, mosaic=cfg.mosaic, min_visibility=cfg.min_visibility)


def _model_keys(cfg) -> dict:
    return model_keys(cfg.model, cfg.backbone, cfg.fpn_channels, cfg.pretrained_path)


def _build(cfg, n_classes: int, sizes: list[list[float]], ratios: list[float]) -> torch.nn.Module:
    """TinySSD with these anchors, or the torchvision detector detect.model names (its own anchors)."""
    if cfg.model == "tinyssd":
        return TinySSD(n_classes, sizes, ratios)
    return create(cfg.model, n_classes, cfg.image_size, cfg.backbone, cfg.fpn_channels)


def _train(ctx: Context, data_key: str, classes: list[str], train: Callable[[], Arrays], val: Arrays, rt: Runtime,
           out: Path, seed: int, extra: dict | None = None) -> tuple[torch.nn.Module, str, dict]:
    """Train one detector (or resume, or load when model.json matches); returns it, its key and the training
    summary. `train` decodes the training arrays only when training is needed (the biggest split)."""
    cfg = ctx.cfg.detect
    choice = _model_keys(cfg)  # left out for plain TinySSD: its key stays that of runs from before detect.model
    fp = fingerprint(data_key, _keys(cfg, TRAIN_KEYS), seed, runtime.result_keys(ctx.cfg.runtime),
                     *([] if choice == {"model": "tinyssd"} else [choice]))
    stamp = read_stamp(out / "model.json") or {}
    if stamp.get("fingerprint") == fp and "summary" in stamp and (out / "model.safetensors").exists():
        model = rt.prepare(_build(cfg, len(classes), stamp["anchor_sizes"], stamp["anchor_ratios"]))
        model.load_state_dict(load_file(str(out / "model.safetensors")))
        log.info(f"detect: model up to date ({out / 'model.safetensors'})")
        return model, fp, stamp["summary"]
    out.mkdir(parents=True, exist_ok=True)
    arrays = train()
    sizes, ratios = anchors_for(cfg, arrays.targets)
    if cfg.anchors == "auto" and cfg.model == "tinyssd":
        log.info(f"detect: anchors from the training boxes: sizes {sizes}, ratios {ratios}")
    torch.manual_seed(seed)
    model = rt.prepare(_build(cfg, len(classes), sizes, ratios))
    if cfg.pretrained_path:  # before any training; a resumed run then loads its own last weights over these
        log.info(f"detect: initialised from the {load_pretrained(model, cfg.pretrained_path)}")
    settings = augment_settings(cfg)
    augment = BoxAugment(settings, arrays.images, arrays.targets, seed) if settings.active else None
    trainer = DetectionTrainer(model, cfg, arrays.images, arrays.targets, val.images, val.targets, val.sizes, out, fp,
                               rt, augment)
    tcfg = ctx.cfg.tracking
    track = tracking.start(tracking.Settings(tcfg.backend, tcfg.uri, tcfg.experiment or ctx.name, ctx.work_dir), out,
                           cfg.model, fp, {"model": NAMES[cfg.model],
                                           **tracking.flatten({"detect": _keys(cfg, TRAIN_KEYS) | _model_keys(cfg)}),
                                           **(extra or {})}, {"stage": "detect"})
    try:
        history = pd.DataFrame(trainer.fit())
    except BaseException as exc:
        track.stop(exc)
        raise
    checkpoint.save_weights(out / "model.safetensors", model)
    write_csv(out / "history.csv", history)
    terms = [c for c in history.columns if c.startswith("train_") and c != "train_loss"]  # TinySSD: the course's
    errors = {"errors": ["train_class_err", "val_class_err", "train_bbox_mae", "val_bbox_mae"]}
    plot_panels(history, {"loss": ["train_loss"] + ([] if cfg.model == "tinyssd" else terms),
                          **(errors if cfg.model == "tinyssd" else {}), "validation mAP": ["map_50", "map"]},
                out / "curves.png", f"{NAMES[cfg.model]} on {ctx.name}", log=("errors",))
    # before the stamp (tracking.py)
    track.finish(history.to_dict("records"), [out / "history.csv", out / "curves.png"])
    final = history.iloc[-1]
    summary = {**{c: float(final[c]) for c in terms}, "epochs": len(history),
               "train_seconds": float(history["seconds"].sum()), "device": str(rt.device),
               "peak_rss_gb": round(runtime.peak_rss_gb(), 2)}
    write_stamp(out / "model.json", fp, classes=classes, summary=summary, anchor_sizes=sizes, anchor_ratios=ratios,
                **(extra or {}))
    return model, fp, summary


def _evaluate(ctx: Context, data, model: torch.nn.Module, rt: Runtime, val: Arrays, model_fp: str,
              summary: dict) -> dict:
    """Validation metrics of the final model with the current decoding settings (NMS, thresholds, voting);
    tta auto scores every option and keeps hflip only when it raises mAP@0.5."""
    cfg, path = ctx.cfg.detect, ctx.work_dir / "detect" / "metrics.json"
    fp = fingerprint("detect-evaluate", model_fp, _keys(cfg, EVALUATE_KEYS))
    if is_done(path, fp):
        metrics = read_json(path, "rerun `make detect`")
        log.info(f"detect: validation up to date ({path}): mAP@0.5 {metrics['map_50']:.4g}, tta {metrics['tta']}")
        return metrics
    options = TTA if cfg.tta == "auto" else (cfg.tta,)
    scored = evaluate(model, cfg, rt, val.images, val.targets, val.sizes, options)
    tta = max(options, key=lambda t: (scored[t]["map_50"], t == "none"))  # ties: the cheaper plain view
    metrics = scored[tta] | summary | {"tta": tta, "map_50_by_tta": {t: scored[t]["map_50"] for t in options},
                                       "nms_threshold": cfg.nms_threshold, "box_voting": cfg.box_voting,
                                       "val_source": data.val_source}
    write_stamp(path, fp, **metrics)
    if len(options) > 1:
        log.info("detect: validation mAP@0.5 by TTA: " + ", ".join(f"{t} {scored[t]['map_50']:.4f}" for t in options)
              + f"; kept {tta}")
    log.info("detect: validation " + ", ".join(f"{k} {metrics[k]:.4g}" for k in METRICS if k in metrics)
          + f" (training {summary['train_seconds']:.0f} s on {summary['device']}, "
          f"peak memory {summary.get('peak_rss_gb', float('nan')):.1f} GB)")
    return metrics


def _predict(ctx: Context, data, model: torch.nn.Module, rt: Runtime, val: Arrays, metrics: dict,
             model_fp: str) -> None:
    """Test detections, galleries and the submission, checked by the submission writer (every test image once,
    PredictionStrings that parse) and written with its manifest and history copy."""
    cfg, out = ctx.cfg.detect, ctx.work_dir / "detect"
    path = ctx.submissions_dir / f"{ctx.name}.csv"
    fp = fingerprint("detect-predict", model_fp, metrics["tta"], data.test_key(), _keys(cfg, PREDICT_KEYS))
    if is_done(out / "predict.json", fp, [out / "test_predictions.csv", path]):
        log.info(f"detect: predictions up to date; submission {path}")
        return
    test = _arrays(ctx, data.test, data.classes, "test")
    detector = Detector(model, cfg, rt, metrics["tta"])
    detections = detector(test.images, test.sizes, cfg.score_threshold, cfg.batch_size * rt.eval_batch_factor)
    frame = submission_frame(data.test.images, detections, data.classes)
    write_csv(out / "test_predictions.csv", frame)
    n = cfg.gallery_images
    if n:
        shown = detector(torch.cat((val.images[:n], test.images[:n])), torch.cat((val.sizes[:n], test.sizes[:n])),
                         cfg.gallery_score_threshold, cfg.batch_size)
        k = len(val.images[:n])
        gallery(val.images[:n], shown[:k], val.sizes[:n], data.classes, out / "gallery_val.png", truth=val.targets[:n])
        gallery(test.images[:n], shown[k:], test.sizes[:n], data.classes, out / "gallery_test.png")
    manifest = {"track": "detection", "model": NAMES[cfg.model], "model_key": model_fp, "classes": data.classes,
                "tta": metrics["tta"], **_keys(cfg, PREDICT_KEYS), "val_map_50": metrics["map_50"],
                "val_map": metrics["map"], "val_source": data.val_source, "config_hash": config_hash(cfg)}
    check = partial(submission.validate_detection, images=data.test.images["image"].tolist(), classes=data.classes)
    submission.write_submission(frame, ctx.submissions_dir, ctx.name, manifest, check)
    write_stamp(out / "predict.json", fp, submission=str(path))
    boxes = sum(len(s.split()) // 6 for s in frame["PredictionString"])
    log.info(f"detect: submission {path} ({len(frame)} images, {boxes} boxes at score >= {cfg.score_threshold}); "
          f"pictures {out}/gallery_val.png, gallery_test.png, curves.png")


def view_names(cfg) -> list[str]:
    """The test-time views fused by WBF: every scale of tta_scales, plain and (fusion_hflip) mirrored."""
    return [f"x{scale:g}{flip}" for scale in cfg.tta_scales for flip in (("", "+hflip") if cfg.fusion_hflip else ("",))]


def view_detections(model: torch.nn.Module, cfg, rt: Runtime, arrays: Arrays, view: str) -> list[dict]:
    """One view's detections (NMS and box voting of one model) in pixels of the original images."""
    scale, flip = float(view[1:].split("+")[0]), view.endswith("+hflip")
    images = arrays.images
    if scale != 1 and len(images):
        side = max(32, round(images.shape[-1] * scale))
        images = F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=scale < 1,
                               align_corners=False).round().clamp(0, 255).to(torch.uint8)
    found = Detector(model, cfg, rt, "none")(images.flip(-1) if flip else images, arrays.sizes,
                                             cfg.map_score_threshold, cfg.batch_size * rt.eval_batch_factor)
    if flip:
        for det, (w, _) in zip(found, arrays.sizes.tolist(), strict=True):
            det["boxes"] = torch.stack((w - det["boxes"][:, 2], det["boxes"][:, 1], w - det["boxes"][:, 0],
                                        det["boxes"][:, 3]), 1)
    return found


def _fold_views(ctx: Context, model: torch.nn.Module, model_fp: str, rt: Runtime, parts: dict[str, Arrays], out: Path,
                test_key: str) -> dict[str, dict[str, list[dict]]]:
    """{part: {view: detections}} of one fold model for its out-of-fold images, the holdout and test; cached in
    views.pt (stamp views.json: the model's key, the view and decoding keys, the test images)."""
    cfg = ctx.cfg.detect
    fp = fingerprint("detect-views", model_fp, _keys(cfg, VIEW_KEYS), test_key)
    if is_done(out / "views.json", fp, [out / "views.pt"]):
        return torch.load(out / "views.pt", weights_only=True)
    found = {part: {v: view_detections(model, cfg, rt, arrays, v) for v in view_names(cfg)}
             for part, arrays in parts.items()}
    atomic_write(out / "views.pt", lambda tmp: torch.save(found, tmp))
    write_stamp(out / "views.json", fp)
    return found


def _score(detections: list[dict], targets: list[dict]) -> dict:
    return map_of(detections, targets) if targets else {"map_50": float("nan"), "map": float("nan")}


def run_name(cfg) -> str:
    """The folder and leaderboard name of one detector configuration: detect.name, else the model (and backbone)."""
    if cfg.name:
        return cfg.name
    return cfg.model if cfg.model in ("tinyssd", "ssdlite") else f"{cfg.model}-{cfg.backbone}"


def _run_folds(ctx: Context, data, rt: Runtime, val: Arrays) -> None:
    """One detector per fold, views of each, WBF thresholds on OOF; then the blend of every configuration in WORK."""
    cfg, root = ctx.cfg.detect, ctx.work_dir / "detect"
    name = run_name(cfg)
    train, test = _arrays(ctx, data.train, data.classes, "train"), _arrays(ctx, data.test, data.classes, "test")
    names = data.train.images["image"].tolist()
    groups = image_groups(names, ctx.work_dir / "clean.csv")
    strata = main_class(len(names), data.train.boxes["item"].to_numpy(), data.train.boxes["label"].to_numpy())
    fold = assign_folds(groups, strata, cfg.folds, cfg.seed)
    write_csv(root / "folds.csv", pd.DataFrame({"image": names, "group": groups, "fold": fold}))
    views = view_names(cfg)
    truth, val_truth = targets_in_pixels(train.targets, train.sizes), targets_in_pixels(val.targets, val.sizes)
    oof: dict[str, list] = {v: [None] * len(names) for v in views}
    val_views, test_views, board, fps = [], [], [], []
    for k in range(cfg.folds):
        held, rest = np.nonzero(fold == k)[0], np.nonzero(fold != k)[0]
        key = fingerprint(data.key(), "fold", k, cfg.folds, [names[i] for i in held])
        model, fp, summary = _train(ctx, key, data.classes, lambda rest=rest: train.take(rest), train.take(held), rt,
                                    root / name / f"fold{k}", cfg.seed + k, {"fold": k})
        found = _fold_views(ctx, model, fp, rt, {"oof": train.take(held), "val": val, "test": test},
                            root / name / f"fold{k}", data.test_key())
        for v in views:
            for j, i in enumerate(held):
                oof[v][i] = found["oof"][v][j]
        val_views.append(found["val"])
        test_views.append(found["test"])
        fps.append(fp)
        plain = _score(found["oof"][views[0]], [truth[i] for i in held])
        board.append({"entry": f"{name} fold{k}", "kind": "model", "views": views[0],
                      "oof_map_50": plain["map_50"], "oof_map": plain["map"],
                      **_prefixed("val", _score(found["val"][views[0]], val_truth)),
                      "train_seconds": round(summary["train_seconds"], 1)})
    for v in views:
        board.append({"entry": f"{name} all folds, {v}", "kind": "model (OOF)", "views": v,
                      **_prefixed("oof", map_of(oof[v], truth))})
    run = {"name": name, "split_key": fingerprint(data.key(), names, fold.tolist()), "test_key": data.test_key(),
           "fold_keys": fps, "views": views, "oof": [oof[v] for v in views],
           "val": [f[v] for f in val_views for v in views], "test": [f[v] for f in test_views for v in views]}
    run |= _fusion_rows(ctx, f"{name} wbf folds x views", run, train.sizes, truth, val, val_truth, board,
                        root / name / "fusion_grid.csv", (f"{name} wbf folds", [f[views[0]] for f in val_views]))
    run["board"] = board
    atomic_write(root / name / "detections.pt", lambda tmp: torch.save(run, tmp))
    _blend_runs(ctx, data, train, val, test, truth, val_truth, run)


def _fusion_rows(ctx: Context, entry: str, run: dict, sizes: torch.Tensor, truth: list[dict], val: Arrays,
                 val_truth: list[dict], board: list[dict], grid_csv: Path,
                 val_plain: tuple[str, list[list[dict]]] | None = None) -> dict:
    """WBF of the run's OOF views with thresholds chosen on OOF (the grid's scores to grid_csv); its leaderboard
    rows (OOF and holdout; with val_plain (entry, the fold models' plain holdout views) also that fusion alone on
    the holdout); the choice and its OOF scores."""
    cfg = ctx.cfg.detect
    choice, grid = choose(run["oof"], truth, sizes, cfg.fusion_iou, cfg.fusion_skip, cfg.max_detections,
                          tuple(cfg.fusion_conf))
    write_csv(grid_csv, grid)
    oof_scores = map_of(_fuse(run["oof"], sizes, choice, cfg.max_detections), truth)
    tag = f"iou {choice['iou_thr']:g}, skip {choice['skip_thr']:g}, {choice['conf_type']}"
    row = {"entry": f"{entry} ({tag})", "kind": "fusion", "views": "+".join(run["views"]),
           **_prefixed("oof", oof_scores)}
    if len(val.images):
        row |= _prefixed("val", map_of(_fuse(run["val"], val.sizes, choice, cfg.max_detections), val_truth))
        if val_plain:
            plain_entry, lists = val_plain
            fused = _fuse(lists, val.sizes, choice, cfg.max_detections)
            board.append({"entry": f"{plain_entry}, {run['views'][0]} ({tag})", "kind": "fusion",
                          "views": run["views"][0], **_prefixed("val", map_of(fused, val_truth))})
    board.append(row)
    return {"choice": choice, "oof_scores": oof_scores}


def _fuse(lists: list[list[dict]], sizes: torch.Tensor, choice: dict, max_detections: int) -> list[dict]:
    """WBF with the thresholds and score rule chosen on OOF."""
    return fuse(lists, sizes, choice["iou_thr"], choice["skip_thr"], max_detections, choice["conf_type"])


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


def _blend_runs(ctx: Context, data, train: Arrays, val: Arrays, test: Arrays, truth: list[dict],
                val_truth: list[dict], current: dict) -> None:
    """The leaderboard of every configuration in WORK, their WBF blend when there are several, and the submission
    of the fusion with the best OOF mAP@0.5 (with several, a choice on OOF: that figure is selection-optimistic)."""
    cfg, root = ctx.cfg.detect, ctx.work_dir / "detect"
    runs = _load_runs(root, current)
    board = [row for run in runs for row in run["board"]]
    candidates = list(runs)
    if len(runs) > 1:
        blend = {"name": "wbf models", "views": [f"{r['name']}:{v}" for r in runs for v in r["views"]],
                 **{part: [x for r in runs for x in r[part]] for part in ("oof", "val", "test")}}
        blend |= _fusion_rows(ctx, "wbf models " + " + ".join(r["name"] for r in runs), blend, train.sizes, truth,
                              val, val_truth, board, root / "fusion_grid.csv")
        candidates.append(blend)
    chosen = max(candidates, key=lambda c: (c["oof_scores"]["map_50"], c["oof_scores"]["map"]))
    fused_oof = _fuse(chosen["oof"], train.sizes, chosen["choice"], cfg.max_detections)
    fused_test = _fuse(chosen["test"], test.sizes, chosen["choice"], cfg.max_detections)
    if len(runs) > 1:
        log.info(f"detect: {len(runs)} configurations in {root}: submitting {chosen['name']} (OOF mAP@0.5 "
              f"{chosen['oof_scores']['map_50']:.4f}, the best of {len(candidates)} fusions on OOF: "
              f"selection-optimistic)")
    per_class = class_table(fused_oof, truth, data.classes)
    _write_fold_outputs(ctx, data, val, test, fused_oof, fused_test, board, per_class,
                        {**chosen["choice"], "oof_map_50": chosen["oof_scores"]["map_50"],
                         "oof_map": chosen["oof_scores"]["map"], "views": chosen["views"], "submitted": chosen["name"],
                         "configurations": [r["name"] for r in runs], "folds": cfg.folds,
                         "fold_keys": {r["name"]: r["fold_keys"] for r in runs}, "val_source": data.val_source})


def _prefixed(prefix: str, scores: dict) -> dict:
    return {f"{prefix}_{k}": round(v, 4) for k, v in scores.items()}


def _keep(detections: list[dict], threshold: float) -> list[dict]:
    return [{k: v[d["scores"] >= threshold] for k, v in d.items()} for d in detections]


def _write_fold_outputs(ctx: Context, data, val: Arrays, test: Arrays, fused_oof: list[dict], fused_test: list[dict],
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
    frame = submission_frame(data.test.images, _keep(fused_test, cfg.score_threshold), data.classes)
    write_csv(out / "test_predictions.csv", frame)
    n = cfg.gallery_images
    if n:
        threshold = cfg.gallery_score_threshold
        gallery(test.images[:n], _keep(fused_test[:n], threshold), test.sizes[:n], data.classes,
                out / "gallery_test.png")
        train = _arrays(ctx, data.train, data.classes, "train")
        gallery(train.images[:n], _keep(fused_oof[:n], threshold), train.sizes[:n], data.classes,
                out / "gallery_oof.png", truth=train.targets[:n])
    manifest = {"track": "detection", "model": metrics["submitted"], "folds": cfg.folds, "views": metrics["views"],
                "wbf_iou": metrics["iou_thr"], "wbf_skip": metrics["skip_thr"], "wbf_conf": metrics["conf_type"],
                "classes": data.classes,
                **_keys(cfg, PREDICT_KEYS), "oof_map_50": metrics["oof_map_50"], "oof_map": metrics["oof_map"],
                "config_hash": config_hash(cfg)}
    check = partial(submission.validate_detection, images=data.test.images["image"].tolist(), classes=data.classes)
    submission.write_submission(frame, ctx.submissions_dir, ctx.name, manifest, check)
    log.info(f"detect: submission {ctx.submissions_dir / (ctx.name + '.csv')} ({len(frame)} images); "
          f"{out}/leaderboard.csv, per_class.csv, oof_detections.csv, gallery_oof.png, gallery_test.png")


def run(ctx: Context) -> None:
    cfg = ctx.cfg.detect
    runtime.set_threads(ctx.cfg.runtime.threads)
    data = read_detection(ctx.data_dir, cfg, ctx.cfg.competition, holdout=cfg.folds == 1)
    log.info(f"detect: {len(data.train.images)} train images ({len(data.train.boxes)} boxes), "
          f"{len(data.val.images)} val ({data.val_source}), "
          f"{len(data.test.images)} test; classes {data.classes}")
    rt = runtime.from_config(ctx.cfg.runtime, "detection")
    val = _arrays(ctx, data.val, data.classes, "val")
    if cfg.folds > 1:
        _run_folds(ctx, data, rt, val)
        return
    out = ctx.work_dir / "detect"
    model, model_fp, summary = _train(ctx, data.key(), data.classes, lambda: _arrays(ctx, data.train, data.classes,
                                                                                      "train"),
                                      val, rt, out, cfg.seed, {"val_source": data.val_source})
    metrics = _evaluate(ctx, data, model, rt, val, model_fp, summary)
    _predict(ctx, data, model, rt, val, metrics, model_fp)
