"""TinySSD as built in d2l (section 14.7): a small base net, down-sampling blocks, five
scales with anchors from multibox_prior, and per-scale class and box predictors.

The number of classes follows the data; anchor sizes (per scale) and ratios default to d2l's
and can be set or derived from the training boxes (anchors.py); anchors are generated for the
feature-map sizes the input gives (5,444 for 256x256 input with d2l's anchors).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.config.detect import TINYSSD_RATIOS, TINYSSD_SIZES
from pipeline.detection.boxes import multibox_prior
from pipeline.training.runtime import Runtime

ANCHORS_PER_PIXEL = len(TINYSSD_SIZES[0]) + len(TINYSSD_RATIOS) - 1


def down_sample_blk(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU, then halve height and width."""
    layers = []
    for _ in range(2):
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()]
        in_channels = out_channels
    return nn.Sequential(*layers, nn.MaxPool2d(2))


def base_net() -> nn.Sequential:
    channels = [3, 16, 32, 64]
    return nn.Sequential(*[down_sample_blk(channels[i], channels[i + 1]) for i in range(3)])


def _stage(i: int) -> nn.Module:
    if i == 0:
        return base_net()
    if i == 1:
        return down_sample_blk(64, 128)
    if i == 4:
        return nn.AdaptiveMaxPool2d((1, 1))
    return down_sample_blk(128, 128)


def anchors_per_pixel(sizes: list[list[float]], ratios: list[float]) -> int:
    """d2l's multibox_prior: every size at the first ratio, the first size at the other ratios."""
    return len(sizes[0]) + len(ratios) - 1


class TinySSD(nn.Module):
    def __init__(self, num_classes: int, sizes: list[list[float]] | None = None, ratios: list[float] | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.sizes, self.ratios = [list(s) for s in sizes or TINYSSD_SIZES], list(ratios or TINYSSD_RATIOS)
        if len(self.sizes) != 5 or len({len(s) for s in self.sizes}) != 1:
            raise ValueError(f"TinySSD needs 5 scales with the same number of anchor sizes each, got {self.sizes}")
        self.anchors_per_pixel = k = anchors_per_pixel(self.sizes, self.ratios)
        in_channels = [64, 128, 128, 128, 128]
        self.stages = nn.ModuleList(_stage(i) for i in range(5))
        self.cls = nn.ModuleList(nn.Conv2d(c, k * (num_classes + 1), 3, padding=1) for c in in_channels)
        self.bbox = nn.ModuleList(nn.Conv2d(c, k * 4, 3, padding=1) for c in in_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(anchors (1, A, 4), class logits (B, A, C + 1), box offsets (B, A * 4))."""
        anchors, cls_preds, bbox_preds, self.feature_shapes = [], [], [], []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            self.feature_shapes.append(tuple(x.shape[-2:]))  # anchor layout of the last input, for mirror_index
            anchors.append(multibox_prior(x.shape[-2], x.shape[-1], self.sizes[i], self.ratios, device=x.device))
            cls_preds.append(self.cls[i](x).permute(0, 2, 3, 1).flatten(1))
            bbox_preds.append(self.bbox[i](x).permute(0, 2, 3, 1).flatten(1))
        cls = torch.cat(cls_preds, 1).reshape(len(x), -1, self.num_classes + 1)
        return torch.cat(anchors, 1), cls, torch.cat(bbox_preds, 1)


# pixel units (Runtime.to_input with divisor 1): BatchNorm follows the first conv, so fixed scaling is enough
INPUT_NORM = {"mean": [127.5] * 3, "std": [64.0] * 3}


def outputs(model: nn.Module, images: torch.Tensor, runtime: Runtime):
    """(anchors, class logits, box offsets) in float32 for a uint8 batch, with the runtime's autocast and
    memory format."""
    with runtime.autocasting():
        anchors, cls_preds, bbox_preds = model(runtime.to_input(images, INPUT_NORM, divisor=1.0))
    return anchors.float(), cls_preds.float(), bbox_preds.float()
