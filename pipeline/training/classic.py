"""d2l's classic networks, for small images, registered as d2l_<name>.

LeNet (with the BatchNorm d2l adds), AlexNet, VGG-11, NiN, GoogLeNet and d2l's
ResNet-18, as built in "Dive into Deep Learning". timm has no such versions, so they live here.
Adapted to any input size >= 16 px: AlexNet and NiN start with a stride-1 5x5 convolution instead
of the 11x11 stride-4 one meant for 224 px, pooling layers pad or round up, and an adaptive pool
sits before each classifier. `in_chans` and `num_classes` follow the data.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Classic(nn.Sequential):
    """nn.Sequential whose last module is the classifier (the part fine-tuning replaces)."""

    def get_classifier(self) -> nn.Module:
        return self[-1] if not isinstance(self[-1], nn.Flatten) else self[-3]


def lenet(num_classes: int, in_chans: int, drop_rate: float = 0.0) -> Classic:
    return Classic(
        nn.Conv2d(in_chans, 6, 5, padding=2), nn.BatchNorm2d(6), nn.Sigmoid(), nn.AvgPool2d(2, ceil_mode=True),
        nn.Conv2d(6, 16, 5, padding=2), nn.BatchNorm2d(16), nn.Sigmoid(), nn.AvgPool2d(2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(5), nn.Flatten(),
        nn.Linear(400, 120), nn.BatchNorm1d(120), nn.Sigmoid(), nn.Linear(120, 84), nn.BatchNorm1d(84), nn.Sigmoid(),
        nn.Dropout(drop_rate), nn.Linear(84, num_classes))


def alexnet(num_classes: int, in_chans: int, drop_rate: float = 0.5) -> Classic:
    return Classic(
        nn.Conv2d(in_chans, 96, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(96, 256, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(1024, 1024), nn.ReLU(), nn.Dropout(drop_rate or 0.5), nn.Linear(1024, 1024), nn.ReLU(),
        nn.Dropout(drop_rate or 0.5), nn.Linear(1024, num_classes))


def vgg11(num_classes: int, in_chans: int, drop_rate: float = 0.5) -> Classic:
    layers, channels = [], in_chans
    for n_convs, out in ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)):
        for _ in range(n_convs):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
            channels = out
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return Classic(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(512, 1024), nn.ReLU(), nn.Dropout(drop_rate or 0.5), nn.Linear(1024, 1024), nn.ReLU(),
                   nn.Dropout(drop_rate or 0.5), nn.Linear(1024, num_classes))


def _nin_block(in_c: int, out_c: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride, padding), nn.ReLU(),
                         nn.Conv2d(out_c, out_c, 1), nn.ReLU(), nn.Conv2d(out_c, out_c, 1), nn.ReLU())


def nin(num_classes: int, in_chans: int, drop_rate: float = 0.5) -> Classic:
    return Classic(
        _nin_block(in_chans, 96, 5, 1, 2), nn.MaxPool2d(3, 2, padding=1),
        _nin_block(96, 256, 5, 1, 2), nn.MaxPool2d(3, 2, padding=1),
        _nin_block(256, 384, 3, 1, 1), nn.MaxPool2d(3, 2, padding=1), nn.Dropout(drop_rate or 0.5),
        _nin_block(384, num_classes, 3, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class Inception(nn.Module):
    """Four parallel paths concatenated on channels (course section 8.4)."""

    def __init__(self, in_c: int, c1: int, c2: tuple[int, int], c3: tuple[int, int], c4: int):
        super().__init__()
        self.p1 = nn.Conv2d(in_c, c1, 1)
        self.p2 = nn.Sequential(nn.Conv2d(in_c, c2[0], 1), nn.ReLU(), nn.Conv2d(c2[0], c2[1], 3, padding=1))
        self.p3 = nn.Sequential(nn.Conv2d(in_c, c3[0], 1), nn.ReLU(), nn.Conv2d(c3[0], c3[1], 5, padding=2))
        self.p4 = nn.Sequential(nn.MaxPool2d(3, 1, padding=1), nn.Conv2d(in_c, c4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(p(x)) for p in (self.p1, self.p2, self.p3, self.p4)], dim=1)


def googlenet(num_classes: int, in_chans: int, drop_rate: float = 0.0) -> Classic:
    pool = lambda: nn.MaxPool2d(3, 2, padding=1)  # noqa: E731
    return Classic(
        nn.Conv2d(in_chans, 64, 7, 2, 3), nn.ReLU(), pool(),
        nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 192, 3, padding=1), nn.ReLU(), pool(),
        Inception(192, 64, (96, 128), (16, 32), 32), Inception(256, 128, (128, 192), (32, 96), 64), pool(),
        Inception(480, 192, (96, 208), (16, 48), 64), Inception(512, 160, (112, 224), (24, 64), 64),
        Inception(512, 128, (128, 256), (24, 64), 64), Inception(512, 112, (144, 288), (32, 64), 64),
        Inception(528, 256, (160, 320), (32, 128), 128), pool(),
        Inception(832, 256, (160, 320), (32, 128), 128), Inception(832, 384, (192, 384), (48, 128), 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop_rate), nn.Linear(1024, num_classes))


class Residual(nn.Module):
    """d2l's residual block: two 3x3 convs with BatchNorm, optional 1x1 shortcut."""

    def __init__(self, in_c: int, out_c: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, out_c, 3, stride, 1)
        self.conv2 = nn.Conv2d(out_c, out_c, 3, padding=1)
        self.conv3 = nn.Conv2d(in_c, out_c, 1, stride) if stride != 1 or in_c != out_c else None
        self.bn1, self.bn2 = nn.BatchNorm2d(out_c), nn.BatchNorm2d(out_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (self.conv3(x) if self.conv3 is not None else x))


def resnet18(num_classes: int, in_chans: int, drop_rate: float = 0.0) -> Classic:
    blocks, channels = [], 64
    for i, out in enumerate((64, 128, 256, 512)):
        blocks += [Residual(channels, out, 1 if i == 0 else 2), Residual(out, out)]
        channels = out
    return Classic(nn.Conv2d(in_chans, 64, 7, 2, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1), *blocks,
                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop_rate), nn.Linear(512, num_classes))


def resnet_small(num_classes: int, in_chans: int, drop_rate: float = 0.0) -> Classic:
    """d2l's residual blocks for 28-32 px inputs: a stride-1 3x3 stem and no max-pool, then one block per
    stage at 32, 64 and 128 channels (28 px: 28, 14, 7). ImageNet stems (timm's resnets, d2l_resnet18) divide
    the side by 4 before the first block, leaving a 28 px digit 7x7 cells; timm has no CIFAR-style ResNet."""
    blocks, channels = [], 32
    for i, out in enumerate((32, 64, 128)):
        blocks.append(Residual(channels, out, 1 if i == 0 else 2))
        channels = out
    return Classic(nn.Conv2d(in_chans, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), *blocks,
                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop_rate), nn.Linear(128, num_classes))


CLASSIC = {"d2l_lenet": lenet, "d2l_alexnet": alexnet, "d2l_vgg11": vgg11, "d2l_nin": nin,
           "d2l_googlenet": googlenet, "d2l_resnet18": resnet18, "d2l_resnet_small": resnet_small}
