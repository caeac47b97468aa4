"""The detection half of the offline bundle: what the detection track does from decoded test images to the boxes
of its submission, written out again without the pipeline.

`make bundle` copies this file verbatim into a detection bundle as detection.py (with ensemble-boxes' own
ensemble_boxes_wbf.py beside it) and predict.py loads it for a spec of task "detection". It imports torch,
torchvision (NMS, box IoU and the RetinaNet, FCOS and SSDlite detectors) and numpy; timm only for a RetinaNet or
FCOS backbone or a crop classifier; onnxruntime only under `--engine onnx` (bundles made with
export.bundle_onnx=true), which runs each detector's network part from its graphs in onnx/ and everything else here
as on torch (the crop classifiers stay on torch). Never the pipeline: tests/test_bundle_detection.py checks each
part against the module it restates (detection/tinyssd.py, torchvision_models.py, infer.py's Detector, boxes.py,
ensemble.py's views, fusion.py, crops.py) and the whole against the pipeline's submission.

spec["detection"]["steps"] is the chain run on the test images, each step a dict named by "step":

    detect           every fold model of every model, each test-time view: one detection list per (model, fold,
                     view), decoded as the pipeline decodes them (score filter, class-aware NMS, box voting); a
                     blend of configurations has one detect step per configuration, their lists in turn
    wbf              Weighted Boxes Fusion of those lists into one, with the thresholds chosen on OOF
    rename           the second stage (detect.classifier): the fused boxes, optionally merged class-agnostically,
                     renamed by the mean of the fold crop classifiers (timm, or the pipeline's d2l nets from
                     classic.py beside this file) combined with the detector by the rule chosen on OOF
    score_threshold  the boxes the submission keeps

A later step is one more entry in STEPS and in the spec's list.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections import OrderedDict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, box_iou, roi_align

HERE = Path(__file__).resolve().parent
TINYSSD_NORM = {"mean": [127.5] * 3, "std": [64.0] * 3}  # tinyssd.INPUT_NORM, on pixel values
RETINANET_SIZES = (16, 32, 64, 128, 256)  # torchvision_models.RETINANET_SIZES


# --- boxes: detection/boxes.py --------------------------------------------------------------------------------------

def corner_to_center(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), -1)


def center_to_corner(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)


def multibox_prior(height: int, width: int, sizes: list[float], ratios: list[float], device=None) -> torch.Tensor:
    size, ratio = torch.tensor(sizes, device=device), torch.tensor(ratios, device=device)
    cy = (torch.arange(height, device=device) + 0.5) / height
    cx = (torch.arange(width, device=device) + 0.5) / width
    sy, sx = torch.meshgrid(cy, cx, indexing="ij")
    w = torch.cat((size * ratio[0].sqrt(), size[0] * ratio[1:].sqrt())) * height / width
    h = torch.cat((size / ratio[0].sqrt(), size[0] / ratio[1:].sqrt()))
    half = torch.stack((-w, -h, w, h), 1) / 2
    centres = torch.stack((sx, sy, sx, sy), -1).reshape(-1, 1, 4)
    return (centres + half).reshape(1, -1, 4)


def offset_inverse(anchors: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    ca = corner_to_center(anchors)
    xy = offsets[..., :2] * ca[..., 2:] / 10 + ca[..., :2]
    wh = torch.exp(offsets[..., 2:] / 5) * ca[..., 2:]
    return center_to_corner(torch.cat((xy, wh), -1))


def mirror_boxes(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((1 - x2, y1, 1 - x1, y2), -1)


def mirror_index(shapes: list[tuple[int, int]], per_pixel: int) -> torch.Tensor:
    parts, start = [], 0
    for h, w in shapes:
        parts.append(torch.arange(h * w * per_pixel).reshape(h, w, per_pixel).flip(1).reshape(-1) + start)
        start += h * w * per_pixel
    return torch.cat(parts)


def box_voting(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, keep: torch.Tensor,
               iou_threshold: float, max_elements: int = 1 << 22) -> torch.Tensor:
    """Each kept box becomes the score-weighted mean of its group's candidates overlapping it (boxes.box_voting)."""
    order = torch.argsort(groups, stable=True)
    by_group = groups[order]
    kept_order = torch.argsort(groups[keep], stable=True)
    kept = keep[kept_order]
    lo = torch.searchsorted(by_group, groups[kept], side="left").tolist()
    hi = torch.searchsorted(by_group, groups[kept], side="right").tolist()
    shifted = boxes + groups.to(boxes.dtype)[:, None] * 2
    out = torch.empty((len(keep), 4), dtype=boxes.dtype, device=boxes.device)
    start = 0
    while start < len(kept):
        end = start + 1
        while end < len(kept) and (end + 1 - start) * (hi[end] - lo[start]) <= max_elements:
            end += 1
        part, cand = kept[start:end], order[lo[start]:hi[end - 1]]
        weight = (box_iou(shifted[part], shifted[cand]) >= iou_threshold) * scores[cand]
        total = weight.sum(1, keepdim=True)
        out[kept_order[start:end]] = torch.where(total > 0, weight @ boxes[cand] / total.clamp(min=1e-12),
                                                 boxes[part])
        start = end
    return out


# --- networks: detection/tinyssd.py and torchvision_models.py (same module names, so the weights load) -------------

def _down_sample_blk(in_channels: int, out_channels: int) -> nn.Sequential:
    layers = []
    for _ in range(2):
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()]
        in_channels = out_channels
    return nn.Sequential(*layers, nn.MaxPool2d(2))


def _stage(i: int) -> nn.Module:
    if i == 0:
        channels = [3, 16, 32, 64]
        return nn.Sequential(*[_down_sample_blk(channels[j], channels[j + 1]) for j in range(3)])
    if i == 1:
        return _down_sample_blk(64, 128)
    if i == 4:
        return nn.AdaptiveMaxPool2d((1, 1))
    return _down_sample_blk(128, 128)


class TinySSD(nn.Module):
    def __init__(self, num_classes: int, sizes: list[list[float]], ratios: list[float]):
        super().__init__()
        self.num_classes, self.sizes, self.ratios = num_classes, [list(s) for s in sizes], list(ratios)
        self.anchors_per_pixel = k = len(self.sizes[0]) + len(self.ratios) - 1
        in_channels = [64, 128, 128, 128, 128]
        self.stages = nn.ModuleList(_stage(i) for i in range(5))
        self.cls = nn.ModuleList(nn.Conv2d(c, k * (num_classes + 1), 3, padding=1) for c in in_channels)
        self.bbox = nn.ModuleList(nn.Conv2d(c, k * 4, 3, padding=1) for c in in_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        anchors, cls_preds, bbox_preds, self.feature_shapes = [], [], [], []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            self.feature_shapes.append(tuple(x.shape[-2:]))
            anchors.append(multibox_prior(x.shape[-2], x.shape[-1], self.sizes[i], self.ratios, device=x.device))
            cls_preds.append(self.cls[i](x).permute(0, 2, 3, 1).flatten(1))
            bbox_preds.append(self.bbox[i](x).permute(0, 2, 3, 1).flatten(1))
        cls = torch.cat(cls_preds, 1).reshape(len(x), -1, self.num_classes + 1)
        return torch.cat(anchors, 1), cls, torch.cat(bbox_preds, 1)


class TimmFPN(nn.Module):
    """A timm features_only backbone under torchvision's FPN with P6 and P7 (torchvision_models.TimmFPN)."""

    def __init__(self, name: str, channels: int):
        import timm
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7

        super().__init__()
        self.body = timm.create_model(name, pretrained=False, features_only=True)
        info = self.body.feature_info
        self.fpn = FeaturePyramidNetwork(info.channels()[-3:], channels, extra_blocks=LastLevelP6P7(channels, channels))
        self.out_channels = channels

    def forward(self, x: torch.Tensor):
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x)[-3:])))


class TorchvisionDetector(nn.Module):
    """torchvision's detector as `net` (the weights' key prefix) and its dense candidates."""

    def __init__(self, kind: str, num_classes: int, image_size: int, backbone: str, fpn_channels: int):
        from torchvision.models.detection import FCOS, RetinaNet, ssdlite320_mobilenet_v3_large
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.retinanet import RetinaNetHead
        from torchvision.models.detection.transform import GeneralizedRCNNTransform

        super().__init__()
        self.kind, self.image_size = kind, image_size
        self.label_offset = 1 if kind == "ssdlite" else 0
        if kind == "ssdlite":
            net = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1)
            net.transform = GeneralizedRCNNTransform(image_size, image_size, [0.5] * 3, [0.5] * 3, size_divisible=1,
                                                     fixed_size=(image_size, image_size))
        elif kind == "retinanet":
            fpn = TimmFPN(backbone, fpn_channels)
            sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in RETINANET_SIZES)
            anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
            head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes,
                                 norm_layer=partial(nn.GroupNorm, 32))
            net = RetinaNet(fpn, num_classes, min_size=image_size, max_size=image_size, anchor_generator=anchors,
                            head=head)
        elif kind == "fcos":
            net = FCOS(TimmFPN(backbone, fpn_channels), num_classes, min_size=image_size, max_size=image_size)
        else:
            raise ValueError(f"detector {kind!r} is unknown to this detection.py; rebuild the bundle")
        self.net = net

    @torch.no_grad()
    def candidates(self, x: torch.Tensor, network=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(class scores (B, A, C + 1), column 0 the background, boxes (B, A, 4) in [0, 1]) of every anchor;
        `network` (an OnnxNetwork) runs backbone and head instead of torch."""
        net = self.net
        batch, _ = net.transform(list(x))
        if network is None:
            features = net.backbone(batch.tensors)
            features = list(features.values()) if isinstance(features, dict) else [features]
            head = net.head(features)
        else:
            outputs, shapes = network(batch.tensors)
            head = dict(zip(HEAD_OUTPUTS[self.kind], outputs, strict=True))
            # the anchor generators read only the shapes, dtype and device of the feature maps
            features = [batch.tensors.new_empty((0, 0, h, w)) for h, w in shapes]
        anchors = torch.stack(net.anchor_generator(batch, features))
        logits, regression = head["cls_logits"].float(), head["bbox_regression"].float()
        b, a, _ = regression.shape
        if self.kind == "fcos":
            scores = (logits.sigmoid() * head["bbox_ctrness"].float().sigmoid()).sqrt()
            boxes = net.box_coder.decode(regression, anchors)
        else:
            scores = logits.softmax(-1) if self.kind == "ssdlite" else logits.sigmoid()
            boxes = net.box_coder.decode_single(regression.reshape(b * a, 4), anchors.reshape(b * a, 4))
        if not self.label_offset:
            scores = torch.cat((scores.new_zeros(b, a, 1), scores), -1)
        return scores, (boxes.reshape(b, a, 4) / self.image_size).clamp(0, 1)


def build_detector(model: dict, fold: dict, weights: bool = True) -> nn.Module:
    """The network of one fold model, its safetensors weights loaded (`weights`), in eval mode. Without them (the
    onnx engine) only its parameter-free parts serve: torchvision's transform, anchor generator and box coder."""
    from safetensors.torch import load_file

    if model["family"] == "tinyssd":
        net = TinySSD(model["num_classes"], fold["anchor_sizes"], fold["anchor_ratios"])
    else:
        net = TorchvisionDetector(model["family"], model["num_classes"], model["image_size"], model["backbone"],
                                  model["fpn_channels"])
    if weights:
        net.load_state_dict(load_file(str(HERE / fold["weights"])))
    return net.eval()


# the graphs' outputs (pipeline/export/onnx_detection.OUTPUTS); TinySSD's are cls_logits and bbox_preds
HEAD_OUTPUTS = {"retinanet": ("cls_logits", "bbox_regression"),
                "fcos": ("cls_logits", "bbox_regression", "bbox_ctrness"), "ssdlite": ("cls_logits", "bbox_regression")}


class OnnxNetwork:
    """The network part of one fold model in onnxruntime (--engine onnx): fold["onnx"] maps an input side to its
    graph (input `image`, the normalised batch; the raw per-anchor outputs, dynamic batch) and the feature map
    shapes the anchors are made from. Decoding, NMS and fusion stay in torch, as on the torch engine."""

    def __init__(self, fold: dict, device: torch.device):
        import onnxruntime as ort

        if not fold.get("onnx"):
            raise ValueError("--engine onnx: this bundle has no ONNX files; rebuild it with "
                             "`make bundle OVERRIDES=export.bundle_onnx=true` or use --engine torch")
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda"
                     else ["CPUExecutionProvider"])
        self.device = device
        self.graphs = {int(side): (ort.InferenceSession(str(HERE / g["file"]), providers=providers),
                                   [tuple(s) for s in g["feature_shapes"]]) for side, g in fold["onnx"].items()}

    def __call__(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        graph = self.graphs.get(x.shape[-1])
        if graph is None:
            raise ValueError(f"spec.json: no ONNX graph for {x.shape[-1]} px inputs; rebuild the bundle")
        sess, shapes = graph
        outputs = sess.run(None, {"image": x.detach().cpu().contiguous().numpy()})
        return [torch.from_numpy(o).to(self.device) for o in outputs], shapes


# --- decoding: infer.py's Detector -------------------------------------------------------------------------------

class Detector:
    """Per-image detections (boxes in pixels of the original image, scores, 0-based classes) of one fold model."""

    def __init__(self, net: nn.Module, decode: dict, device: torch.device, channels_last: bool, tta: str = "none",
                 network: OnnxNetwork | None = None):
        self.net, self.decode, self.device, self.channels_last, self.tta = net, decode, device, channels_last, tta
        self.network = network  # --engine onnx: the network part in onnxruntime
        self.net.to(device)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def to_input(self, images: torch.Tensor, norm: dict, divisor: float) -> torch.Tensor:
        mean = torch.tensor(norm["mean"], device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(norm["std"], device=self.device).view(1, -1, 1, 1)
        x = images.to(self.device).float()
        if divisor != 1:
            x = x.div_(divisor)
        out = (x - mean) / std
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def _tinyssd(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.to_input(images, TINYSSD_NORM, 1.0)
        if self.network is None:
            anchors, cls_logits, bbox_preds = (t.float() for t in self.net(x))
            self.feature_shapes = self.net.feature_shapes
        else:
            (cls_logits, bbox_preds), self.feature_shapes = self.network(x)
            net = self.net
            anchors = torch.cat([multibox_prior(h, w, net.sizes[i], net.ratios, device=x.device)
                                 for i, (h, w) in enumerate(self.feature_shapes)], 1)
        b, a, _ = cls_logits.shape
        boxes = offset_inverse(anchors.reshape(1, a, 4), bbox_preds.float().reshape(b, a, 4)).clamp(0, 1)
        return cls_logits.float().softmax(-1), boxes

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.net, TorchvisionDetector):
            unit = {"mean": [0.0] * 3, "std": [1.0] * 3}
            scores, boxes = self.net.candidates(self.to_input(images, unit, 255.0), self.network)
            if self.tta == "hflip":  # anchor grids not mirror-symmetric: the mirror's candidates appended
                scores_m, boxes_m = self.net.candidates(self.to_input(images.flip(-1), unit, 255.0), self.network)
                scores, boxes = torch.cat((scores, scores_m), 1), torch.cat((boxes, mirror_boxes(boxes_m)), 1)
            return scores, boxes
        probs, boxes = self._tinyssd(images)
        if self.tta == "hflip":  # TinySSD's grid is mirror-symmetric: averaged anchor by anchor
            mirror = mirror_index(self.feature_shapes, self.net.anchors_per_pixel).to(probs.device)
            probs_m, boxes_m = self._tinyssd(images.flip(-1))
            probs, boxes = (probs + probs_m[:, mirror]) / 2, (boxes + mirror_boxes(boxes_m[:, mirror])) / 2
        return probs, boxes

    def select(self, probs: torch.Tensor, boxes: torch.Tensor, sizes: torch.Tensor,
               score_threshold: float) -> list[dict]:
        b = len(probs)
        conf, cls = probs[..., 1:].max(-1)
        image, anchor = (conf >= score_threshold).nonzero(as_tuple=True)
        scores, labels, found = conf[image, anchor], cls[image, anchor], boxes[image, anchor]
        groups = image * probs.shape[-1] + labels
        keep = batched_nms(found, scores, groups, self.decode["nms_threshold"])
        keep = keep[torch.argsort(image[keep], stable=True)]
        first = torch.searchsorted(image[keep], image[keep])
        keep = keep[torch.arange(len(keep), device=keep.device) - first < self.decode["max_detections"]]
        voting = self.decode["box_voting"]
        kept = box_voting(found, scores, groups, keep, voting) if voting else found[keep]
        scale = sizes.to(boxes.device, torch.float32).repeat(1, 2)
        pixel = kept * scale[image[keep]]
        counts = torch.bincount(image[keep], minlength=b).tolist()
        return [{"boxes": bx.cpu(), "scores": sc.cpu(), "labels": lb.cpu()}
                for bx, sc, lb in zip(pixel.split(counts), scores[keep].split(counts), labels[keep].split(counts),
                                      strict=True)]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, score_threshold: float,
                 batch_size: int) -> list[dict]:
        out = []
        for idx in torch.arange(len(images)).split(batch_size):
            out += self.select(*self.run(images[idx]), sizes[idx], score_threshold)
        return out


def view_images(images: torch.Tensor, view: str) -> tuple[torch.Tensor, bool]:
    """A test-time view "x<scale>[+hflip]" of a uint8 batch (ensemble.view_detections): resized (rounded back to
    uint8), mirrored; and whether its boxes must be mirrored back."""
    scale, flip = float(view[1:].split("+")[0]), view.endswith("+hflip")
    if scale != 1 and len(images):
        side = max(32, round(images.shape[-1] * scale))
        images = F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=scale < 1,
                               align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return (images.flip(-1) if flip else images), flip


def view_detections(detector: Detector, images: torch.Tensor, sizes: torch.Tensor, view: str,
                    score_threshold: float, batch_size: int) -> list[dict]:
    shown, flip = view_images(images, view)
    found = detector(shown, sizes, score_threshold, batch_size)
    if flip:
        for det, (w, _) in zip(found, sizes.tolist(), strict=True):
            det["boxes"] = torch.stack((w - det["boxes"][:, 2], det["boxes"][:, 1], w - det["boxes"][:, 0],
                                        det["boxes"][:, 3]), 1)
    return found


# --- the steps ------------------------------------------------------------------------------------------------------

def detect_step(step: dict, lists: list[list[dict]], inputs: dict) -> list[list[dict]]:
    """One detection list per (model, fold model, view), in the order the pipeline fused them (model, fold, view),
    after those of the detect steps before it (a blend of configurations: one step each, as each has its views)."""
    out = list(lists)
    for model in step["models"]:
        images, sizes = inputs["images"][model["image_size"]], inputs["sizes"]
        for fold in model["folds"]:
            onnx = inputs.get("engine") == "onnx"
            network = OnnxNetwork(fold, inputs["device"]) if onnx else None
            detector = Detector(build_detector(model, fold, weights=not onnx), step["decode"], inputs["device"],
                                step["channels_last"], step.get("tta", "none"), network)
            for view in step["views"]:
                out.append(view_detections(detector, images, sizes, view, step["score_threshold"],
                                           inputs["batch_size"]))
    return out


def _ensemble_boxes():
    spec = importlib.util.spec_from_file_location("bundle_ensemble_boxes_wbf", HERE / "ensemble_boxes_wbf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.weighted_boxes_fusion


def wbf(lists: list[dict], width: float, height: float, iou_thr: float, skip_thr: float, max_detections: int,
        conf_type: str, weighted_boxes_fusion) -> dict:
    """One image's lists fused (fusion.wbf): normalised by width and height, ensemble-boxes' WBF, back to pixels."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    boxes = [(d["boxes"].double().numpy() / scale).clip(0, 1).tolist() for d in lists]
    scores = [d["scores"].double().numpy().tolist() for d in lists]
    labels = [d["labels"].numpy().tolist() for d in lists]
    if not any(boxes):
        return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    fused, fscores, flabels = weighted_boxes_fusion(boxes, scores, labels, iou_thr=iou_thr, skip_box_thr=skip_thr,
                                                    conf_type=conf_type)
    order = np.argsort(-fscores, kind="stable")[:max_detections]
    return {"boxes": torch.from_numpy(np.asarray(fused, dtype=np.float64).reshape(-1, 4)[order] * scale).float(),
            "scores": torch.from_numpy(np.asarray(fscores, dtype=np.float64)[order]).float(),
            "labels": torch.from_numpy(np.asarray(flabels)[order].astype(np.int64))}


def wbf_step(step: dict, lists: list[list[dict]], inputs: dict) -> list[list[dict]]:
    fuse = _ensemble_boxes()
    sizes = inputs["sizes"]
    with warnings.catch_warnings():  # one line per zero-area box it skips (as the pipeline's fusion skipped them)
        warnings.simplefilter("ignore", UserWarning)
        return [[wbf([v[i] for v in lists], float(sizes[i, 0]), float(sizes[i, 1]), step["iou_thr"], step["skip_thr"],
                     step["max_detections"], step["conf_type"], fuse) for i in range(len(sizes))]]


def score_threshold_step(step: dict, lists: list[list[dict]], inputs: dict) -> list[list[dict]]:
    return [[{k: v[d["scores"] >= step["threshold"]] for k, v in d.items()} for d in found] for found in lists]


# --- the second stage: detection/crops.py and stages/detect_classifier.py, copied (the bundle runs without the
# pipeline); tests/test_bundle_detection.py checks the copy against them -----------------------------------------

def square_regions(boxes: torch.Tensor, margin: float) -> torch.Tensor:
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True).clamp(min=1.0) * (0.5 + margin)
    return torch.cat((centre - half, centre + half), 1)


def crop(images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, size: int, margin: float,
         chunk: int = 256) -> np.ndarray:
    """(M, size, size, 3) uint8 square crops with context of `boxes` (xyxy in the pixels of `images`) of the images
    `image_index`, outside the image black (crops.crop)."""
    out = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    if not len(boxes):
        return out
    regions = square_regions(boxes.float(), margin)
    for start in range(0, len(images), chunk):
        rows = torch.nonzero((image_index >= start) & (image_index < start + chunk)).flatten()
        if not len(rows):
            continue
        rois = torch.cat((image_index[rows, None].float() - start, regions[rows]), 1)
        part = roi_align(images[start:start + chunk].float(), rois, (size, size), 1.0, sampling_ratio=2, aligned=True)
        out[rows.numpy()] = part.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def ranked(detections: list[dict]) -> list[dict]:
    out = []
    for d in detections:
        order = torch.argsort(d["scores"], descending=True, stable=True)
        out.append({k: v[order] for k, v in d.items()})
    return out


def agnostic_merge(detections: list[dict], iou: float, n_classes: int) -> list[dict]:
    """One box per object whatever its class: greedy clusters around the best unclaimed box, merged into their
    score-weighted mean box with the best score and the score-weighted share of each class as `votes`."""
    out = []
    for d in detections:
        boxes, scores, labels = d["boxes"].float(), d["scores"].float(), d["labels"].long()
        free = torch.ones(len(boxes), dtype=torch.bool)
        overlaps = box_iou(boxes, boxes) if len(boxes) else torch.zeros(0, 0)
        merged, best, votes = [], [], []
        for i in range(len(boxes)):
            if not free[i]:
                continue
            members = free & (overlaps[i] >= iou)
            members[i] = True
            free &= ~members
            weight = scores[members]
            merged.append((boxes[members] * weight[:, None]).sum(0) / weight.sum().clamp(min=1e-12))
            best.append(scores[i])
            votes.append(torch.zeros(n_classes).index_add_(0, labels[members], weight) / weight.sum().clamp(min=1e-12))
        if merged:
            out.append({"boxes": torch.stack(merged), "scores": torch.stack(best), "votes": torch.stack(votes)})
        else:
            out.append({"boxes": boxes.reshape(0, 4), "scores": scores, "votes": torch.zeros(0, n_classes)})
    return out


def with_votes(detections: list[dict], n_classes: int) -> list[dict]:
    return [{"boxes": d["boxes"].float(), "scores": d["scores"].float(),
             "votes": F.one_hot(d["labels"].long(), n_classes).float()} for d in detections]


def combine(boxes: list[dict], probs: list[np.ndarray], weight: float, top_k: int, max_detections: int,
            floor: float = 0.01) -> list[dict]:
    """Per box r = (1 - weight) * classifier + weight * detector votes; each of its top_k classes with r >= floor
    one detection scored score * r; the best max_detections per image (crops.combine)."""
    out = []
    for d, p in zip(boxes, probs, strict=True):
        votes = d["votes"].clone()
        n = len(p)
        if n:
            votes[:n] = (1 - weight) * torch.as_tensor(p, dtype=torch.float32) + weight * votes[:n]
        if not len(votes):
            out.append({"boxes": d["boxes"].reshape(0, 4), "scores": d["scores"][:0], "labels": torch.zeros(0).long()})
            continue
        values, classes = votes.topk(min(top_k, votes.shape[1]), dim=1)
        keep = values >= floor
        rows = torch.nonzero(keep)[:, 0]
        scores = d["scores"][rows] * values[keep]
        order = torch.argsort(scores, descending=True, stable=True)[:max_detections]
        out.append({"boxes": d["boxes"][rows][order], "scores": scores[order], "labels": classes[keep][order]})
    return out


def build_classifier(classifier: dict, fold: dict, n_classes: int) -> nn.Module:
    """One fold's crop classifier (training/models.build_model), its safetensors weights loaded, in eval mode."""
    from safetensors.torch import load_file

    backbone = classifier["backbone"]
    if backbone.startswith("d2l_"):
        spec = importlib.util.spec_from_file_location("bundle_classic", HERE / "classic.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        net = module.CLASSIC[backbone](n_classes, fold["in_chans"], fold["drop_rate"])
    else:
        import timm

        net = timm.create_model(backbone, pretrained=False, num_classes=n_classes, in_chans=fold["in_chans"],
                                drop_rate=fold["drop_rate"])
    net.load_state_dict(load_file(str(HERE / fold["weights"])))
    return net.eval()


@torch.no_grad()
def crop_probs(net: nn.Module, crops: np.ndarray, norm: dict, views: list[str], batch_size: int,
               device: torch.device, channels_last: bool) -> np.ndarray:
    """(M, C) probabilities of one classifier: the mean over its views (identity, hflip) of the softmax, the views
    of a batch in one forward pass (training/tta.py's tta_logits, as the detect stage calls it)."""
    net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    mean = torch.tensor(norm["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], device=device).view(1, -1, 1, 1)
    flips = {"identity": lambda x: x, "hflip": lambda x: x.flip(-1)}
    out = [[] for _ in views]
    for start in range(0, len(crops), batch_size):
        # NHWC permuted to NCHW: channels-last strided, as the pipeline's input is
        x = torch.from_numpy(np.array(crops[start:start + batch_size])).permute(0, 3, 1, 2).to(device).float()
        x = (x.div_(255.0) - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = net(torch.cat([flips[v](x) for v in views])).float().view(len(views), len(x), -1).cpu()
        for i, part in enumerate(logits):
            out[i].append(part)
    logits = torch.stack([torch.cat(parts) for parts in out]).numpy()
    return torch.softmax(torch.from_numpy(logits), -1).mean(0).numpy()


def rename_step(step: dict, lists: list[list[dict]], inputs: dict) -> list[list[dict]]:
    """The fused boxes renamed (detect_classifier.rename with the rule chosen on OOF): crops of each image's best
    boxes_per_image boxes named by the mean of the fold classifiers, combined with the detector's votes."""
    [found] = lists
    images, sizes, classifier = inputs["images"][step["image_size"]], inputs["sizes"], step["classifier"]
    n_classes = int(step["n_classes"])
    boxes = ranked(found)
    boxes = with_votes(boxes, n_classes) if step["merge_iou"] is None else agnostic_merge(boxes, step["merge_iou"],
                                                                                          n_classes)
    side, per_image, parts, index = images.shape[-1], step["boxes_per_image"], [], []
    for i, d in enumerate(boxes):
        b = d["boxes"][:per_image].float()
        parts.append(b / sizes[i].float().repeat(2) * side)
        index += [i] * len(b)
    index = np.asarray(index, dtype=np.int64)
    probs = np.zeros((len(index), n_classes), dtype=np.float32)
    if len(index):
        crops = crop(images, torch.from_numpy(index), torch.cat(parts), classifier["image_size"], step["margin"])
        for fold in classifier["folds"]:
            net = build_classifier(classifier, fold, n_classes)
            p = crop_probs(net, crops, fold["norm"], classifier["views"], classifier["batch_size"], inputs["device"],
                           classifier["channels_last"])
            probs += p / len(classifier["folds"])
    per_image_probs = np.split(probs, np.cumsum(np.bincount(index, minlength=len(boxes)))[:-1])
    return [combine(boxes, per_image_probs, step["weight"], step["top_k"], step["max_detections"])]


STEPS = {"detect": detect_step, "wbf": wbf_step, "rename": rename_step, "score_threshold": score_threshold_step}


def run_steps(spec: dict, images: dict[int, torch.Tensor], sizes: torch.Tensor, device: torch.device,
              batch_size: int, engine: str = "torch") -> list[dict]:
    """The spec's steps on (N, 3, S, S) uint8 images per input side S and their (N, 2) original widths, heights:
    the submitted detections, one dict per image. engine "onnx": the detectors' network parts in onnxruntime."""
    inputs = {"images": images, "sizes": sizes, "device": device, "batch_size": batch_size, "engine": engine}
    lists: list[list[dict]] = []
    for step in spec["detection"]["steps"]:
        if step["step"] not in STEPS:
            raise ValueError(f"spec.json: detection step {step['step']!r} is unknown to this detection.py; "
                             "rebuild the bundle")
        lists = STEPS[step["step"]](step, lists, inputs)
    if len(lists) != 1:
        raise ValueError(f"spec.json: the detection steps end with {len(lists)} lists, not one; rebuild the bundle")
    return lists[0]


def prediction_strings(detections: list[dict], classes: list[str]) -> list[str]:
    """'label score xmin ymin xmax ymax ...' per image, best first (infer.prediction_strings)."""
    out = []
    for det in detections:
        names = np.asarray(classes, dtype=object)[det["labels"].numpy()]
        rows = zip(names, det["scores"].tolist(), det["boxes"].numpy().round(1).tolist(), strict=True)
        out.append(" ".join(f"{n} {s:.4f} {b[0]:.1f} {b[1]:.1f} {b[2]:.1f} {b[3]:.1f}" for n, s, b in rows))
    return out
