"""torchvision's detectors beside TinySSD (`detect.model.name`): RetinaNet and FCOS on a timm backbone with
torchvision's FPN, and SSDlite on torchvision's MobileNetV3; random init, or weights from a local file.

The detectors are torchvision's own (anchors, heads, losses, box coders); this module adapts them to
the detection track's conventions, so the shared trainer, evaluation and prediction path serve them
as they serve TinySSD:

- input: uint8 batches at `detect.train.image_size`, scaled to [0, 1] by the runtime; torchvision's
  GeneralizedRCNNTransform normalises them and, with min_size = max_size = the image size, leaves
  their size alone (the images are already square at that size).
- training: ground truth rows (class, x1, y1, x2, y2 in [0, 1], class -1 pads) become torchvision's
  target dicts (pixel boxes; labels 0..C-1 for RetinaNet and FCOS, whose sigmoid classifiers need no
  background class, 1..C for SSD, whose softmax has the background at 0); the model computes its
  losses itself in train mode.
- prediction: instead of torchvision's postprocess (per-level top-k, score threshold, NMS), the
  candidates of every anchor are returned densely, as TinySSD's are -- class scores (B, A, C + 1)
  with column 0 the background (zero for the sigmoid models) and boxes (B, A, 4) in [0, 1] -- so
  the track's decoding (score filter, class-aware NMS, box voting, max_detections, pixels of the
  original image) applies unchanged.
  Mirror-image TTA concatenates the two views' candidates (torchvision's RetinaNet and FCOS anchor
  grids are not mirror-symmetric, so anchors cannot be paired as TinySSD's are); NMS and voting
  then merge them.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from pathlib import Path

import timm
import torch
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet, ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from pipeline.core.artifacts import file_digest
from pipeline.core.errors import PipelineError
from pipeline.detection.boxes import mirror_boxes
from pipeline.detection.tinyssd import TinySSD
from pipeline.training.runtime import Runtime
from pipeline.training.weights import read_state_dict, readable_file

KINDS = ("retinanet", "fcos", "ssdlite")
# the ones on a timm backbone with an FPN (detect.model.backbone, detect.model.fpn_channels)
FPN_KINDS = ("retinanet", "fcos")
# RetinaNet anchors in pixels of the network input, one size per FPN level P3..P7 (strides 8..128), each at
# three scales (x1, x2^(1/3), x2^(2/3)) and three ratios as torchvision's: torchvision's 32..512 suit COCO at
# 800 px; 16..256 give 16-64 px objects anchors on the fine levels of 64-256 px images.
RETINANET_SIZES = (16, 32, 64, 128, 256)
UNIT = {"mean": [0.0] * 3, "std": [1.0] * 3}  # to_input with divisor 255: [0, 1], what torchvision's models take


class TimmFPN(nn.Module):
    """A timm features_only backbone under torchvision's FeaturePyramidNetwork with P6 and P7 (from P5).

    torchvision's BackboneWithFPN does the same for its own classifiers through IntermediateLayerGetter;
    timm's features_only gives any of its CNNs' feature maps directly. The module names (`body`, `fpn`)
    are BackboneWithFPN's, so a torchvision ResNet-FPN detector's state dict loads into the same
    architecture (timm's ResNets name their layers as torchvision's).
    """

    def __init__(self, name: str, channels: int):
        super().__init__()
        try:
            self.body = timm.create_model(name, pretrained=False, features_only=True)
        except (RuntimeError, TypeError, ValueError) as exc:  # unknown name; no features_only for that model
            raise PipelineError(f"detect.model.backbone={name}: not a timm CNN with feature maps ({exc}); "
                                "use e.g. resnet18, resnet10t, resnet50, efficientnet_b0") from None
        info = self.body.feature_info
        if info.reduction()[-3:] != [8, 16, 32]:
            raise PipelineError(f"detect.model.backbone={name}: its last feature maps have strides {info.reduction()}, "
                                "the FPN needs 8, 16, 32 last; use a CNN such as resnet18 or efficientnet_b0")
        self.fpn = FeaturePyramidNetwork(info.channels()[-3:], channels, extra_blocks=LastLevelP6P7(channels, channels))
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x)[-3:])))


class TorchvisionDetector(nn.Module):
    """A torchvision detector (`net`) with the track's conventions (module docstring)."""

    def __init__(self, kind: str, net: nn.Module, image_size: int, num_classes: int, backbone: nn.Module):
        super().__init__()
        self.kind, self.net, self.image_size, self.num_classes = kind, net, image_size, num_classes
        self.backbone_name = backbone  # what a backbone-only pretrained file is loaded into (not a submodule twice)
        self.label_offset = 1 if kind == "ssdlite" else 0  # SSD's softmax: class 0 is the background

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone.body if self.kind in FPN_KINDS else self.net.backbone.features

    def losses(self, images: torch.Tensor, labels: torch.Tensor, runtime: Runtime) -> dict[str, torch.Tensor]:
        """torchvision's training losses (float32) for a uint8 batch and its (B, G, 5) normalised ground truth."""
        x = runtime.to_input(images, UNIT)
        with runtime.autocasting():
            losses = self.net(list(x), targets(labels.to(x.device), self.image_size, self.label_offset))
        return {k: v.float() for k, v in losses.items()}

    @torch.no_grad()
    def candidates(self, images: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
        """(class scores (B, A, C + 1), column 0 the background, boxes (B, A, 4) in [0, 1]) of every anchor: what
        torchvision's postprocess_detections starts from, before its top-k, threshold and NMS."""
        x = runtime.to_input(images, UNIT)
        net = self.net
        with runtime.autocasting():
            batch, _ = net.transform(list(x))
            features = net.backbone(batch.tensors)
            features = list(features.values()) if isinstance(features, dict) else [features]
            head = net.head(features)
        anchors = torch.stack(net.anchor_generator(batch, features))  # (B, A, 4) pixels
        logits, regression = head["cls_logits"].float(), head["bbox_regression"].float()
        b, a, _ = regression.shape
        if self.kind == "fcos":
            scores = (logits.sigmoid() * head["bbox_ctrness"].float().sigmoid()).sqrt()
            boxes = net.box_coder.decode(regression, anchors)
        else:
            scores = logits.softmax(-1) if self.kind == "ssdlite" else logits.sigmoid()
            boxes = net.box_coder.decode_single(regression.reshape(b * a, 4), anchors.reshape(b * a, 4))
        if not self.label_offset:  # a zero background column, so column c + 1 is class c as in TinySSD's
            scores = torch.cat((scores.new_zeros(b, a, 1), scores), -1)
        return scores, (boxes.reshape(b, a, 4) / self.image_size).clamp(0, 1)


def targets(labels: torch.Tensor, image_size: int, offset: int) -> list[dict[str, torch.Tensor]]:
    """(B, G, 5) rows [class, x1, y1, x2, y2] in [0, 1], class -1 pads -> torchvision's per-image target dicts
    (pixel boxes, labels class + offset)."""
    out = []
    for rows in labels:
        rows = rows[rows[:, 0] >= 0]
        out.append({"boxes": rows[:, 1:] * image_size, "labels": rows[:, 0].long() + offset})
    return out


def views(model: TorchvisionDetector, images: torch.Tensor, runtime: Runtime, tta: str,
          first: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of the plain view (`first` when already computed) and, with tta hflip, those of the mirror
    image, mirrored back and appended: NMS and box voting then merge the two views' boxes."""
    scores, boxes = first or model.candidates(images, runtime)
    if tta == "hflip":
        scores_m, boxes_m = model.candidates(images.flip(-1), runtime)
        scores, boxes = torch.cat((scores, scores_m), 1), torch.cat((boxes, mirror_boxes(boxes_m)), 1)
    return scores, boxes


def build(kind: str, num_classes: int, image_size: int, backbone: str = "resnet18",
          fpn_channels: int = 128) -> TorchvisionDetector:
    """A randomly initialised detector for `num_classes` object classes on image_size x image_size input."""
    transform = partial(GeneralizedRCNNTransform, image_size, image_size)
    if kind == "ssdlite":  # num_classes counts the background
        net = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1)
        # the builder fixes 320 x 320; its default boxes are fractions of the image, so only the resize changes
        net.transform = transform([0.5] * 3, [0.5] * 3, size_divisible=1, fixed_size=(image_size, image_size))
        return TorchvisionDetector(kind, net, image_size, num_classes, "mobilenet_v3_large")
    if kind not in FPN_KINDS:
        raise PipelineError(f"detect.model.name={kind}: not one of tinyssd, {', '.join(KINDS)}")
    fpn = TimmFPN(backbone, fpn_channels)
    if kind == "retinanet":
        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in RETINANET_SIZES)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        # GroupNorm in the head as torchvision's RetinaNet v2 (and FCOS): without it, from random init, the
        # classifier barely learned on 400 bananas in 8 epochs (docs/detection.md)
        head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, 32))
        net = RetinaNet(fpn, num_classes, min_size=image_size, max_size=image_size, anchor_generator=anchors,
                        head=head)
    else:  # FCOS: one anchor per location, its size the level's stride (torchvision's default), for scaling
        net = FCOS(fpn, num_classes, min_size=image_size, max_size=image_size)
    return TorchvisionDetector(kind, net, image_size, num_classes, backbone)


def _match(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor], prefixes: tuple[str, ...],
           free: str | None) -> tuple[dict[str, torch.Tensor], list[str], str | None]:
    """(tensors of `state` for the keys of `target`, under the file prefix that matches most keys; the keys the
    file has at another shape under the `free` prefix; the first problem, or None when everything fits).
    BatchNorm's num_batches_tracked may be missing (torchvision's frozen BatchNorm has none)."""
    def found(prefix: str) -> int:
        return sum(prefix + k in state for k in target)

    prefix = max(prefixes, key=found)
    loaded, reset, problem = {}, [], None
    for key, value in target.items():
        theirs = state.get(prefix + key)
        if theirs is None:
            if not key.endswith("num_batches_tracked") and problem is None:
                problem = f"no tensor {prefix + key}"
        elif theirs.shape == value.shape:
            loaded[key] = theirs
        elif free is not None and key.startswith(free):
            reset.append(key)
        elif problem is None:
            problem = f"{prefix + key} is {list(theirs.shape)}, the model's {list(value.shape)}"
    return loaded, reset, problem


def load_pretrained(model: nn.Module, path: Path) -> str:
    """Load a state dict of the whole detector (the layers that follow the number of classes may differ and keep
    their random init) or of its backbone into `model`; returns what was loaded, in words. A file that fits
    neither raises one line naming the first mismatch of each."""
    state = read_state_dict(path, "detect.model.pretrained_path")
    tv = isinstance(model, TorchvisionDetector)
    kind, root = (model.kind, model.net) if tv else ("tinyssd", model)
    free = "head.classification_head." if tv else "cls."  # the layers whose shapes follow the number of classes
    prefixes = ("", "net.", "model.net.", "model.", "module.") if tv else ("", "model.", "module.")
    whole, reset, problem = _match(root.state_dict(), state, prefixes, free)
    if problem is None:
        root.load_state_dict(whole, strict=False)
        kept = f"; {len(reset)} tensor(s) shaped for another class count keep their random init" if reset else ""
        return f"whole {kind} detector from {path} ({len(whole)} tensors{kept})"
    if not tv:
        raise PipelineError(f"detect.model.pretrained_path={path}: does not fit TinySSD ({problem}); "
                            "give a TinySSD state dict (e.g. WORK/detect/model.safetensors)")
    body = model.backbone
    prefixes = ("", "net.backbone.body.", "backbone.body.", "body.", "net.backbone.features.", "backbone.features.",
                "features.", "model.", "module.")
    part, _, body_problem = _match(body.state_dict(), state, prefixes, None)
    if body_problem is None:
        body.load_state_dict(part, strict=False)
        return f"{model.backbone_name} backbone of {kind} from {path} ({len(part)} tensors)"
    raise PipelineError(f"detect.model.pretrained_path={path}: fits neither the {kind} detector ({problem}) nor its "
                        f"{model.backbone_name} backbone ({body_problem}); give a state dict of either")


NAMES = {"tinyssd": "TinySSD", "retinanet": "RetinaNet", "fcos": "FCOS", "ssdlite": "SSDlite"}


def create(kind: str, num_classes: int, image_size: int, backbone: str, fpn_channels: int) -> nn.Module:
    """The model `detect.model` names, randomly initialised (the caller seeds torch)."""
    if kind == "tinyssd":
        return TinySSD(num_classes)
    return build(kind, num_classes, image_size, backbone, fpn_channels)


def model_keys(kind: str, backbone: str, fpn_channels: int, pretrained_path: str | None) -> dict:
    """What of the model choice changes the trained weights, for the training key: the model, the backbone keys
    when it reads them, and the bytes of the pretrained file (not its path: a moved file trains the same)."""
    keys: dict = {"model": kind}
    if kind in FPN_KINDS:
        keys |= {"backbone": backbone, "fpn_channels": fpn_channels}
    if pretrained_path:
        keys["pretrained"] = file_digest(readable_file(Path(pretrained_path), "detect.model.pretrained_path"))
    return keys
