"""ONNX export of a detector's network part, checked against torch with onnxruntime.

The graph is the part of a detector that is dense arithmetic: it takes the normalised image batch `image`
(N, 3, S, S) float32 and returns the raw per-anchor outputs, with the batch dynamic and the side S fixed:

    tinyssd    cls_logits (N, A, C + 1), bbox_preds (N, A * 4)             its five heads, before the anchors
    retinanet  cls_logits (N, A, C), bbox_regression (N, A, 4)             backbone + FPN + head
    fcos       cls_logits (N, A, C), bbox_regression (N, A, 4), bbox_ctrness (N, A, 1)
    ssdlite    cls_logits (N, A, C + 1), bbox_regression (N, A, 4)

What stays in torch is cheap or data-dependent: the normalisation (for torchvision's detectors their
GeneralizedRCNNTransform, which also resizes every view to the trained size), the anchors (they follow the feature
map shapes, recorded beside the graph), box decoding, NMS, box voting and WBF. So the bundle's detection.py runs
the same code on either engine from the raw outputs on, and the check below compares like with like.

The side is fixed because TinySSD's anchors follow the feature map shapes a side gives (the bundle writes one graph
per view side, as the classification bundle does for its fixed-size nets); torchvision's detectors always see the
trained size after their transform, so one graph serves every view.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.core.artifacts import atomic_write
from pipeline.core.errors import PipelineError
from pipeline.detection.tinyssd import INPUT_NORM, TinySSD
from pipeline.detection.torchvision_models import create
from pipeline.export.onnx_export import session

OUTPUTS = {"tinyssd": ("cls_logits", "bbox_preds"), "retinanet": ("cls_logits", "bbox_regression"),
           "fcos": ("cls_logits", "bbox_regression", "bbox_ctrness"), "ssdlite": ("cls_logits", "bbox_regression")}


def family(net: nn.Module) -> str:
    return "tinyssd" if isinstance(net, TinySSD) else net.kind


def build_network(family_name: str, num_classes: int, image_size: int, backbone: str | None,
                  fpn_channels: int | None, anchor_sizes: list[list[float]] | None,
                  anchor_ratios: list[float] | None) -> nn.Module:
    """The pipeline's detector of one fold model as model.json and the bundle spec describe it (no weights)."""
    if family_name == "tinyssd":
        return TinySSD(num_classes, anchor_sizes, anchor_ratios)
    return create(family_name, num_classes, image_size, backbone or "resnet18", fpn_channels or 128)


class NetworkPart(nn.Module):
    """The exported graph as a torch module: the raw outputs of OUTPUTS[family] for a normalised batch; after a
    call, `feature_shapes` holds the (height, width) of each level (what the anchors are made from)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.family = net, family(net)
        self.feature_shapes: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.family == "tinyssd":
            # TinySSD.forward without its anchors, and without len(x), which the tracer would freeze into the
            # graph as the example's batch size
            net, cls, bbox, shapes = self.net, [], [], []
            for stage, cls_head, bbox_head in zip(net.stages, net.cls, net.bbox, strict=True):
                x = stage(x)
                shapes.append([int(x.shape[-2]), int(x.shape[-1])])
                cls.append(cls_head(x).permute(0, 2, 3, 1).flatten(1))
                bbox.append(bbox_head(x).permute(0, 2, 3, 1).flatten(1))
            self.feature_shapes = shapes
            logits = torch.cat(cls, 1)
            return logits.reshape(logits.shape[0], -1, net.num_classes + 1), torch.cat(bbox, 1)
        net = self.net.net
        features = net.backbone(x)
        features = list(features.values()) if isinstance(features, dict) else [features]
        self.feature_shapes = [[int(f.shape[-2]), int(f.shape[-1])] for f in features]
        head = net.head(features)
        return tuple(head[k] for k in OUTPUTS[self.family])


def view_side(image_size: int, view: str) -> int:
    """The side a test-time view "x<scale>[+hflip]" feeds the network (ensemble.view_detections' resize)."""
    scale = float(view[1:].split("+")[0])
    return image_size if scale == 1 else max(32, round(image_size * scale))


def network_input(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> the graph's input, normalised as the detector's torch path normalises it (TinySSD:
    pixel units, tinyssd.INPUT_NORM; torchvision: [0, 1] through its transform, resized to the trained size)."""
    x = images.float()
    if family(net) == "tinyssd":
        mean = torch.tensor(INPUT_NORM["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(INPUT_NORM["std"]).view(1, -1, 1, 1)
        return (x - mean) / std
    with torch.no_grad():
        batch, _ = net.net.transform(list(x.div_(255.0)))
    return batch.tensors


def graph_sides(net: nn.Module, image_size: int, views: list[str]) -> list[int]:
    """The input sides that need a graph: TinySSD's views' sides; torchvision's one transformed side."""
    if family(net) == "tinyssd":
        return sorted({view_side(image_size, v) for v in views})
    return [network_input(net, torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)).shape[-1]]


def export_detector(net: nn.Module, path: Path, side: int, opset: int, fix: str) -> list[list[int]]:
    """Write the network part of `net` (eval mode, on the CPU) for side x side inputs to `path` atomically, the
    batch dynamic; returns the feature map shapes the anchors need. `fix` ends the one-line error."""
    part = NetworkPart(net.cpu().eval()).eval()
    names = list(OUTPUTS[part.family])
    example = torch.zeros(2, 3, side, side)
    axes = {name: {0: "batch"} for name in ["image", *names]}

    def save(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
            torch.onnx.export(part, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=["image"],
                              output_names=names, dynamic_axes=axes)

    try:
        atomic_write(path, save)
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
        why = str(exc).splitlines()[0].split(". Please")[0]
        raise PipelineError(f"{path}: ONNX export failed ({why}); {fix} or try another export.opset") from None
    with torch.no_grad():
        part(example[:1])
    return part.feature_shapes


@torch.no_grad()
def compare_detector(net: nn.Module, path: Path, images: torch.Tensor, batch_size: int = 16) -> dict:
    """Max abs difference of the raw outputs between torch and onnxruntime on uint8 `images` (at the graph's
    side, or the trained size for torchvision's detectors), batch by batch, with both engines' seconds."""
    part = NetworkPart(net.cpu().eval()).eval()
    sess = session(path)
    worst, t_torch, t_onnx = 0.0, 0.0, 0.0
    for start in range(0, len(images), batch_size):
        x = network_input(net, images[start:start + batch_size]).contiguous()
        t0 = time.perf_counter()
        ref = [t.float().numpy() for t in part(x)]
        t1 = time.perf_counter()
        got = sess.run(None, {"image": x.numpy()})
        t2 = time.perf_counter()
        worst = max([worst] + [float(np.max(np.abs(r - g))) if r.size else 0.0 for r, g in zip(ref, got, strict=True)])
        t_torch, t_onnx = t_torch + t1 - t0, t_onnx + t2 - t1
    return {"max_abs_diff": worst, "images": len(images), "torch_s": t_torch, "onnx_s": t_onnx}


def at_side(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 images resized to `side` as a test-time view resizes them (ensemble.view_detections)."""
    if images.shape[-1] == side or not len(images):
        return images
    return F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=side < images.shape[-1],
                         align_corners=False).round().clamp(0, 255).to(torch.uint8)


def export_checked(net: nn.Module, path: Path, side: int, opset: int, tolerance: float, images: torch.Tensor,
                   fix: str) -> dict:
    """export_detector, then compare_detector on `images` (uint8 at the trained size, resized to a TinySSD graph's
    side); refuses a graph whose raw outputs differ from torch's by more than `tolerance` (export.tolerance).
    Returns the feature shapes and the check."""
    shapes = export_detector(net, path, side, opset, fix)
    shown = at_side(images, side) if family(net) == "tinyssd" else images
    check = compare_detector(net, path, shown)
    if check["max_abs_diff"] > tolerance:
        raise PipelineError(f"{path}: onnxruntime's raw outputs differ from torch's by {check['max_abs_diff']:.2e} "
                            f"on the test images, above export.tolerance={tolerance}; try another export.opset")
    return {"feature_shapes": shapes, **check}
