"""The augmentation presets on the device, batched: one uint8 batch goes to the GPU and every operation runs
on the whole batch at once, with its own random parameters per image (as albumentations draws them per image).

The operations and their parameters are pipeline/augment.py's PRESETS, read by both builders. kornia.augmentation
supplies the flip, random resized crop, affine, gamma and Gaussian blur (batched, per-sample parameters, drawn
from torch's generator, which the training loop reseeds every epoch). torchvision.transforms.v2 draws one
parameter set per call (the whole batch would flip together), so it cannot serve here. Two operations are
written by hand, because neither library has them in albumentations' form:

- brightness/contrast: albumentations computes x * (1 + c) + b and clips once; kornia's ColorJitter adds the
  brightness first, clips, then scales, which gives other pixel values for the same draws.
- coarse dropout: albumentations cuts 1-4 holes per image, each of its own size; kornia's RandomErasing and
  torchvision's cut one rectangle drawn by area and aspect ratio.

Images are float in [0, 1] here (x / 255); pipeline/runtime.py normalises afterwards.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

from .augment import preset_ops


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def _applied(n: int, p: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) < p


class BrightnessContrast(nn.Module):
    """albumentations' RandomBrightnessContrast (brightness_by_max): x * (1 + c) + b, c and b uniform in
    [-limit, limit] per image, clipped once to [0, 1]; applied to each image with probability p."""

    def __init__(self, brightness: float, contrast: float, p: float):
        super().__init__()
        self.brightness, self.contrast, self.p = brightness, contrast, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, dev = len(x), x.device
        on = _applied(n, self.p, dev).float()
        alpha = 1 + _uniform(n, -self.contrast, self.contrast, dev) * on
        beta = _uniform(n, -self.brightness, self.brightness, dev) * on
        return (x * alpha.view(-1, 1, 1, 1) + beta.view(-1, 1, 1, 1)).clamp_(0, 1)


class CoarseDropout(nn.Module):
    """albumentations' CoarseDropout with fill 0: with probability p, 1-`holes[1]` holes per image, each of
    height and width uniform in `size` (fractions of the sides) at a uniform position. The holes of the whole
    batch are one broadcast comparison (images x holes x rows x columns), no loop over images."""

    def __init__(self, holes: tuple[int, int], size: tuple[float, float], p: float):
        super().__init__()
        self.holes, self.size, self.p = holes, size, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        dev, k = x.device, self.holes[1]
        count = torch.randint(self.holes[0], k + 1, (n,), device=dev) * _applied(n, self.p, dev)
        used = torch.arange(k, device=dev).view(1, k) < count.view(n, 1)
        hh = (torch.rand(n, k, device=dev) * (self.size[1] - self.size[0]) + self.size[0]) * h
        ww = (torch.rand(n, k, device=dev) * (self.size[1] - self.size[0]) + self.size[0]) * w
        hh, ww = hh.long().clamp_(min=1), ww.long().clamp_(min=1)
        y0 = (torch.rand(n, k, device=dev) * (h - hh + 1)).long()
        x0 = (torch.rand(n, k, device=dev) * (w - ww + 1)).long()
        rows = torch.arange(h, device=dev).view(1, 1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, 1, w)
        inside = ((rows >= y0[..., None, None]) & (rows < (y0 + hh)[..., None, None])
                  & (cols >= x0[..., None, None]) & (cols < (x0 + ww)[..., None, None]) & used[..., None, None])
        return x.masked_fill(inside.any(1, keepdim=True), 0.0)


class Sometimes(nn.Module):
    """`op` on each image with probability p: kornia's RandomResizedCrop crops every image whatever its p."""

    def __init__(self, op: nn.Module, p: float):
        super().__init__()
        self.op, self.p = op, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = _applied(len(x), self.p, x.device).nonzero().flatten()
        if len(chosen) == 0:
            return x
        out = x.clone()
        out[chosen] = self.op(x[chosen]).to(x.dtype)
        return out


def _module(op: str, a: dict, size: int) -> nn.Module:
    if op == "hflip":
        return K.RandomHorizontalFlip(p=a["p"])
    if op == "crop":
        return Sometimes(K.RandomResizedCrop((size, size), scale=a["scale"], ratio=(3 / 4, 4 / 3)), a["p"])
    if op == "affine":
        lo, hi = a["scale"]
        t, s = a["translate"], a["shear"]
        return K.RandomAffine(degrees=a["rotate"], translate=(t, t) if t else None,
                              scale=(lo, hi, lo, hi) if (lo, hi) != (1.0, 1.0) else None,
                              shear=(-s, s, -s, s) if s else None, padding_mode="zeros", p=a["p"])
    if op == "brightness_contrast":
        return BrightnessContrast(a["brightness"], a["contrast"], a["p"])
    if op == "gamma":
        return K.RandomGamma(gamma=a["gamma"], p=a["p"])
    if op == "blur":  # albumentations' kernel side for sigma s: int(3.5 s) * 2 + 1; reflection needs it under 2 x size
        side = min(int(3.5 * a["sigma"][1]) * 2 + 1, 2 * size - 1)
        return K.RandomGaussianBlur((side, side), a["sigma"], p=a["p"])
    if op == "dropout":
        return CoarseDropout(a["holes"], a["size"], a["p"])
    raise ValueError(f"no device version of the augmentation operation {op!r}")


class DeviceAugment(nn.Module):
    """The preset on a float [0, 1] NCHW batch, on whatever device the batch is."""

    def __init__(self, preset: str, size: int, hflip: bool):
        super().__init__()
        self.ops = nn.Sequential(*(_module(op, a, size) for op, a in preset_ops(preset, hflip)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x) if len(self.ops) else x


def choose_device(cpu_img_s: float, workers: int, gpu_img_s: float) -> tuple[str, str]:
    """('gpu' or 'cpu', one line saying why): the CPU path keeps up when its workers (the main process when
    there are none) augment at least as many images per second as the GPU trains."""
    feeders = max(1, workers)
    supply = cpu_img_s * feeders
    where = "gpu" if supply < gpu_img_s else "cpu"
    return where, (f"augmentation on {where}: the cpu path gives {feeders} x {cpu_img_s:.0f} = {supply:.0f} img/s, "
                   f"the GPU trains {gpu_img_s:.0f} img/s without it")
