"""Inference speed of the chosen submission three ways, same images, same run: the pipeline's predict code, the
bundle's predict.py on torch, and the same predict.py on onnxruntime.

All three predict every test image with every fold model of every member over its kept TTA views, from the same
decoded uint8 images in memory, models loaded beforehand (decoding and loading are reported once, apart). The
pipeline path is training/inference.py's view_logits and tta.merge under the runtime policy of the config; the
bundle paths import the bundle's own predict.py (the copy in the bundle folder). Interleaved rounds (timing.py)
give each path's median images/s and its spread, and the ratio to the pipeline path. Not a test: run it by hand,
after `make bundle` (the ONNX graphs are exported into a temporary folder when the bundle has none).

    .venv/bin/python benchmarks/inference.py --data data/digits --config configs/digits.yaml [--work DIR]
        [--bundle submissions/digits-bundle] [--repeats 5] [--batch-size 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timing import interleaved, median, ratio_text

from pipeline.context import Context
from pipeline.core.config import load_config
from pipeline.export.onnx_export import export_onnx, view_sizes
from pipeline.training import runtime
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.inference import view_logits
from pipeline.training.tta import merge


def load_bundle_module(bundle: Path):
    spec = importlib.util.spec_from_file_location("bundle_predict_copy", bundle / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/digits"))
    parser.add_argument("--config", type=Path, default=Path("configs/digits.yaml"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--bundle", type=Path, default=None, help="default: submissions/<competition>-bundle")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime CPU threads")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = Context(load_config(args.config, args.overrides), args.data, args.work)
    bundle = args.bundle or Path("submissions") / f"{ctx.name}-bundle"
    bp = load_bundle_module(bundle)
    spec = json.loads((bundle / "spec.json").read_text())
    task = spec["task"]
    if task != "single_label":
        raise SystemExit("benchmarks/inference.py: single_label bundles only (the pipeline path below merges "
                         "class probabilities)")
    folds_meta = json.loads((ctx.work_dir / "folds.json").read_text())
    rt = runtime.from_config(ctx.cfg.runtime, "classification")
    device = torch.device("cpu") if rt.device.type == "cpu" else rt.device

    t0 = time.perf_counter()
    paths = bp.image_paths(args.data, bp.read_ids(args.data / spec["input"]["test_csv"],
                                                  spec["input"]["id_column"]), spec)
    images = {(m["image_size"], m["in_chans"]): None for m in spec["members"]}
    for key in images:
        images[key] = bp.decode_all(paths, *key, spec["input"]["max_pixels"])
    decode_s = time.perf_counter() - t0
    n = len(paths)

    t0 = time.perf_counter()
    pipeline_models, torch_runners, onnx_runners = [], {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    for member in spec["members"]:
        for fold in member["folds"]:
            model, meta = load_checkpoint(ctx.work_dir / "runs" / member["name"] / f"fold{fold['fold']}",
                                          folds_meta["folds_hash"], folds_meta["classes"])
            pipeline_models.append((member, rt.prepare(model), meta))
            torch_runners[(member["name"], fold["fold"])] = bp.TorchRunner(member, fold, device)
            if not fold.get("onnx"):  # export here: the bundle's spec names files relative to the bundle
                stem = tmp / f"{member['name']}-fold{fold['fold']}"
                dynamic = export_onnx(model, Path(f"{stem}.onnx"), member["in_chans"], member["image_size"], 17)
                sides = [] if dynamic else view_sizes(member["image_size"], member["tta"]["views"])
                fold = {**fold, "onnx": {"any": f"{stem}.onnx"} if dynamic else {}}
                for side in sides:
                    export_onnx(model, Path(f"{stem}-{side}.onnx"), member["in_chans"], side, 17)
                    fold["onnx"][str(side)] = f"{stem}-{side}.onnx"
            onnx_runners[(member["name"], fold["fold"])] = bp.OnnxRunner(member, fold, device)
    load_s = time.perf_counter() - t0

    def pipeline_path():
        per_member = {}
        for member, model, meta in pipeline_models:
            tta = member["tta"]
            ranges = {"degrees": tta["degrees"], "scale": tta["scale"], "shift": tta["shift"]}
            logits = view_logits(model, images[(member["image_size"], member["in_chans"])], tta["views"], rt,
                                 meta["norm"], args.batch_size, tta["seed"], ranges)
            per_member.setdefault(member["name"], []).append(merge(logits, tta["merge"]))
        P = np.stack([np.mean(v, axis=0) for v in per_member.values()]).astype(np.float64)
        return bp.blend(P, spec["blend"])

    def bundle_path(runners):
        def run():
            P = np.stack([bp.member_predictions(m, images[(m["image_size"], m["in_chans"])],
                                                lambda mem, fold, dev: runners[(mem["name"], fold["fold"])],
                                                device, args.batch_size, task)
                          for m in spec["members"]]).astype(np.float64)
            return bp.blend(P, spec["blend"])
        return run

    candidates = {"pipeline": pipeline_path, "bundle torch": bundle_path(torch_runners),
                  "bundle onnx": bundle_path(onnx_runners)}
    outputs = {name: fn() for name, fn in candidates.items()}  # also the warm-up of every path
    agree = {name: float(np.abs(out - outputs["pipeline"]).max()) for name, out in outputs.items()}
    times = interleaved(candidates, args.repeats)
    passes = sum(len(m["folds"]) * len(m["tta"]["views"]) for m in spec["members"])
    where = (torch.cuda.get_device_name() if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} torch threads")
    print(f"{ctx.name}: {n} test images, {len(spec['members'])} members, {passes} forward passes per image "
          f"(folds x kept views), batch {args.batch_size}, {where}; decoding {n / decode_s:.0f} images/s, "
          f"loading the models {load_s:.2f} s (both once, outside the rounds)")
    for name in candidates:
        rate = [n / t for t in times[name]]
        print(f"  {name:13s} {median(rate):8.1f} images/s (min {min(rate):.1f}, max {max(rate):.1f} over "
              f"{args.repeats} rounds); time vs pipeline {ratio_text(times[name], times['pipeline'])}; "
              f"max abs difference of blended probabilities vs pipeline {agree[name]:.1e}")


if __name__ == "__main__":
    main()
