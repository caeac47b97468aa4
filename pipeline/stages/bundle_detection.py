"""The bundle stage's detection half (stages/bundle.py calls it for a detection folder): the detection track's
submitted detector as an offline folder, submissions/<competition>-bundle/.

Reads what `make detect` wrote and checks that it made the submission with this config before packing it:
- detect.folds.n_splits > 1: WORK/detect/metrics.json (the submitted configuration, its views, the WBF thresholds
  chosen on OOF), folds.csv, and per fold model fold<k>/model.json, model.safetensors and views.json, whose keys are
  recomputed from the data and this config (stages/detect.py's train_key and views_key); for a submitted blend of
  configurations, the same for each other configuration from the detect settings its run recorded in its
  detections.pt; with
  detect.classifier.enabled, the rule chosen on OOF (metrics.json's "classifier") and each fold crop classifier's
  best.json and best.safetensors, whose training key is recomputed too (detect_classifier.classifier_runs). Then
  the fused test detections, recomputed from <configuration>/detections.pt with the spec's WBF parameters, renamed
  with the spec's rule by the packed classifiers and cut at the score threshold, must give the submission CSV back
  string for string.
- detect.folds.n_splits = 1: model.json, model.safetensors, metrics.json (the TTA chosen on validation) and
  predict.json, whose keys (train, evaluate and predict keys) must all match this config.
With export.bundle_onnx=true the bundle also carries each fold detector's network part as ONNX (export/
onnx_detection.py; one graph per view side), each checked against torch on the first test images, for predict.py
--engine onnx.
Skipped when the bundle's stamp (spec.json's fingerprint) matches all of these and the bundle's source files.
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import version
from pathlib import Path

import ensemble_boxes
import pandas as pd
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from pipeline.context import Context
from pipeline.core.artifacts import file_digest, fingerprint, read_json, read_stamp
from pipeline.core.config import DetectConfig
from pipeline.core.errors import PipelineError
from pipeline.data.competition import ID_CANDIDATES, image_location
from pipeline.data.images import MAX_PIXELS
from pipeline.detection.data import read_detection, split_arrays
from pipeline.detection.ensemble import above_score, configuration_name, fuse_chosen, view_names
from pipeline.detection.infer import submission_frame
from pipeline.export import bundle, bundle_detection, bundle_predict, onnx_detection
from pipeline.stages.detect import evaluate_key, model_key, predict_key, train_key, views_key
from pipeline.stages.detect_classifier import CROP_BATCH, classifier_runs, crop_views, rename_test
from pipeline.training import runtime

log = logging.getLogger(__name__)
WBF_SOURCE = Path(ensemble_boxes.__file__).with_name("ensemble_boxes_wbf.py")
AGAIN = "run `make detect` again with this config (or `make bundle` with the config that made the submission)"
ONNX_FIX = "set export.bundle_onnx=false (detection.py then runs on torch; the previous bundle is kept until then)"
# the test images each graph is checked on against torch: enough to catch an exporter fault, without a second
# prediction of a large test set
ONNX_CHECK_IMAGES = 64


def _refuse_settings(ctx: Context) -> None:
    """The export keys a detection bundle cannot honour exactly."""
    e = ctx.cfg.export
    if e.bundle_of != "ensemble":
        raise PipelineError(f"export.bundle_of={e.bundle_of}: the detection track has no distilled student; "
                            "set export.bundle_of=ensemble")
    if e.bundle_folds is not None:
        raise PipelineError("export.bundle_folds: a detection bundle keeps every fold model (the WBF thresholds were "
                            "chosen on all of them); set export.bundle_folds=null")


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
    """(spec["detection"], {bundle path: weight file}, the files read) of the k-fold ensemble's submission: one
    configuration's fold models, or the WBF blend of every configuration in WORK/detect."""
    cfg, root = ctx.cfg.detect, ctx.work_dir / "detect"
    metrics_file = root / "metrics.json"
    metrics = read_json(metrics_file, "run `make detect` first")
    name = configuration_name(cfg.folds.name, cfg.model)
    submitted = metrics["submitted"]
    blend = submitted == "wbf models"
    configurations = metrics["configurations"] if blend else [submitted]
    if configurations[0] != name:  # the configuration whose run wrote metrics.json comes first in a blend
        made = (f"the WBF blend of configurations {configurations} made by the run of '{configurations[0]}'"
                if blend else f"configuration '{submitted}'")
        raise PipelineError(f"{metrics_file}: the submission is {made}, this config's is '{name}' (detect.folds.name, "
                            f"detect.model); run `make bundle` with the config that made '{configurations[0]}'")
    folds = pd.read_csv(root / "folds.csv", dtype={"image": str}, keep_default_na=False)
    if folds["image"].tolist() != data.train.images["image"].tolist():
        raise PipelineError(f"{root / 'folds.csv'}: made for other training images; {AGAIN}")
    files, read, steps = {}, [metrics_file, root / "folds.csv"], []
    for other in configurations:
        dcfg = cfg if other == name else _recorded_config(root / other / "detections.pt", other)
        views = metrics["views"] if not blend else view_names(dcfg.views)
        step, step_files, step_read = _configuration(ctx, data, dcfg, other, folds, metrics["fold_keys"][other],
                                                     views, channels_last, metrics_file)
        steps.append(step)
        files, read = {**files, **step_files}, read + step_read
    steps.append({"step": "wbf", "iou_thr": metrics["iou_thr"], "skip_thr": metrics["skip_thr"],
                  "conf_type": metrics["conf_type"], "max_detections": cfg.decode.max_detections})
    fold = folds["fold"].to_numpy()
    if cfg.classifier.enabled:
        rename, rename_files, rename_read = _rename_step(ctx, data, fold, metrics, metrics_file)
        steps += [rename] if rename else []
        files, read = {**files, **rename_files}, read + rename_read
    steps.append({"step": "score_threshold", "threshold": cfg.predict.score_threshold})
    _check_fusion(ctx, data, [root / c / "detections.pt" for c in configurations], steps, fold)
    return {"configuration": submitted, "configurations": configurations, "folds": cfg.folds.n_splits,
            "oof_map_50": metrics["oof_map_50"], "steps": steps}, files, read


def _recorded_config(detections_pt: Path, name: str) -> DetectConfig:
    """The detect section another configuration of a blend ran with, as its run recorded it in detections.pt (its
    training and views keys are then recomputed from it, so a record that did not train the weights is refused)."""
    if not detections_pt.is_file():
        raise PipelineError(f"{detections_pt}: not found; run `make detect` with the config of configuration '{name}', "
                            "then with this one")
    recorded = torch.load(detections_pt, weights_only=True).get("detect_config")
    if recorded is None:
        raise PipelineError(f"{detections_pt}: written before detect recorded its settings there; run `make detect` "
                            f"with the config of configuration '{name}', then with this one")
    try:
        return DetectConfig.model_validate_json(json.dumps(recorded))
    except ValidationError as exc:  # a record of another version's schema: one line, not pydantic's report
        raise PipelineError(f"{detections_pt}: its recorded detect settings do not fit this version's "
                            f"({exc.error_count()} errors); run `make detect` with the config of configuration "
                            f"'{name}', then with this one") from None


def _configuration(ctx: Context, data, cfg: DetectConfig, name: str, folds: pd.DataFrame, fold_keys: list[str],
                   views: list[str], channels_last: bool, metrics_file: Path) -> tuple[dict, dict, list[Path]]:
    """(the detect step, its weight files, the files read) of one configuration's fold models, each checked
    against the keys recomputed from the data and `cfg` and against the keys the submission's fusion used."""
    root = ctx.work_dir / "detect"
    model = _model_spec(cfg, name, len(data.classes))
    # not detections.pt: detect saves it anew on every run (torch.save's bytes vary); the fusion check ties it
    # to the submission, whose bytes are in the key
    files, read = {}, []
    rt_keys, test_key = runtime.result_keys(ctx.cfg.runtime), data.test_key()
    n_splits = int(folds["fold"].max()) + 1
    for k in range(n_splits):
        out = root / name / f"fold{k}"
        held = folds.loc[folds["fold"] == k, "image"].tolist()
        key = fingerprint(data.key(), "fold", k, n_splits, held)
        stamp = _check(read_stamp(out / "model.json"), train_key(cfg, key, cfg.train.seed + k, rt_keys),
                       out / "model.json")
        model_fp = model_key(stamp)
        if fold_keys[k] != model_fp:
            raise PipelineError(f"{metrics_file}: its fold {k} model is not {out / 'model.safetensors'}; {AGAIN}")
        _check(read_stamp(out / "views.json"), views_key(cfg, model_fp, test_key), out / "views.json")
        rel = f"weights/{name}-fold{k}.safetensors"
        files[rel] = out / "model.safetensors"
        read += [out / "model.json", out / "model.safetensors", out / "views.json"]
        model["folds"].append({"fold": k, "weights": rel, "anchor_sizes": stamp["anchor_sizes"],
                               "anchor_ratios": stamp["anchor_ratios"]})
    step = {"step": "detect", "models": [model], "views": views, "tta": "none", "decode": _decode(cfg),
            "score_threshold": cfg.evaluate.map_score_threshold, "channels_last": channels_last}
    return step, files, read


def _rename_step(ctx: Context, data, fold, metrics: dict, metrics_file: Path) -> tuple[dict | None, dict, list[Path]]:
    """(the spec's rename step, its weight files, the files read) of the second stage (detect_classifier.py): the
    fold crop classifiers this config trained and the rule chosen on OOF; no step when the rule is the detector
    alone (renaming then changes nothing)."""
    cfg = ctx.cfg.detect
    ccfg = cfg.classifier
    chosen = metrics.get("classifier")
    if chosen is None:
        raise PipelineError(f"{metrics_file}: no second stage recorded (made with detect.classifier.enabled=false); "
                            f"{AGAIN}")
    if chosen["weight"] == 1 and chosen["merge_iou"] is None:
        return None, {}, []
    rt = runtime.from_config(ctx.cfg.runtime, "classification")
    classifier = {"backbone": ccfg.backbone, "image_size": ccfg.train.image_size, "views": crop_views(ctx),
                  "batch_size": CROP_BATCH, "channels_last": rt.channels_last, "folds": []}
    files, read = {}, []
    for k, (run_dir, key) in enumerate(classifier_runs(ctx, data.key(), data.classes, fold)):
        meta = _check(read_stamp(run_dir / "best.json"), key, run_dir / "best.json")
        rel = f"weights/classifier-{ccfg.backbone}-fold{k}.safetensors"
        files[rel] = run_dir / "best.safetensors"
        read += [run_dir / "best.json", run_dir / "best.safetensors"]
        classifier["folds"].append({"fold": k, "weights": rel, "in_chans": meta["in_chans"],
                                    "drop_rate": meta["drop_rate"], "norm": meta["norm"]})
    step = {"step": "rename", "rule": chosen["rule"], "weight": chosen["weight"], "merge_iou": chosen["merge_iou"],
            "n_classes": len(data.classes), "image_size": cfg.train.image_size,
            "boxes_per_image": ccfg.boxes_per_image, "margin": ccfg.margin,
            "top_k": ccfg.top_k, "max_detections": cfg.decode.max_detections, "classifier": classifier}
    return step, files, read


def _check_fusion(ctx: Context, data, detections_pts: list[Path], steps: list[dict], fold) -> None:
    """The spec's WBF, rename (the bundled classifier weights on crops of the decoded test images) and score
    threshold applied to the fold models' cached test views must give the submission back: so the numbers and
    weights in the spec are the ones that made it."""
    # a blend fuses the configurations' lists in the order of metrics.json's configurations (ensemble.py)
    lists = [x for path in detections_pts for x in torch.load(path, weights_only=True)["test"]]
    sizes = torch.tensor(data.test.images[["width", "height"]].to_numpy(), dtype=torch.float32)
    by_name = {s["step"]: s for s in steps}
    wbf, threshold = by_name["wbf"], by_name["score_threshold"]["threshold"]
    fused = fuse_chosen(lists, sizes, wbf, wbf["max_detections"])
    rename = by_name.get("rename")
    if rename is not None:
        test = split_arrays(data.test, data.classes, ctx.work_dir / "cache", rename["image_size"], "test")
        c = rename["classifier"]
        fused = rename_test(ctx, data.key(), data.classes, fold, test, fused, rename["weight"], rename["merge_iou"],
                            rename["boxes_per_image"], c["image_size"], rename["margin"], c["views"], rename["top_k"],
                            rename["max_detections"])
    ours = submission_frame(data.test.images, above_score(fused, threshold), data.classes)
    path = ctx.submissions_dir / f"{ctx.name}.csv"
    if not path.is_file():
        raise PipelineError(f"{path}: the detection submission is missing; run `make detect`")
    theirs = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not ours.astype(str).equals(theirs):
        renamed = f", renamed by the crop classifiers ({rename['rule']})," if rename else ""
        raise PipelineError(f"{path}: not the fusion of {', '.join(map(str, detections_pts))} with the WBF "
                            "thresholds of metrics.json"
                            f"{renamed} and detect.predict.score_threshold={threshold}; {AGAIN}")


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


def _onnx_writer(ctx: Context, data, detection: dict, files: dict[str, Path]):
    """export.bundle_onnx: a writer of each fold detector's network part as ONNX (onnx_detection.py), one graph per
    input side its views feed, each checked against torch on the first test images; fold["onnx"] maps the side to
    the graph and the feature map shapes its anchors are made from (spec.json is written after the writer)."""
    opset, tolerance = ctx.cfg.export.opset, ctx.cfg.export.tolerance
    test: dict[int, torch.Tensor] = {}

    def write(folder: Path) -> None:
        for step in (s for s in detection["steps"] if s["step"] == "detect"):
            for model in step["models"]:
                size = model["image_size"]
                if size not in test:
                    test[size] = split_arrays(data.test, data.classes, ctx.work_dir / "cache", size,
                                              "test").images[:ONNX_CHECK_IMAGES]
                for fold in model["folds"]:
                    net = onnx_detection.build_network(model["family"], model["num_classes"], size, model["backbone"],
                                                       model["fpn_channels"], fold["anchor_sizes"],
                                                       fold["anchor_ratios"])
                    net.load_state_dict(load_file(str(files[fold["weights"]])))
                    stem = f"onnx/{model['name']}" + ("" if fold["fold"] is None else f"-fold{fold['fold']}")
                    fold["onnx"] = {}
                    for side in onnx_detection.graph_sides(net.eval(), size, step["views"]):
                        rel = f"{stem}-{side}px.onnx"
                        check = onnx_detection.export_checked(net, folder / rel, side, opset, tolerance, test[size],
                                                              ONNX_FIX)
                        fold["onnx"][str(side)] = {"file": rel, "feature_shapes": check["feature_shapes"],
                                                   "max_abs_diff": check["max_abs_diff"]}
    return write


def _renamed(detection: dict) -> dict | None:
    """The spec's rename step, when it has one."""
    return next((s for s in detection["steps"] if s["step"] == "rename"), None)


def run(ctx: Context) -> dict:
    """Write the bundle of the detection track's submission."""
    _refuse_settings(ctx)
    cfg, comp = ctx.cfg.detect, ctx.cfg.competition
    data = read_detection(ctx.data_dir, cfg.data, comp, cfg.train.seed, holdout=cfg.folds.n_splits == 1)
    channels_last = runtime.from_config(ctx.cfg.runtime, "detection").channels_last
    build = _single if cfg.folds.n_splits == 1 else _folds
    detection, files, read = build(ctx, data, channels_last)
    rename = _renamed(detection)
    families = {m["family"] for s in detection["steps"] if s["step"] == "detect" for m in s["models"]}
    submission_csv = ctx.submissions_dir / f"{ctx.name}.csv"
    sources = [bundle_predict.__file__, bundle_detection.__file__, WBF_SOURCE] \
        + ([onnx_detection.__file__] if ctx.cfg.export.bundle_onnx else []) \
        + ([bundle.CLASSIC_SOURCE] if rename and rename["classifier"]["backbone"].startswith("d2l_") else [])
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
                        + (["timm"] if families & {"retinanet", "fcos"}
                           or (rename and not rename["classifier"]["backbone"].startswith("d2l_")) else []),
            "versions": {**bundle.versions(), "torchvision": version("torchvision"),
                         "ensemble-boxes": version("ensemble-boxes")}}
    files = {**files, "detection.py": Path(bundle_detection.__file__), "ensemble_boxes_wbf.py": WBF_SOURCE}
    if rename and rename["classifier"]["backbone"].startswith("d2l_"):  # the pipeline's own nets, pure torch
        files["classic.py"] = bundle.CLASSIC_SOURCE
    onnx = _onnx_writer(ctx, data, detection, files) if ctx.cfg.export.bundle_onnx else None
    bundle.write_bundle(out_dir, spec, files, onnx)
    detects = [s for s in detection["steps"] if s["step"] == "detect"]
    n = sum(len(m["folds"]) for s in detects for m in s["models"])
    wbf = next((s for s in detection["steps"] if s["step"] == "wbf"), None)
    log.info(f"bundle: {out_dir}: {detection['configuration']} ("
             + "; ".join(f"{m['name']}: {m['family']}, {len(m['folds'])} weight file(s), views {s['views']}, tta "
                         f"{s['tta']}" for s in detects for m in s["models"])
             + (f"; WBF iou {wbf['iou_thr']:g} skip {wbf['skip_thr']:g} {wbf['conf_type']}" if wbf else "")
             + (f"; boxes renamed by {len(rename['classifier']['folds'])} {rename['classifier']['backbone']} "
                f"crop classifier(s), {rename['rule']}" if rename else "")
             + f"); {n} detector(s); run: python {out_dir / 'predict.py'} --data {ctx.data_dir} --out submission.csv "
               "(needs torchvision)" + ("; --engine onnx runs the detectors' network parts in onnxruntime"
                                        if onnx else ""))
    return read_stamp(out_dir / "spec.json")
