"""Export stage: one fold model as ONNX (export/onnx_export.py), checked with onnxruntime on the test images.

Writes WORK/export/<experiment>-fold<k>.onnx and export.json (the max abs difference of logits between torch and
onnxruntime on every test image, and both engines' seconds); refuses when the difference is above
export.tolerance. `export.experiment` and `export.fold` choose the model (default: the first experiment, fold
0); a student of `make distill` (distill-<backbone>) is found under WORK/distill/runs. On a detection folder the
stage exports a fold detector's network part instead (stages/export_detection.py).
"""

from __future__ import annotations

import logging

from pipeline.context import Context
from pipeline.core.artifacts import file_digest, fingerprint, is_done, read_json, write_stamp
from pipeline.core.errors import PipelineError
from pipeline.detection.data import is_detection_folder
from pipeline.export.onnx_export import compare, export_onnx
from pipeline.stages import export_detection
from pipeline.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def run(ctx: Context) -> dict:
    """ONNX of export.experiment's fold export.fold, compared with torch (after the train stage); on a detection
    folder, of a fold detector's network part (stages/export_detection.py, after the detect stage)."""
    if is_detection_folder(ctx.data_dir, ctx.cfg.detect.data.train_csv):
        return export_detection.run(ctx)
    cfg = ctx.cfg.export
    names = [e.name for e in ctx.selected_experiments()]
    name = cfg.experiment or names[0]
    run_dir = ctx.work_dir / "runs" / name / f"fold{cfg.fold}"
    if not (run_dir / "best.json").is_file() and (ctx.work_dir / "distill" / "runs" / name).is_dir():
        run_dir = ctx.work_dir / "distill" / "runs" / name / f"fold{cfg.fold}"  # a student of make distill
    if not (run_dir / "best.json").is_file():
        known = [p.parent.parent.name for root in ("runs", "distill/runs")
                 for p in (ctx.work_dir / root).glob("*/fold*/best.json")]
        raise PipelineError(f"export.experiment={name} export.fold={cfg.fold}: no finished run in {run_dir}; "
                            f"choose one of {sorted(set(known)) or names} (and a trained fold), or run `make train`")
    folds_meta = read_json(ctx.work_dir / "folds.json", "run `make folds`")
    out = ctx.work_dir / "export" / f"{name}-fold{cfg.fold}.onnx"
    stamp = ctx.work_dir / "export" / "export.json"
    test_paths = list(ctx.competition.test["path"])
    fp = fingerprint("export", file_digest(run_dir / "best.json"), file_digest(run_dir / "best.safetensors"),
                     cfg.opset, cfg.tolerance, ctx.competition.test["id"].tolist())
    if is_done(stamp, fp, [out]):
        meta = read_json(stamp, "rerun `make export`")
        log.info(f"export: up to date: {out} (max abs difference of logits {meta['max_abs_diff']:.2e})")
        return meta
    model, meta = load_checkpoint(run_dir, folds_meta["folds_hash"], folds_meta["classes"])
    dynamic_size = export_onnx(model, out, meta["in_chans"], meta["image_size"], cfg.opset)
    images = ctx.decoded_images(test_paths, meta["image_size"], meta["in_chans"], "test")
    check = compare(model, out, images, meta["norm"], ctx.cfg.predict.batch_size)
    result = {"onnx": str(out), "experiment": name, "fold": cfg.fold, "backbone": meta["backbone"],
              "opset": cfg.opset, "image_size": meta["image_size"], "in_chans": meta["in_chans"],
              "norm": meta["norm"], "dynamic_size": dynamic_size, **check}
    if check["max_abs_diff"] > cfg.tolerance:
        raise PipelineError(f"{out}: onnxruntime's logits differ from torch's by {check['max_abs_diff']:.2e} on the "
                            f"test images, above export.tolerance={cfg.tolerance}; try another export.opset")
    write_stamp(stamp, fp, **result)
    n, size = check["images"], "dynamic batch and size" if dynamic_size else f"dynamic batch, {meta['image_size']} px"
    log.info(f"export: {out}: {meta['backbone']}, {size}, opset {cfg.opset}; on {n} test images the max abs "
             f"difference of logits, onnxruntime vs torch, is {check['max_abs_diff']:.2e}; CPU "
             f"{n / max(check['torch_s'], 1e-9):.0f} images/s in torch, {n / max(check['onnx_s'], 1e-9):.0f} in "
             "onnxruntime")
    return result
