"""Detect stage (`make detect`): TinySSD or a torchvision detector (`detect.model`) on a detection folder --
train, evaluate, predict, submit.

Three parts, each with its own stamp and key, each redone only when what it reads changes:
- train: model.safetensors, model.json (stamp), history.csv, curves.png, last.safetensors + last.pt
  (resume state), mlflow.json (its MLflow run: params, per-epoch metrics, curves; pipeline/tracking.py).
  Key: train and validation rows and image bytes, classes, TRAIN_KEYS, the model choice
  (torchvision_models.model_keys: model, its backbone keys, the pretrained file's bytes). The per-epoch validation in
  history.csv decodes with the settings of the run that trained.
- evaluate: metrics.json (stamp; validation class error, bbox MAE, mAP@0.5, COCO mAP, chosen TTA).
  Key: the model's key and EVALUATE_KEYS.
- predict: test_predictions.csv, gallery_val.png (predictions red, truth green), gallery_test.png,
  predict.json (stamp) and the submission SUBMISSIONS/<competition>.csv (image, PredictionString),
  written by the submission writer both tracks share. Key: the model's key, the chosen TTA, test ids
  and image bytes, PREDICT_KEYS. Test images are only predicted: changing one never retrains.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pandas as pd
import torch
from safetensors.torch import load_file

from . import checkpoint, runtime, submission, tracking
from .artifacts import fingerprint, is_done, read_json, read_stamp, write_csv, write_stamp
from .config import config_hash
from .context import Context
from .detection.data import box_targets, decoded, read_detection
from .detection.fit import DetectionTrainer, evaluate
from .detection.infer import TTA, Detector, gallery, submission_frame
from .detection.torchvision_models import NAMES, create, load_pretrained, model_keys
from .plots import plot_panels
from .runtime import Runtime

TRAIN_KEYS = ("image_size", "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "loss",
              "negative_ratio", "hflip", "seed")
DECODE_KEYS = ("nms_threshold", "box_voting", "max_detections")
EVALUATE_KEYS = ("tta", "map_score_threshold", *DECODE_KEYS)
PREDICT_KEYS = ("score_threshold", "gallery_images", "gallery_score_threshold", *DECODE_KEYS)
METRICS = ("val_class_err", "val_bbox_mae", "map_50", "map")


@dataclass
class Arrays:
    """One split as the network sees it, decoded once per stage run."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    targets: torch.Tensor  # (N, G, 5) normalised boxes, class -1 pads
    sizes: torch.Tensor  # (N, 2) width, height in pixels


def _arrays(ctx: Context, split, classes: list[str], name: str) -> Arrays:
    size = ctx.cfg.detect.image_size
    return Arrays(decoded(split, ctx.work_dir / "cache", size, f"detect-{name}"), box_targets(split, classes),
                  torch.tensor(split.images[["width", "height"]].to_numpy(), dtype=torch.float32))


def _keys(cfg, names: tuple[str, ...]) -> dict:
    return {k: getattr(cfg, k) for k in names}


def _model_keys(cfg) -> dict:
    return model_keys(cfg.model, cfg.backbone, cfg.fpn_channels, cfg.pretrained_path)


def _train(ctx: Context, data, model: torch.nn.Module, rt: Runtime, val: Arrays) -> tuple[str, dict]:
    """Train (or resume, or load when model.json matches); returns the model's key and the training summary."""
    cfg, out = ctx.cfg.detect, ctx.work_dir / "detect"
    choice = _model_keys(cfg)  # left out for plain TinySSD: the key of runs from before detect.model stays the same
    fp = fingerprint(data.key(), _keys(cfg, TRAIN_KEYS), runtime.result_keys(ctx.cfg.runtime),
                     *([] if choice == {"model": "tinyssd"} else [choice]))
    stamp = read_stamp(out / "model.json") or {}
    if stamp.get("fingerprint") == fp and "summary" in stamp and (out / "model.safetensors").exists():
        model.load_state_dict(load_file(str(out / "model.safetensors")))
        print(f"detect: model up to date ({out / 'model.safetensors'})")
        return fp, stamp["summary"]
    if cfg.pretrained_path:  # before any training; a resumed run then loads its own last weights over these
        print(f"detect: initialised from the {load_pretrained(model, cfg.pretrained_path)}")
    out.mkdir(parents=True, exist_ok=True)
    train = _arrays(ctx, data.train, data.classes, "train")  # only when training: the biggest split
    trainer = DetectionTrainer(model, cfg, train.images, train.targets, val.images, val.targets, val.sizes, out, fp, rt)
    tcfg = ctx.cfg.tracking
    track = tracking.start(tracking.Settings(tcfg.backend, tcfg.uri, tcfg.experiment or ctx.name, ctx.work_dir), out,
                           cfg.model, fp, {"model": NAMES[cfg.model],
                                           **tracking.flatten({"detect": _keys(cfg, TRAIN_KEYS) | _model_keys(cfg)})},
                           {"stage": "detect"})
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
    write_stamp(out / "model.json", fp, classes=data.classes, val_source=data.val_source, summary=summary)
    return fp, summary


def _evaluate(ctx: Context, data, model: torch.nn.Module, rt: Runtime, val: Arrays, model_fp: str,
              summary: dict) -> dict:
    """Validation metrics of the final model with the current decoding settings (NMS, thresholds, voting);
    tta auto scores every option and keeps hflip only when it raises mAP@0.5."""
    cfg, path = ctx.cfg.detect, ctx.work_dir / "detect" / "metrics.json"
    fp = fingerprint("detect-evaluate", model_fp, _keys(cfg, EVALUATE_KEYS))
    if is_done(path, fp):
        metrics = read_json(path, "rerun `make detect`")
        print(f"detect: validation up to date ({path}): mAP@0.5 {metrics['map_50']:.4g}, tta {metrics['tta']}")
        return metrics
    options = TTA if cfg.tta == "auto" else (cfg.tta,)
    scored = evaluate(model, cfg, rt, val.images, val.targets, val.sizes, options)
    tta = max(options, key=lambda t: (scored[t]["map_50"], t == "none"))  # ties: the cheaper plain view
    metrics = scored[tta] | summary | {"tta": tta, "map_50_by_tta": {t: scored[t]["map_50"] for t in options},
                                       "nms_threshold": cfg.nms_threshold, "box_voting": cfg.box_voting,
                                       "val_source": data.val_source}
    write_stamp(path, fp, **metrics)
    if len(options) > 1:
        print("detect: validation mAP@0.5 by TTA: " + ", ".join(f"{t} {scored[t]['map_50']:.4f}" for t in options)
              + f"; kept {tta}")
    print("detect: validation " + ", ".join(f"{k} {metrics[k]:.4g}" for k in METRICS if k in metrics)
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
        print(f"detect: predictions up to date; submission {path}")
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
    print(f"detect: submission {path} ({len(frame)} images, {boxes} boxes at score >= {cfg.score_threshold}); "
          f"pictures {out}/gallery_val.png, gallery_test.png, curves.png")


def run(ctx: Context) -> None:
    cfg = ctx.cfg.detect
    runtime.set_threads(ctx.cfg.runtime.threads)
    data = read_detection(ctx.data_dir, cfg, ctx.cfg.competition)
    print(f"detect: {len(data.train.images)} train images ({len(data.train.boxes)} boxes), "
          f"{len(data.val.images)} val ({data.val_source}), "
          f"{len(data.test.images)} test; classes {data.classes}")
    rt = runtime.from_config(ctx.cfg.runtime, "detection")
    torch.manual_seed(cfg.seed)
    model = rt.prepare(create(cfg.model, len(data.classes), cfg.image_size, cfg.backbone, cfg.fpn_channels))
    val = _arrays(ctx, data.val, data.classes, "val")
    model_fp, summary = _train(ctx, data, model, rt, val)
    metrics = _evaluate(ctx, data, model, rt, val, model_fp, summary)
    _predict(ctx, data, model, rt, val, metrics, model_fp)
