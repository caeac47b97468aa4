"""Detection bundles (make bundle on a detection folder): the detection track's submitted detector, run as a user
would run it -- without the pipeline, ensemble-boxes, torchmetrics or pycocotools, from another folder, offline --
gives the pipeline's submission back; and each part of bundle_detection.py equals the module it restates."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import orchestrate
from pipeline.context import Context
from pipeline.core.config import DecodeConfig, load_config
from pipeline.core.errors import PipelineError
from pipeline.detection.data import Arrays, is_detection_folder, read_detection, split_arrays
from pipeline.detection.ensemble import above_score, fuse_chosen, view_detections
from pipeline.detection.infer import Detector
from pipeline.detection.shapes import build_shapes
from pipeline.detection.torchvision_models import create
from pipeline.export import bundle_detection as bd
from pipeline.stages import bundle_detection
from pipeline.stages.detect_classifier import rename_test
from pipeline.training.runtime import Runtime

from .test_bundle import _isolated_python, _offline

# what a detection bundle must run without: the pipeline's own fusion and metric libraries
NOT_NEEDED = ("ensemble_boxes", "torchmetrics", "pycocotools")
FAST = ("detect.train.image_size=64", "detect.train.epochs=1", "detect.train.batch_size=8",
        "detect.predict.gallery_images=0", "detect.predict.score_threshold=0.02", "runtime.device=cpu",
        "runtime.threads=1", "tracking.backend=none")
# two fold models, each seen plain, mirrored and at 1.25 times its size, fused by WBF
FOLDS = ("detect.folds.n_splits=2", "detect.views.scales=[1.0,1.25]", "detect.fusion.iou=[0.5,0.6]",
         "detect.fusion.skip=[0.01]")


def _ctx(root: Path, data: Path, *overrides: str) -> Context:
    return Context(load_config(None, [*FAST, *overrides]), data, root / "work", root / "subs", resolve=False)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect-bundle")
    return root, build_shapes(root / "shapes", n_train=16, n_val=4, n_test=6, seed=2)


@pytest.fixture(scope="module")
def folds(shapes):
    root, data = shapes
    ctx = _ctx(root, data, *FOLDS)
    return ctx, orchestrate.run("bundle", ctx)


def _run(bundle: Path, data: Path, cwd: Path, python: Path, *extra: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [*_offline(), str(python), "-I", str(bundle / "predict.py"), "--data", str(data), "--out", "sub.csv",
           "--detections-out", "boxes.csv", "--device", "cpu", "--threads", "1", *extra]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return (pd.read_csv(cwd / "sub.csv", dtype=str, keep_default_na=False),
            pd.read_csv(cwd / "boxes.csv", keep_default_na=False), res.stdout)


def _boxes_frame(ids: list[str], found: list[dict], classes: list[str]) -> pd.DataFrame:
    rows = [(i, classes[c], s, *b) for i, d in zip(ids, found, strict=True)
            for c, s, b in zip(d["labels"].tolist(), d["scores"].tolist(), d["boxes"].tolist(), strict=True)]
    return pd.DataFrame(rows, columns=["image", "label", "score", "xmin", "ymin", "xmax", "ymax"])


def _assert_same_boxes(got: pd.DataFrame, expected: pd.DataFrame, tol: float = 1e-5) -> float:
    """Same boxes in the same order with the same labels; scores and pixel coordinates within `tol`."""
    assert len(got) == len(expected) > 0
    assert got["image"].astype(str).tolist() == expected["image"].tolist()
    assert got["label"].tolist() == expected["label"].tolist()
    cols = ["score", "xmin", "ymin", "xmax", "ymax"]
    diff = float(np.abs(got[cols].to_numpy(float) - expected[cols].to_numpy(float)).max())
    assert diff < tol, diff
    return diff


@pytest.mark.slow
def test_detection_bundle_reproduces_the_fused_submission_without_the_pipeline(folds, shapes, tmp_path):
    ctx, spec = folds
    root, data = shapes
    bundle = ctx.submissions_dir / "shapes-bundle"
    steps = spec["detection"]["steps"]
    assert [s["step"] for s in steps] == ["detect", "wbf", "score_threshold"] and spec["task"] == "detection"
    assert steps[0]["views"] == ["x1", "x1+hflip", "x1.25", "x1.25+hflip"] and steps[2]["threshold"] == 0.02
    metrics = json.loads((ctx.work_dir / "detect" / "metrics.json").read_text())
    assert {k: steps[1][k] for k in ("iou_thr", "skip_thr", "conf_type")} == {
        k: metrics[k] for k in ("iou_thr", "skip_thr", "conf_type")}
    assert sorted(p.name for p in (bundle / "weights").iterdir()) == ["tinyssd-fold0.safetensors",
                                                                      "tinyssd-fold1.safetensors"]
    assert "torchvision" in spec["requires"] and "timm" not in spec["requires"]
    assert "import pipeline" not in (bundle / "detection.py").read_text()

    python = _isolated_python(tmp_path, block=NOT_NEEDED)
    for module in ("pipeline", *NOT_NEEDED):
        assert subprocess.run([str(python), "-I", "-c", f"import {module}"], capture_output=True).returncode != 0
    sub, boxes, out = _run(bundle, data, tmp_path / "user", python, "--batch-size", "4")
    expected = pd.read_csv(ctx.submissions_dir / "shapes.csv", dtype=str, keep_default_na=False)
    assert sub.equals(expected)  # every string of the submission, rounded as the pipeline rounds
    assert "6 images" in out and "images/s" in out
    # unrounded: the pipeline's own fusion of its cached views, against predict.py's from the images
    run = torch.load(ctx.work_dir / "detect" / "tinyssd" / "detections.pt", weights_only=True)
    test = pd.read_csv(data / "test.csv")["image"].tolist()
    sizes = torch.tensor([Image.open(data / i).size for i in test], dtype=torch.float32)
    fused = above_score(fuse_chosen(run["test"], sizes, metrics, 100), 0.02)
    diff = _assert_same_boxes(boxes, _boxes_frame(test, fused, spec["classes"]))
    # another batch size: the same boxes; a float32 ulp at 128 px is 7.6e-6, and the convolutions of a batch of one
    # round differently from the pipeline's batch of 16, by an ulp or two
    _, boxes_b1, _ = _run(bundle, data, tmp_path / "b1", python, "--batch-size", "1")
    diff_b1 = _assert_same_boxes(boxes_b1, _boxes_frame(test, fused, spec["classes"]), tol=5e-5)
    print(f"parity: max abs difference {diff:.1e} (batch 4), {diff_b1:.1e} (batch 1)")


@pytest.mark.slow
def test_onnx_export_and_bundle_run_the_detectors_network_part_in_onnxruntime(folds, shapes, tmp_path):
    """make export on a detection folder writes a fold detector's network part as ONNX, checked on the test images;
    export.bundle_onnx=true: the bundle carries one graph per fold model and view side, and predict.py --engine onnx,
    without the pipeline and without the detectors' weights, gives the submission back."""
    import onnx

    from pipeline.stages import export_detection

    ctx, _ = folds
    _, data = shapes
    work, subs = tmp_path / "work", tmp_path / "subs"  # copies: the other tests read the fixture's bundle
    shutil.copytree(ctx.work_dir, work)
    shutil.copytree(ctx.submissions_dir, subs)

    def octx(*extra: str) -> Context:
        return Context(load_config(None, [*FAST, *FOLDS, "export.bundle_onnx=true", *extra]), data, work, subs,
                       resolve=False)

    result = orchestrate.run("export", octx("export.fold=1"))
    assert result["onnx"] == str(work / "export" / "tinyssd-fold1.onnx") and result["images"] == 6
    assert result["outputs"] == ["cls_logits", "bbox_preds"] and 0 <= result["max_abs_diff"] < 1e-4
    graph = onnx.load(result["onnx"]).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 64, 64]
    with pytest.raises(PipelineError, match=r"^export.fold=2: detect.folds.n_splits=2 has folds 0..1; choose"):
        export_detection.run(octx("export.fold=2"))

    spec = orchestrate.run("bundle", octx())
    bundle = subs / "shapes-bundle"
    for fold in spec["detection"]["steps"][0]["models"][0]["folds"]:
        assert sorted(fold["onnx"]) == ["64", "80"]  # the views x1 and x1.25: one graph per side
        assert all((bundle / g["file"]).is_file() and g["max_abs_diff"] < 1e-4 for g in fold["onnx"].values())
    shutil.rmtree(bundle / "weights")  # the onnx engine must not need them: the graphs are the networks
    python = _isolated_python(tmp_path, allow=("onnxruntime",), block=NOT_NEEDED)
    sub, boxes, out = _run(bundle, data, tmp_path / "user", python, "--engine", "onnx", "--batch-size", "4")
    # exact: the graphs' ~1e-6 differences from torch move no box across the CSV's rounding or an NMS decision here
    assert sub.equals(pd.read_csv(subs / "shapes.csv", dtype=str, keep_default_na=False)) and "(onnx)" in out
    run = torch.load(work / "detect" / "tinyssd" / "detections.pt", weights_only=True)
    metrics = json.loads((work / "detect" / "metrics.json").read_text())
    test = pd.read_csv(data / "test.csv")["image"].tolist()
    sizes = torch.tensor([Image.open(data / i).size for i in test], dtype=torch.float32)
    fused = above_score(fuse_chosen(run["test"], sizes, metrics, 100), 0.02)
    diff = _assert_same_boxes(boxes, _boxes_frame(test, fused, spec["classes"]), tol=1e-4)
    print(f"onnx parity: max abs difference {diff:.1e} of scores and pixels; graphs {result['max_abs_diff']:.1e}")
    # a bundle without graphs says how to get them
    res = subprocess.run([str(python), "-I", str(ctx.submissions_dir / "shapes-bundle" / "predict.py"), "--data",
                          str(data), "--out", str(tmp_path / "x.csv"), "--engine", "onnx"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "export.bundle_onnx=true" in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_detection_bundle_key_covers_what_it_packs_and_refusals_are_one_line(folds, shapes, tmp_path):
    ctx, spec = folds
    root, data = shapes
    assert orchestrate.run("bundle", ctx)["fingerprint"] == spec["fingerprint"]  # up to date: nothing rewritten
    # a new score threshold: detect rewrites the submission, the bundle follows it
    def scores() -> list[float]:
        sub = pd.read_csv(ctx.submissions_dir / "shapes.csv", dtype=str, keep_default_na=False)
        return [float(s) for p in sub["PredictionString"] for s in p.split()[1::6]]

    before = scores()
    cut = float(np.median(before))  # an untrained detector's scores bunch together: a cut among them
    again = orchestrate.run("bundle", _ctx(root, data, *FOLDS, f"detect.predict.score_threshold={cut}"))
    assert again["fingerprint"] != spec["fingerprint"] and again["detection"]["steps"][2]["threshold"] == cut
    after = scores()
    assert min(before) < cut - 5e-5 <= min(after) and 0 < len(after) < len(before)  # the CSV rounds to 4 decimals
    # weights that this config did not train are refused before anything is packed
    with pytest.raises(PipelineError, match=r"fold0/model.json: made with other data or detect settings"):
        bundle_detection.run(_ctx(root, data, *FOLDS, "detect.train.lr=0.02"))
    with pytest.raises(PipelineError, match=r"configuration 'tinyssd', this config's is 'other'"):
        bundle_detection.run(_ctx(root, data, *FOLDS, "detect.folds.name=other"))
    with pytest.raises(PipelineError, match=r"^export.bundle_folds: .*set export.bundle_folds=null$"):
        bundle_detection.run(_ctx(root, data, *FOLDS, "export.bundle_folds=[0]"))
    with pytest.raises(PipelineError, match=r"metrics.json: no second stage recorded .*run `make detect` again"):
        bundle_detection.run(_ctx(root, data, *FOLDS, "detect.classifier.enabled=true"))
    # a blend of configurations: the other configuration's model settings are in no config the bundle reads
    work = tmp_path / "work"
    shutil.copytree(ctx.work_dir, work)
    metrics = json.loads((work / "detect" / "metrics.json").read_text())
    (work / "detect" / "metrics.json").write_text(json.dumps({**metrics, "submitted": "wbf models",
                                                              "configurations": ["tinyssd", "lr2"]}))
    blend = Context(load_config(None, [*FAST, *FOLDS, f"detect.predict.score_threshold={cut}"]), data, work,
                    ctx.submissions_dir, resolve=False)
    with pytest.raises(PipelineError, match=r"lr2/detections.pt: not found; run `make detect` with the config of "
                                            r"configuration 'lr2', then with this one$"):
        bundle_detection.run(blend)


# the second stage: 1-epoch resnet10t crop classifiers on 32 px crops of the same two folds
CLASSIFIER = ("detect.classifier.enabled=true", "detect.classifier.train.image_size=32",
              "detect.classifier.train.epochs=1", "detect.classifier.copies=1")


@pytest.mark.slow
def test_detection_bundle_carries_the_crop_classifier_that_renamed_the_submission(shapes, tmp_path):
    """detect.classifier.enabled (configs/detect-small.yaml): the bundle renames the fused boxes with the fold crop
    classifiers and the rule chosen on OOF, and gives the renamed submission back without the pipeline."""
    _, data = shapes
    ctx = _ctx(tmp_path, data, *FOLDS, *CLASSIFIER)
    spec = orchestrate.run("bundle", ctx)
    bundle = ctx.submissions_dir / "shapes-bundle"
    steps = spec["detection"]["steps"]
    assert [s["step"] for s in steps] == ["detect", "wbf", "rename", "score_threshold"]
    metrics = json.loads((ctx.work_dir / "detect" / "metrics.json").read_text())
    rename, chosen = steps[2], metrics["classifier"]
    assert chosen["weight"] < 1  # the classifier names boxes here: a bundle without it would differ
    assert {k: rename[k] for k in ("rule", "weight", "merge_iou")} == {k: chosen[k] for k in ("rule", "weight",
                                                                                              "merge_iou")}
    assert rename["classifier"]["views"] == ["identity", "hflip"] and rename["classifier"]["image_size"] == 32
    assert sorted(p.name for p in (bundle / "weights").iterdir()) == [
        "classifier-resnet10t-fold0.safetensors", "classifier-resnet10t-fold1.safetensors",
        "tinyssd-fold0.safetensors", "tinyssd-fold1.safetensors"]
    assert "timm" in spec["requires"]

    python = _isolated_python(tmp_path, block=NOT_NEEDED)
    sub, boxes, _ = _run(bundle, data, tmp_path / "user", python, "--batch-size", "4")
    expected = pd.read_csv(ctx.submissions_dir / "shapes.csv", dtype=str, keep_default_na=False)
    assert sub.equals(expected)
    # the detector's own names are not the submission's: the rename step ran
    run = torch.load(ctx.work_dir / "detect" / "tinyssd" / "detections.pt", weights_only=True)
    test = pd.read_csv(data / "test.csv")["image"].tolist()
    sizes = torch.tensor([Image.open(data / i).size for i in test], dtype=torch.float32)
    fused = fuse_chosen(run["test"], sizes, metrics, 100)
    detector = _boxes_frame(test, above_score(fused, 0.02), spec["classes"])
    assert len(boxes) != len(detector) or boxes["label"].tolist() != detector["label"].tolist()
    # unrounded: the pipeline's renaming of its fusion (the stage's parity check) against predict.py's
    folds = pd.read_csv(ctx.work_dir / "detect" / "folds.csv")["fold"].to_numpy()
    split = read_detection(data, ctx.cfg.detect.data, ctx.cfg.competition, 0, holdout=False)
    arrays = split_arrays(split.test, spec["classes"], ctx.work_dir / "cache", 64, "test")
    c = rename["classifier"]
    renamed = rename_test(ctx, split.key(), spec["classes"], folds, arrays, fused, rename["weight"],
                          rename["merge_iou"], rename["boxes_per_image"], c["image_size"], rename["margin"], c["views"],
                          rename["top_k"], 100)
    _assert_same_boxes(boxes, _boxes_frame(test, above_score(renamed, 0.02), spec["classes"]))
    # --engine onnx: the detectors in onnxruntime, the crop classifiers still on torch, the same renamed submission
    orchestrate.run("bundle", _ctx(tmp_path, data, *FOLDS, *CLASSIFIER, "export.bundle_onnx=true"))
    onnx_python = _isolated_python(tmp_path, allow=("onnxruntime",), block=NOT_NEEDED)
    sub_onnx, _, out = _run(bundle, data, tmp_path / "onnx", onnx_python, "--engine", "onnx", "--batch-size", "4")
    assert sub_onnx.equals(expected) and "(onnx)" in out
    # a rule the submission was not made with is refused; so are classifiers this config did not train
    with pytest.raises(PipelineError, match=r"shapes.csv: not the fusion .* renamed by the crop classifiers"):
        bundle_detection.run(_ctx(tmp_path, data, *FOLDS, *CLASSIFIER, "detect.classifier.top_k=1"))
    with pytest.raises(PipelineError, match=r"fold0/best.json: made with other data or detect settings"):
        bundle_detection.run(_ctx(tmp_path, data, *FOLDS, *CLASSIFIER, "detect.classifier.train.lr=0.01"))


@pytest.mark.slow
def test_bundle_of_a_blend_of_configurations_runs_each_configurations_detectors(shapes, tmp_path, monkeypatch):
    """Two configurations in one WORK (TinySSD at two learning rates) whose WBF blend is submitted: the bundle holds
    a detect step per configuration, the other one's settings read from its detections.pt, and gives the blend's
    submission back without the pipeline."""
    from pipeline.detection import ensemble
    from pipeline.stages import detect

    _, data = shapes

    def blend_wins(runs, *args):  # 1-epoch detectors score ~0 on OOF, where the blend need not win: made to win
        return ensemble.choose_submission([{**r, "oof_scores": {"map_50": -1.0, "map": -1.0}} for r in runs], *args)

    orchestrate.run("detect", _ctx(tmp_path, data, *FOLDS))
    monkeypatch.setattr(detect, "choose_submission", blend_wins)
    ctx = _ctx(tmp_path, data, *FOLDS, "detect.folds.name=lr2", "detect.train.lr=0.02")
    spec = orchestrate.run("bundle", ctx)
    metrics = json.loads((ctx.work_dir / "detect" / "metrics.json").read_text())
    assert metrics["submitted"] == "wbf models" and metrics["configurations"] == ["lr2", "tinyssd"]
    steps = spec["detection"]["steps"]
    assert [s["step"] for s in steps] == ["detect", "detect", "wbf", "score_threshold"]
    assert [s["models"][0]["name"] for s in steps[:2]] == ["lr2", "tinyssd"]
    assert steps[0]["views"] == steps[1]["views"] == ["x1", "x1+hflip", "x1.25", "x1.25+hflip"]
    bundle = ctx.submissions_dir / "shapes-bundle"
    assert sorted(p.name for p in (bundle / "weights").iterdir()) == [
        "lr2-fold0.safetensors", "lr2-fold1.safetensors", "tinyssd-fold0.safetensors", "tinyssd-fold1.safetensors"]
    python = _isolated_python(tmp_path, block=NOT_NEEDED)
    sub, boxes, out = _run(bundle, data, tmp_path / "user", python)
    assert sub.equals(pd.read_csv(ctx.submissions_dir / "shapes.csv", dtype=str, keep_default_na=False))
    assert "4 detector(s)" in out
    # unrounded: the pipeline's fusion of both configurations' cached views
    lists = [x for c in ("lr2", "tinyssd")
             for x in torch.load(ctx.work_dir / "detect" / c / "detections.pt", weights_only=True)["test"]]
    test = pd.read_csv(data / "test.csv")["image"].tolist()
    sizes = torch.tensor([Image.open(data / i).size for i in test], dtype=torch.float32)
    _assert_same_boxes(boxes, _boxes_frame(test, above_score(fuse_chosen(lists, sizes, metrics, 100), 0.02),
                                           spec["classes"]))
    # the blend belongs to the config whose run made it; the other's recorded settings must have trained its weights
    with pytest.raises(PipelineError, match=r"WBF blend of configurations \['lr2', 'tinyssd'\] made by the run of "
                                            r"'lr2', this config's is 'tinyssd'"):
        bundle_detection.run(_ctx(tmp_path, data, *FOLDS))
    other = ctx.work_dir / "detect" / "tinyssd" / "detections.pt"
    run = torch.load(other, weights_only=True)
    run["detect_config"]["train"]["lr"] = 0.05
    torch.save(run, other)
    with pytest.raises(PipelineError, match=r"tinyssd/fold0/model.json: made with other data or detect settings"):
        bundle_detection.run(ctx)


@pytest.mark.slow
def test_one_model_bundle_with_mirror_tta_reproduces_the_submission(shapes, tmp_path):
    """detect.folds.n_splits=1 (configs/bananas.yaml): one TinySSD, its anchors averaged with the mirror image's."""
    _, data = shapes
    ctx = _ctx(tmp_path, data, "detect.folds.n_splits=1", "detect.evaluate.tta=hflip")
    spec = orchestrate.run("bundle", ctx)
    steps = spec["detection"]["steps"]
    assert [s["step"] for s in steps] == ["detect"] and steps[0]["tta"] == "hflip"
    python = _isolated_python(tmp_path, block=NOT_NEEDED)
    sub, boxes, _ = _run(ctx.submissions_dir / "shapes-bundle", data, tmp_path / "user", python)
    assert sub.equals(pd.read_csv(ctx.submissions_dir / "shapes.csv", dtype=str, keep_default_na=False))
    expected = pd.read_csv(ctx.work_dir / "detect" / "test_predictions.csv", dtype=str, keep_default_na=False)
    assert sub.equals(expected) and len(boxes) > 0


@pytest.mark.parametrize("family", ["tinyssd", "retinanet", "fcos", "ssdlite"])
def test_each_detector_family_decodes_in_the_bundle_as_in_the_pipeline(family, tmp_path):
    """Random weights of each family, its views plain, mirrored and scaled, decoded by the pipeline's Detector and
    by bundle_detection.py's: the same boxes, scores and labels (the weights go through a safetensors file)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = create(family, 3, 64, "resnet10t", 64).eval()  # GroupNorm(32) of a 1x1 P7 needs 64 channels
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    model = {"family": family, "num_classes": 3, "image_size": 64, "backbone": "resnet10t", "fpn_channels": 64}
    fold = {"weights": "w.safetensors", "anchor_sizes": getattr(net, "sizes", None),
            "anchor_ratios": getattr(net, "ratios", None)}
    old, bd.HERE = bd.HERE, tmp_path
    try:
        theirs_net = bd.build_detector(model, fold)
    finally:
        bd.HERE = old
    images = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)  # x0.75: 72 px, TinySSD's least is 64
    sizes = torch.tensor([[64.0, 64.0], [100.0, 50.0], [37.0, 80.0]])
    decode = DecodeConfig()
    rt = Runtime(channels_last=True)
    for tta in ("none", "hflip"):
        ours = Detector(rt.prepare(net), decode, rt, tta)(images, sizes, 0.005, 2)
        theirs = bd.Detector(theirs_net, decode.model_dump(), torch.device("cpu"), True, tta)(images, sizes, 0.005, 2)
        _assert_same_boxes(_boxes_frame(["a", "b", "c"], theirs, list("xyz")),
                           _boxes_frame(["a", "b", "c"], ours, list("xyz")))
    for view in ("x0.75+hflip", "x1.25"):
        ours = view_detections(net, decode, rt, Arrays(images, torch.zeros(3, 1, 5), sizes), view, 0.005, 1)
        theirs = bd.view_detections(bd.Detector(theirs_net, decode.model_dump(), torch.device("cpu"), True), images,
                                    sizes, view, 0.005, 2)
        _assert_same_boxes(_boxes_frame(["a", "b", "c"], theirs, list("xyz")),
                           _boxes_frame(["a", "b", "c"], ours, list("xyz")))


@pytest.mark.parametrize("family", ["tinyssd", "retinanet"])
def test_the_detectors_network_part_exports_to_onnx_and_decodes_as_on_torch(family, tmp_path):
    """Random weights: each graph's raw outputs match torch's within 1e-4 (two batch sizes: the batch is dynamic),
    TinySSD gets one graph per view side, a torchvision detector one (its transform resizes every view); the bundle's
    Detector on onnxruntime, built without the weights, finds the boxes the torch Detector finds."""
    from safetensors.torch import save_file

    from pipeline.export import onnx_detection as od

    torch.manual_seed(0)
    net = create(family, 3, 64, "resnet10t", 64).eval()
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    sides = od.graph_sides(net, 64, ["x1", "x1+hflip", "x1.25"])
    assert sides == ([64, 80] if family == "tinyssd" else [64])
    fold = {"weights": "w.safetensors", "anchor_sizes": getattr(net, "sizes", None),
            "anchor_ratios": getattr(net, "ratios", None), "onnx": {}}
    for side in sides:
        check = od.export_checked(net, tmp_path / f"g{side}.onnx", side, 17, 1e-4, images, "fix")
        assert check["images"] == 5 and check["max_abs_diff"] < 1e-4, check
        fold["onnx"][str(side)] = {"file": f"g{side}.onnx", "feature_shapes": check["feature_shapes"]}
        if family == "tinyssd":
            net(od.network_input(net, od.at_side(images, side)))
            assert check["feature_shapes"] == [list(s) for s in net.feature_shapes]
    model = {"family": family, "num_classes": 3, "image_size": 64, "backbone": "resnet10t", "fpn_channels": 64}
    cpu, decode = torch.device("cpu"), DecodeConfig().model_dump()
    sizes = torch.tensor([[64.0, 64.0], [100.0, 50.0], [37.0, 80.0], [64.0, 64.0], [90.0, 40.0]])
    old, bd.HERE = bd.HERE, tmp_path
    try:
        on_torch = bd.Detector(bd.build_detector(model, fold), decode, cpu, True)
        for tta in ("none", "hflip"):
            on_onnx = bd.Detector(bd.build_detector(model, fold, weights=False), decode, cpu, True, tta,
                                  bd.OnnxNetwork(fold, cpu))
            on_torch.tta = tta
            _assert_same_boxes(_boxes_frame(list("abcde"), on_onnx(images, sizes, 0.005, 2), list("xyz")),
                               _boxes_frame(list("abcde"), on_torch(images, sizes, 0.005, 2), list("xyz")), 1e-4)
        on_torch.tta = on_onnx.tta = "none"
        found = [bd.view_detections(d, images, sizes, "x1.25", 0.005, 2) for d in (on_onnx, on_torch)]
        _assert_same_boxes(*(_boxes_frame(list("abcde"), f, list("xyz")) for f in found), 1e-4)
        if family == "tinyssd":  # a side without a graph (torchvision's transform resizes every view to 64 px)
            with pytest.raises(ValueError, match="no ONNX graph for 72 px inputs; rebuild the bundle"):
                bd.view_detections(on_onnx, images, sizes, "x1.125", 0.005, 2)
    finally:
        bd.HERE = old


def test_the_bundle_fuses_boxes_as_the_pipeline(tmp_path):
    """bundle_detection's WBF step (ensemble-boxes' file copied beside it) equals fusion.fuse on random lists of a
    non-square image, with each score rule; the score threshold keeps the same boxes as ensemble.above_score."""
    from pipeline.detection.fusion import fuse
    from pipeline.stages.bundle_detection import WBF_SOURCE

    shutil.copyfile(WBF_SOURCE, tmp_path / "ensemble_boxes_wbf.py")
    rng = np.random.default_rng(0)

    def random_list(n):
        xy = rng.uniform(0, 150, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 50, (n, 2))], 1).clip(0, [200, 100, 200, 100])
        return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(rng.uniform(0, 1, n),
                                                                                           dtype=torch.float32),
                "labels": torch.tensor(rng.integers(0, 3, n))}

    lists = [[random_list(12), random_list(0)] for _ in range(4)]
    sizes = torch.tensor([[200.0, 100.0], [200.0, 100.0]])
    old, bd.HERE = bd.HERE, tmp_path
    try:
        for conf in ("avg", "max", "box_and_model_avg", "absent_model_aware_avg"):
            step = {"iou_thr": 0.3, "skip_thr": 0.1, "conf_type": conf, "max_detections": 20}
            ours = fuse(lists, sizes, 0.3, 0.1, 20, conf)
            [theirs] = bd.wbf_step(step, lists, {"sizes": sizes})
            _assert_same_boxes(_boxes_frame(["a", "b"], theirs, list("xyz")), _boxes_frame(["a", "b"], ours,
                                                                                           list("xyz")))
            cut = float(torch.cat([d["scores"] for d in ours]).median())
            [kept] = bd.score_threshold_step({"threshold": cut}, [theirs], {})
            _assert_same_boxes(_boxes_frame(["a", "b"], kept, list("xyz")),
                               _boxes_frame(["a", "b"], above_score(ours, cut), list("xyz")))
    finally:
        bd.HERE = old


def test_the_bundle_crops_merges_and_renames_as_the_second_stage():
    """bundle_detection's copies of crops.py (crop, ranked, agnostic_merge, with_votes, combine) and of the detect
    stage's classifier probabilities equal the pipeline's on random boxes of a batch and a random classifier."""
    import timm

    from pipeline.detection import crops
    from pipeline.stages.detect_classifier import _probs

    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    xy = torch.rand(9, 2) * 40
    boxes = torch.cat((xy, xy + torch.rand(9, 2) * 20 + 1), 1)
    index = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    for margin in (0.0, 0.15):
        assert np.array_equal(bd.crop(images, index, boxes, 16, margin), crops.crop(images, index, boxes, 16, margin))
    found = [{"boxes": boxes[index == i] * 2, "scores": torch.rand(int((index == i).sum())),
              "labels": torch.randint(0, 4, (int((index == i).sum()),))} for i in range(3)]
    found.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)})
    ours, theirs = crops.ranked(found), bd.ranked(found)
    for merged_ours, merged_theirs in ((crops.with_votes(ours, 4), bd.with_votes(theirs, 4)),
                                       (crops.agnostic_merge(ours, 0.3, 4), bd.agnostic_merge(theirs, 0.3, 4))):
        probs = [np.random.default_rng(i).dirichlet(np.ones(4), min(2, len(d["boxes"]))).astype(np.float32)
                 for i, d in enumerate(merged_ours)]
        for weight in (0.0, 0.5):
            a = crops.combine(merged_ours, probs, weight, 3, 5)
            b = bd.combine(merged_theirs, probs, weight, 3, 5)
            for x, y in zip(a, b, strict=True):
                assert all(torch.equal(x[k], y[k]) for k in ("boxes", "scores", "labels"))
    net = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval()
    cut = bd.crop(images, index, boxes, 16, 0.15)
    norm = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    views = ["identity", "hflip"]
    ours = _probs([(net, norm), (net, norm)], cut, index.numpy(), views, Runtime(), 4)
    theirs = sum(bd.crop_probs(net, cut, norm, views, 4, torch.device("cpu"), False) / 2 for _ in range(2))
    assert np.abs(ours - theirs).max() < 1e-6


def test_is_detection_tells_a_box_table_from_a_label_table(tmp_path):
    (tmp_path / "train.csv").write_text("image,label,xmin,ymin,xmax,ymax\na.png,x,1,2,3,4\n")
    assert is_detection_folder(tmp_path, "train.csv")
    (tmp_path / "train.csv").write_text("image,label\na.png,x\n")
    assert not is_detection_folder(tmp_path, "train.csv")
    assert not is_detection_folder(tmp_path, "missing.csv")
    assert orchestrate.chain("bundle", detection=True) == ["detect", "bundle"]
    assert orchestrate.chain("export", detection=True) == ["detect", "export"]
    assert orchestrate.chain("bundle")[-2:] == ["ensemble", "bundle"]
