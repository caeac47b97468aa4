"""The export stage's detection half (stages/export.py calls it for a detection folder): one fold detector's network
part as ONNX (export/onnx_detection.py), checked with onnxruntime on the test images.

Exports this config's configuration (detect.folds.name, detect.model) as `make detect` trained it: fold export.fold
of WORK/detect/<configuration>/ (detect.folds.n_splits > 1), or WORK/detect/model.safetensors (n_splits = 1, fold
0), its model.json checked against the training key recomputed from the data and this config. Writes
WORK/export/<configuration>[-fold<k>].onnx, the graph at the trained size (torchvision's detectors resize every
view to it; TinySSD's views at other scales get their graphs in a bundle, export.bundle_onnx=true), and
WORK/export/export.json: the max abs difference of the raw outputs between torch and onnxruntime on every test
image, both engines' seconds, and what the graph's inputs and outputs are. Refuses above export.tolerance.
"""

from __future__ import annotations

import logging

import pandas as pd
from safetensors.torch import load_file

from pipeline.context import Context
from pipeline.core.artifacts import file_digest, fingerprint, is_done, read_json, read_stamp, write_stamp
from pipeline.core.errors import PipelineError
from pipeline.detection.data import read_detection, split_arrays
from pipeline.detection.ensemble import configuration_name
from pipeline.export import onnx_detection
from pipeline.stages.detect import train_key
from pipeline.training import runtime

log = logging.getLogger(__name__)
FIX = "export another configuration (detect.model.name=...)"


def _model_files(ctx: Context, data, name: str) -> tuple:
    """(model.json's stamp, the weights, the fold exported or None) of the fold model make export exports."""
    cfg, root, fold = ctx.cfg.detect, ctx.work_dir / "detect", ctx.cfg.export.fold
    rt_keys = runtime.result_keys(ctx.cfg.runtime)
    if cfg.folds.n_splits == 1:
        if fold != 0:
            raise PipelineError(f"export.fold={fold}: detect.folds.n_splits=1 trains one model; set export.fold=0")
        out, key, fold = root, train_key(cfg, data.key(), cfg.train.seed, rt_keys), None
    else:
        if fold >= cfg.folds.n_splits:
            raise PipelineError(f"export.fold={fold}: detect.folds.n_splits={cfg.folds.n_splits} has folds 0.."
                                f"{cfg.folds.n_splits - 1}; choose one of them")
        if not (root / "folds.csv").is_file():
            raise PipelineError(f"{root / 'folds.csv'}: not found; run `make detect` first")
        table = pd.read_csv(root / "folds.csv", dtype={"image": str}, keep_default_na=False)
        held = table.loc[table["fold"] == fold, "image"].tolist()
        data_key = fingerprint(data.key(), "fold", fold, cfg.folds.n_splits, held)
        out, key = root / name / f"fold{fold}", train_key(cfg, data_key, cfg.train.seed + fold, rt_keys)
    stamp = read_stamp(out / "model.json")
    if stamp is None:
        raise PipelineError(f"{out / 'model.json'}: not found; run `make detect` first")
    if stamp.get("fingerprint") != key:
        raise PipelineError(f"{out / 'model.json'}: made with other data or detect settings than this config's; "
                            "run `make detect` again with this config (or `make export` with the config that made it)")
    return stamp, out, fold


def run(ctx: Context) -> dict:
    """ONNX of this configuration's fold export.fold detector (its network part), compared with torch."""
    cfg, ecfg = ctx.cfg.detect, ctx.cfg.export
    name = configuration_name(cfg.folds.name, cfg.model)
    if ecfg.experiment not in (None, name):
        raise PipelineError(f"export.experiment={ecfg.experiment}: on a detection folder make export exports this "
                            f"config's configuration '{name}' (detect.folds.name, detect.model); set "
                            "export.experiment=null, or run it with the config of that configuration")
    data = read_detection(ctx.data_dir, cfg.data, ctx.cfg.competition, cfg.train.seed, holdout=cfg.folds.n_splits == 1)
    stamp, run_dir, fold = _model_files(ctx, data, name)
    weights = run_dir / "model.safetensors"
    out = ctx.work_dir / "export" / (name + ("" if fold is None else f"-fold{fold}") + ".onnx")
    result_file = ctx.work_dir / "export" / "export.json"
    fp = fingerprint("export-detection", file_digest(run_dir / "model.json"), file_digest(weights), ecfg.opset,
                     ecfg.tolerance, data.test_key())
    if is_done(result_file, fp, [out]):
        meta = read_json(result_file, "rerun `make export`")
        log.info(f"export: up to date: {out} (max abs difference of raw outputs {meta['max_abs_diff']:.2e})")
        return meta
    m = cfg.model
    size = cfg.train.image_size
    net = onnx_detection.build_network(m.name, len(data.classes), size, m.backbone, m.fpn_channels,
                                       stamp["anchor_sizes"], stamp["anchor_ratios"])
    net.load_state_dict(load_file(str(weights)))
    [side] = onnx_detection.graph_sides(net.eval(), size, ["x1"])
    images = split_arrays(data.test, data.classes, ctx.work_dir / "cache", size, "test").images
    check = onnx_detection.export_checked(net, out, side, ecfg.opset, ecfg.tolerance, images, FIX)
    family = onnx_detection.family(net)
    result = {"onnx": str(out), "configuration": name, "fold": fold, "family": family,
              "backbone": m.backbone if family in ("retinanet", "fcos") else None, "opset": ecfg.opset,
              "image_size": size, "input_side": side, "dynamic_size": False,
              "outputs": list(onnx_detection.OUTPUTS[family]), **check}
    write_stamp(result_file, fp, **result)
    n = check["images"]
    log.info(f"export: {out}: {family}, network part (outputs {', '.join(result['outputs'])}; decoding and NMS stay "
             f"in torch), dynamic batch, {side} px, opset {ecfg.opset}; on {n} test images the max abs difference of "
             f"the raw outputs, onnxruntime vs torch, is {check['max_abs_diff']:.2e}; CPU "
             f"{n / max(check['torch_s'], 1e-9):.0f} images/s in torch, {n / max(check['onnx_s'], 1e-9):.0f} in "
             "onnxruntime")
    return result
