"""Detect stage (`make detect`): TinySSD on a detection folder -- train, evaluate, predict, submit.

Writes under WORK/detect/: last.safetensors + last.pt (resume state), model.safetensors and
model.json (stamp: inputs' content key, training keys, classes, training summary), history.csv,
curves.png, metrics.json (validation: class error, bbox MAE, mAP@0.5, COCO mAP), gallery_val.png
(predictions red, truth green), gallery_test.png, test_predictions.csv; and the submission
SUBMISSIONS/<competition>.csv (image, PredictionString). A finished model is not retrained unless
its data or training keys change; changing only thresholds redoes the predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from safetensors.torch import load_file

from . import checkpoint, runtime
from .artifacts import fingerprint, read_json, write_csv, write_json, write_stamp
from .context import Context
from .detection.data import box_targets, decoded, read_detection
from .detection.fit import DetectionTrainer, evaluate
from .detection.infer import TTA, Detector, gallery, parse_prediction_strings, submission_frame
from .detection.tinyssd import TinySSD
from .plots import plot_panels
from .runtime import Runtime

TRAIN_KEYS = ("image_size", "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "loss", "negative_ratio", "hflip", "seed")
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


def _train(ctx: Context, data, model: TinySSD, rt: Runtime, val: Arrays) -> dict:
    """Train (or resume, or load when model.json matches); returns the training summary."""
    cfg, out = ctx.cfg.detect, ctx.work_dir / "detect"
    fp = fingerprint(data.key(), data.val_source, {k: getattr(cfg, k) for k in TRAIN_KEYS},
                     runtime.result_keys(ctx.cfg.runtime))
    stamp = read_json(out / "model.json") or {}
    if stamp.get("fingerprint") == fp and "summary" in stamp and (out / "model.safetensors").exists():
        model.load_state_dict(load_file(str(out / "model.safetensors")))
        print(f"detect: model up to date ({out / 'model.safetensors'})")
        return stamp["summary"]
    out.mkdir(parents=True, exist_ok=True)
    train = _arrays(ctx, data.train, data.classes, "train")  # only when training: the biggest split
    trainer = DetectionTrainer(model, cfg, train.images, train.targets, val.images, val.targets, val.sizes, out, fp, rt)
    history = pd.DataFrame(trainer.fit())
    checkpoint.save_weights(out / "model.safetensors", model)
    write_csv(out / "history.csv", history)
    plot_panels(history, {"loss": ["train_loss"], "errors": ["train_class_err", "val_class_err", "train_bbox_mae", "val_bbox_mae"],
                          "validation mAP": ["map_50", "map"]}, out / "curves.png", f"TinySSD on {ctx.name}", log=("errors",))
    final = history.iloc[-1]
    summary = {"train_class_err": float(final["train_class_err"]), "train_bbox_mae": float(final["train_bbox_mae"]),
               "epochs": len(history), "train_seconds": float(history["seconds"].sum()), "device": str(rt.device)}
    write_stamp(out / "model.json", fp, classes=data.classes, val_source=data.val_source, summary=summary)
    return summary


def _evaluate(ctx: Context, data, model: TinySSD, rt: Runtime, val: Arrays, summary: dict) -> dict:
    """Validation metrics of the final model with the current decoding settings (NMS, thresholds, voting);
    tta auto scores every option and keeps hflip only when it raises mAP@0.5."""
    cfg = ctx.cfg.detect
    options = TTA if cfg.tta == "auto" else (cfg.tta,)
    scored = evaluate(model, cfg, rt, val.images, val.targets, val.sizes, options)
    tta = max(options, key=lambda t: (scored[t]["map_50"], t == "none"))  # ties: the cheaper plain view
    metrics = scored[tta] | summary | {"tta": tta, "map_50_by_tta": {t: scored[t]["map_50"] for t in options},
                                       "nms_threshold": cfg.nms_threshold, "box_voting": cfg.box_voting, "val_source": data.val_source}
    write_json(ctx.work_dir / "detect" / "metrics.json", metrics)
    if len(options) > 1:
        print("detect: validation mAP@0.5 by TTA: " + ", ".join(f"{t} {scored[t]['map_50']:.4f}" for t in options) + f"; kept {tta}")
    print("detect: validation " + ", ".join(f"{k} {metrics[k]:.4g}" for k in METRICS)
          + f" (training {summary['train_seconds']:.0f} s on {summary['device']})")
    return metrics


def _predict(ctx: Context, data, model: TinySSD, rt: Runtime, val: Arrays, test: Arrays, tta: str) -> pd.DataFrame:
    cfg, out = ctx.cfg.detect, ctx.work_dir / "detect"
    detector = Detector(model, cfg, rt, tta)
    detections = detector(test.images, test.sizes, cfg.score_threshold, cfg.batch_size * rt.eval_batch_factor)
    frame = submission_frame(data.test.images, detections, data.classes)
    parse_prediction_strings(frame["PredictionString"].tolist(), data.classes, "submission")  # what we write must read back
    write_csv(out / "test_predictions.csv", frame)
    n = cfg.gallery_images
    if n:
        shown = detector(torch.cat((val.images[:n], test.images[:n])), torch.cat((val.sizes[:n], test.sizes[:n])),
                         cfg.gallery_score_threshold, cfg.batch_size)
        k = len(val.images[:n])
        gallery(val.images[:n], shown[:k], val.sizes[:n], data.classes, out / "gallery_val.png", truth=val.targets[:n])
        gallery(test.images[:n], shown[k:], test.sizes[:n], data.classes, out / "gallery_test.png")
    return frame


def run(ctx: Context) -> None:
    cfg = ctx.cfg.detect
    runtime.set_threads(ctx.cfg.runtime.threads)
    data = read_detection(ctx.data_dir, cfg, ctx.cfg.competition)
    print(f"detect: {len(data.train.images)} train images ({len(data.train.boxes)} boxes), {len(data.val.images)} val ({data.val_source}), "
          f"{len(data.test.images)} test; classes {data.classes}")
    rt = runtime.from_config(ctx.cfg.runtime, "detection")
    torch.manual_seed(cfg.seed)
    model = rt.prepare(TinySSD(len(data.classes)))
    val, test = _arrays(ctx, data.val, data.classes, "val"), _arrays(ctx, data.test, data.classes, "test")
    metrics = _evaluate(ctx, data, model, rt, val, _train(ctx, data, model, rt, val))
    frame = _predict(ctx, data, model, rt, val, test, metrics["tta"])
    path = ctx.submissions_dir / f"{ctx.name}.csv"
    write_csv(path, frame)
    boxes = sum(len(s.split()) // 6 for s in frame["PredictionString"])
    print(f"detect: submission {path} ({len(frame)} images, {boxes} boxes at score >= {cfg.score_threshold}); "
          f"pictures {ctx.work_dir / 'detect'}/gallery_val.png, gallery_test.png, curves.png")
