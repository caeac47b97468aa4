"""The bundle stage's detection half (stages/bundle.py calls it for a detection folder): the detection track's
submitted detector as an offline folder, submissions/<competition>-bundle/.

Reads what `make detect` wrote and checks that it made the submission with this config before packing it:
- detect.folds.n_splits > 1: WORK/detect/metrics.json (the submitted configuration, its views, the WBF thresholds
  chosen on OOF), folds.csv, and per fold model fold<k>/model.json, model.safetensors and views.json, whose keys are
  recomputed from the data and this config (stages/detect.py's train_key and views_key); then the fused test
  detections, recomputed from <configuration>/detections.pt with the spec's WBF parameters and score threshold,
  must give the submission CSV back string for string.
- detect.folds.n_splits = 1: model.json, model.safetensors, metrics.json (the TTA chosen on validation) and
  predict.json, whose keys (train, evaluate and predict keys) must all match this config.
Skipped when the bundle's stamp (spec.json's fingerprint) matches all of these and the bundle's source files.
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path

import ensemble_boxes
import pandas as pd
import torch

from pipeline.context import Context
from pipeline.core.artifacts import file_digest, fingerprint, read_json, read_stamp
from pipeline.core.errors import PipelineError
from pipeline.data.competition import ID_CANDIDATES, image_location
from pipeline.data.images import MAX_PIXELS
from pipeline.detection.data import read_detection
from pipeline.detection.ensemble import above_score, configuration_name, fuse_chosen
from pipeline.detection.infer import submission_frame
from pipeline.export import bundle, bundle_detection, bundle_predict
from pipeline.stages.detect import evaluate_key, model_key, predict_key, train_key, views_key
from pipeline.training import runtime

log = logging.getLogger(__name__)
WBF_SOURCE = Path(ensemble_boxes.__file__).with_name("ensemble_boxes_wbf.py")
AGAIN = "run `make detect` again with this config (or `make bundle` with the config that made the submission)"


def _refuse_settings(ctx: Context) -> None:
    """The export keys a detection bundle cannot honour exactly."""
    e = ctx.cfg.export
    if e.bundle_of != "ensemble":
        raise PipelineError(f"export.bundle_of={e.bundle_of}: the detection track has no distilled student; "
                            "set export.bundle_of=ensemble")
    if e.bundle_folds is not None:
        raise PipelineError("export.bundle_folds: a detection bundle keeps every fold model (the WBF thresholds were "
                            "chosen on all of them); set export.bundle_folds=null")
    if e.bundle_onnx:
        raise PipelineError("export.bundle_onnx=true: detection bundles run on torch only (torchvision's detectors "
                            "and NMS); set export.bundle_onnx=false")
    if ctx.cfg.detect.classifier.enabled:
        raise PipelineError("detect.classifier.enabled=true: the submission's boxes are renamed by the crop "
                            "classifier, which detection bundles do not carry; bundle the detector alone with "
                            "detect.classifier.enabled=false")


def _check(stamp: dict | None, expected: str, path: Path) -> dict:
    if stamp is None:
        raise PipelineError(f"{path}: not found or unreadable; run `make detect` first")
    if stamp.get("fingerprint") != expected:
        raise PipelineError(f"{path}: made with other data or detect settings than this config's; {AGAIN}")
    return stamp


def _model_spec(cfg, name: str, n_classes: int) -> dict:
    m = cfg.model
    fpn = m.name in ("retinanet", "fcos")
    return {"name": name, "family": m.name, "backbone": m.backbone if fpn else None,
            "fpn_channels": m.fpn_channels if fpn else None, "image_size": cfg.train.image_size,
            "num_classes": n_classes, "folds": []}


def _decode(cfg) -> dict:
    return {"nms_threshold": cfg.decode.nms_threshold, "box_voting": cfg.decode.box_voting,
            "max_detections": cfg.decode.max_detections}


def _folds(ctx: Context, data, channels_last: bool) -> tuple[dict, dict, list[Path]]:
    """(spec["detection"], {bundle path: weight file}, the files read) of the k-fold ensemble's submission."""
    cfg, root = ctx.cfg.detect, ctx.work_dir / "detect"
    metrics_file = root / "metrics.json"
    metrics = read_json(metrics_file, "run `make detect` first")
    name = configuration_name(cfg.folds.name, cfg.model)
    submitted = metrics["submitted"]
    if submitted != name:
        if submitted == "wbf models":
            raise PipelineError(f"{metrics_file}: the submission is the WBF blend of configurations "
                                f"{metrics['configurations']}, and a bundle holds the one configuration its config "
                                "describes (detect.folds.name); give each configuration its own WORK, or remove the "
                                "others' folders from WORK/detect, and run `make detect bundle` again")
        raise PipelineError(f"{metrics_file}: the submission is configuration '{submitted}', this config's is "
                            f"'{name}' (detect.folds.name, detect.model); run `make bundle` with the config that made "
                            f"'{submitted}'")
    folds = pd.read_csv(root / "folds.csv", dtype={"image": str}, keep_default_na=False)
    names = data.train.images["image"].tolist()
    if folds["image"].tolist() != names:
        raise PipelineError(f"{root / 'folds.csv'}: made for other training images; {AGAIN}")
    model = _model_spec(cfg, name, len(data.classes))
    # not detections.pt: detect saves it anew on every run (torch.save's bytes vary); the fusion check below ties it
    # to the submission, whose bytes are in the key
    files, read = {}, [metrics_file, root / "folds.csv"]
    rt_keys, test_key = runtime.result_keys(ctx.cfg.runtime), data.test_key()
    for k in range(cfg.folds.n_splits):
        out = root / name / f"fold{k}"
        held = folds.loc[folds["fold"] == k, "image"].tolist()
        key = fingerprint(data.key(), "fold", k, cfg.folds.n_splits, held)
        stamp = _check(read_stamp(out / "model.json"), train_key(cfg, key, cfg.train.seed + k, rt_keys),
                       out / "model.json")
        model_fp = model_key(stamp)
        if metrics["fold_keys"][name][k] != model_fp:
            raise PipelineError(f"{metrics_file}: its fold {k} model is not {out / 'model.safetensors'}; {AGAIN}")
        _check(read_stamp(out / "views.json"), views_key(cfg, model_fp, test_key), out / "views.json")
        rel = f"weights/{name}-fold{k}.safetensors"
        files[rel] = out / "model.safetensors"
        read += [out / "model.json", out / "model.safetensors", out / "views.json"]
        model["folds"].append({"fold": k, "weights": rel, "anchor_sizes": stamp["anchor_sizes"],
                               "anchor_ratios": stamp["anchor_ratios"]})
    steps = [{"step": "detect", "models": [model], "views": metrics["views"], "tta": "none", "decode": _decode(cfg),
              "score_threshold": cfg.evaluate.map_score_threshold, "channels_last": channels_last},
             {"step": "wbf", "iou_thr": metrics["iou_thr"], "skip_thr": metrics["skip_thr"],
              "conf_type": metrics["conf_type"], "max_detections": cfg.decode.max_detections},
             {"step": "score_threshold", "threshold": cfg.predict.score_threshold}]
    _check_fusion(ctx, data, root / name / "detections.pt", steps)
    return {"configuration": name, "folds": cfg.folds.n_splits, "oof_map_50": metrics["oof_map_50"],
            "steps": steps}, files, read


def _check_fusion(ctx: Context, data, detections_pt: Path, steps: list[dict]) -> None:
    """The spec's WBF and score threshold applied to the fold models' cached test views must give the submission
    back: so the numbers in the spec are the ones that made it."""
    run = torch.load(detections_pt, weights_only=True)
    sizes = torch.tensor(data.test.images[["width", "height"]].to_numpy(), dtype=torch.float32)
    wbf, threshold = steps[1], steps[2]["threshold"]
    fused = fuse_chosen(run["test"], sizes, wbf, wbf["max_detections"])
    ours = submission_frame(data.test.images, above_score(fused, threshold), data.classes)
    path = ctx.submissions_dir / f"{ctx.name}.csv"
    if not path.is_file():
        raise PipelineError(f"{path}: the detection submission is missing; run `make detect`")
    theirs = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not ours.astype(str).equals(theirs):
        raise PipelineError(f"{path}: not the fusion of {detections_pt} with the WBF thresholds of metrics.json "
                            f"and detect.predict.score_threshold={threshold}; {AGAIN}")


def _single(ctx: Context, data, channels_last: bool) -> tuple[dict, dict, list[Path]]:
    """(spec["detection"], files, the files read) of the one-model submission (detect.folds.n_splits = 1)."""
    cfg, root = ctx.cfg.detect, ctx.work_dir / "detect"
    stamp = _check(read_stamp(root / "model.json"), train_key(cfg, data.key(), cfg.train.seed,
                                                              runtime.result_keys(ctx.cfg.runtime)),
                   root / "model.json")
    model_fp = model_key(stamp)
    metrics = _check(read_stamp(root / "metrics.json"), evaluate_key(cfg, model_fp), root / "metrics.json")
    _check(read_stamp(root / "predict.json"), predict_key(cfg, model_fp, metrics["tta"], data.test_key()),
           root / "predict.json")
    name = configuration_name(None, cfg.model)
    model = _model_spec(cfg, name, len(data.classes))
    rel = f"weights/{name}.safetensors"
    model["folds"].append({"fold": None, "weights": rel, "anchor_sizes": stamp["anchor_sizes"],
                           "anchor_ratios": stamp["anchor_ratios"]})
    steps = [{"step": "detect", "models": [model], "views": ["x1"], "tta": metrics["tta"], "decode": _decode(cfg),
              "score_threshold": cfg.predict.score_threshold, "channels_last": channels_last}]
    read = [root / f for f in ("model.json", "model.safetensors", "metrics.json", "predict.json")]
    return ({"configuration": name, "folds": 1, "val_map_50": metrics["map_50"], "steps": steps},
            {rel: root / "model.safetensors"}, read)


def run(ctx: Context) -> dict:
    """Write the bundle of the detection track's submission."""
    _refuse_settings(ctx)
    cfg, comp = ctx.cfg.detect, ctx.cfg.competition
    data = read_detection(ctx.data_dir, cfg.data, comp, cfg.train.seed, holdout=cfg.folds.n_splits == 1)
    channels_last = runtime.from_config(ctx.cfg.runtime, "detection").channels_last
    build = _single if cfg.folds.n_splits == 1 else _folds
    detection, files, read = build(ctx, data, channels_last)
    submission_csv = ctx.submissions_dir / f"{ctx.name}.csv"
    sources = [bundle_predict.__file__, bundle_detection.__file__, WBF_SOURCE]
    fp = fingerprint("bundle-detection", [file_digest(p) for p in read + [submission_csv]],
                     [file_digest(Path(p)) for p in sources], cfg.model_dump(), ctx.cfg.export.model_dump(),
                     comp.model_dump(), channels_last)
    out_dir = ctx.submissions_dir / f"{ctx.name}-bundle"
    stamp = read_stamp(out_dir / "spec.json")
    if stamp is not None and stamp.get("fingerprint") == fp and (out_dir / "predict.py").is_file():
        log.info(f"bundle: up to date: {out_dir}")
        return stamp
    test_csv = ctx.data_dir / cfg.data.test_csv
    test_ids = pd.read_csv(test_csv, dtype=str, keep_default_na=False, nrows=1)
    id_column = next(c for c in test_ids.columns if c in ID_CANDIDATES)
    image_dir, image_suffix = image_location(ctx.data_dir.resolve(), test_ids[id_column].iloc[0], comp, test_csv, 2)
    spec = {"fingerprint": fp, "format": 1, "competition": ctx.name, "task": "detection", "classes": data.classes,
            "input": {"test_csv": cfg.data.test_csv, "id_column": id_column, "image_dir": image_dir,
                      "image_suffix": image_suffix, "max_pixels": MAX_PIXELS},
            "submission": {"kind": "detection", "id_column": "image", "value_columns": ["PredictionString"],
                           "format": "label score xmin ymin xmax ymax per box, best first; score to 4 decimals, "
                                     "pixels to 1"},
            "detection": detection,
            "requires": ["torch", "torchvision", "numpy", "pandas", "pillow", "safetensors"]
                        + (["timm"] if cfg.model.name in ("retinanet", "fcos") else []),
            "versions": {**bundle.versions(), "torchvision": version("torchvision"),
                         "ensemble-boxes": version("ensemble-boxes")}}
    files = {**files, "detection.py": Path(bundle_detection.__file__), "ensemble_boxes_wbf.py": WBF_SOURCE}
    bundle.write_bundle(out_dir, spec, files)
    n = sum(len(m["folds"]) for m in detection["steps"][0]["models"])
    log.info(f"bundle: {out_dir}: {detection['configuration']} ({cfg.model.name}, {n} weight file(s), views "
             f"{detection['steps'][0]['views']}, tta {detection['steps'][0]['tta']}"
             + (f", WBF iou {detection['steps'][1]['iou_thr']:g} skip {detection['steps'][1]['skip_thr']:g} "
                f"{detection['steps'][1]['conf_type']}" if n > 1 else "")
             + f"); run: python {out_dir / 'predict.py'} --data {ctx.data_dir} --out submission.csv "
               "(needs torchvision)")
    return read_stamp(out_dir / "spec.json")
