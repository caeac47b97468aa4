"""The augmentation presets on the device, batched: one uint8 batch goes to the GPU and every operation runs
on the whole batch at once, with its own random parameters per image (as albumentations draws them per image).

The operations and their parameters are training/augment.py's PRESETS, read by both builders. Every operation is
written here on torch alone, and on purpose none of them reads a tensor back to the host: a read-back (`.item()`,
a boolean index, a copy of parameters drawn on the CPU) makes the host wait until the GPU's queue is empty, and
the GPU then idles while the host prepares the next kernels. That rules out kornia.augmentation (its generators draw
on the CPU and copy the draws over; its random resized crop reads the boxes back: several host waits per batch,
counted by benchmarks/gpu.py, figures in docs/benchmarks.md); torchvision.transforms.v2 draws one parameter set per
call (the whole batch would flip together), so it cannot serve either. Here:

- flips and per-image choices are torch.where masks; parameters are drawn with torch.rand on the batch's device;
- the random resized crop (torchvision's and albumentations' ten tries, vectorised) and the affine moves are one
  bilinear grid_sample each, zeros outside, pixel centres as cv2 places them;
- brightness/contrast is albumentations' x * (1 + c) + b clipped once, gamma x ** g, the Gaussian blur a
  separable convolution with each image's own kernel (reflected borders, as cv2's default);
- coarse dropout cuts 1-4 holes per image, each of its own size, in one broadcast comparison.

A test runs every preset on the "meta" device, where any read-back or CPU-made tensor fails.

Images are float in [0, 1] here (x / 255); pipeline/training/runtime.py normalises afterwards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.training.augment import preset_ops


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


def _choose(p: float, changed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each image changed with probability p, else left as it was (a mask, no host read-back)."""
    if p >= 1:
        return changed
    on = _applied(len(x), p, x.device).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(on, changed, x)


def _warp(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Every output pixel p (x, y; pixel centres at integers) sampled at the source point a @ p + b, per image
    (a: n x 2 x 2, b: n x 2): bilinear, zeros outside, one grid_sample for the batch."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    points = torch.stack([xs, ys], -1).view(1, h * w, 2)
    src = points @ a.transpose(1, 2) + b[:, None, :]
    # grid_sample's units with align_corners=False (sides as Python numbers: a tensor made from host values
    # would be a copy that waits for the GPU)
    grid = torch.stack([(src[..., 0] + 0.5) / w * 2 - 1, (src[..., 1] + 0.5) / h * 2 - 1], -1).view(n, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class HorizontalFlip(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _choose(self.p, x.flip(-1), x)


class ResizedCrop(nn.Module):
    """albumentations' (torchvision's) RandomResizedCrop to the image's own size: up to ten draws of an area in
    `scale` and an aspect ratio in [3/4, 4/3] (log-uniform), the first that fits; none fits: the whole image (its
    ratio clamped). All ten are drawn for every image at once and the first fitting one picked by argmax."""

    TRIES = 10

    def __init__(self, scale: tuple[float, float], p: float, ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        super().__init__()
        self.scale, self.p, self.ratio = scale, p, ratio

    def boxes(self, n: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(n, 4) crop boxes: top, left, height, width in pixels."""
        area = _uniform(n * self.TRIES, *self.scale, device).view(n, self.TRIES) * (h * w)
        ratio = torch.exp(_uniform(n * self.TRIES, *map(math.log, self.ratio), device).view(n, self.TRIES))
        cw, ch = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
        fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = fits.float().argmax(1, keepdim=True)  # the first fitting try (0 when none fits)
        cw, ch, found = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0], fits.any(1)
        fw, fh = w, h  # none fits: the whole image, cut to the nearest allowed aspect ratio
        if w / h < self.ratio[0]:
            fh = round(w / self.ratio[0])
        elif w / h > self.ratio[1]:
            fw = round(h * self.ratio[1])
        cw, ch = torch.where(found, cw, float(fw)), torch.where(found, ch, float(fh))
        top = torch.where(found, torch.floor(torch.rand(n, device=device) * (h - ch + 1)), float((h - fh) // 2))
        left = torch.where(found, torch.floor(torch.rand(n, device=device) * (w - cw + 1)), float((w - fw) // 2))
        return torch.stack([top, left, ch, cw], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        top, left, ch, cw = self.boxes(n, h, w, x.device).to(x.dtype).unbind(1)
        a = torch.diag_embed(torch.stack([cw / w, ch / h], 1))  # output pixel -> crop pixel (cv2.resize's centres)
        b = torch.stack([left + 0.5 * cw / w - 0.5, top + 0.5 * ch / h - 0.5], 1)
        return _choose(self.p, _warp(x, a, b), x)


class Affine(nn.Module):
    """albumentations' Affine about the image centre: x and y scales drawn separately, translation as a fraction
    of each side, rotation and x-shear in degrees; zeros where the moved image leaves the frame."""

    def __init__(self, scale: tuple[float, float], translate: float, rotate: float, shear: float, p: float):
        super().__init__()
        self.scale, self.translate, self.rotate, self.shear, self.p = scale, translate, rotate, shear, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        dev, dtype = x.device, x.dtype
        sx, sy = _uniform(n, *self.scale, dev), _uniform(n, *self.scale, dev)
        angle = torch.deg2rad(_uniform(n, -self.rotate, self.rotate, dev))
        shear = torch.tan(torch.deg2rad(_uniform(n, -self.shear, self.shear, dev)))
        shift = torch.stack([_uniform(n, -self.translate, self.translate, dev) * w,
                             _uniform(n, -self.translate, self.translate, dev) * h], 1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # forward map m = rotation @ x-shear @ scale; the warp needs its inverse (2 x 2, written out: no solver
        # that checks for singular input on the host)
        m00, m01 = cos * sx, (cos * shear - sin) * sy
        m10, m11 = sin * sx, (sin * shear + cos) * sy
        det = m00 * m11 - m01 * m10
        a = torch.stack([torch.stack([m11, -m01], 1), torch.stack([-m10, m00], 1)], 1) / det.view(n, 1, 1)
        cx, cy = (w - 1) / 2, (h - 1) / 2  # source = a @ (output - centre - shift) + centre
        mx, my = shift[:, 0] + cx, shift[:, 1] + cy
        b = torch.stack([cx - (a[:, 0, 0] * mx + a[:, 0, 1] * my), cy - (a[:, 1, 0] * mx + a[:, 1, 1] * my)], 1)
        return _choose(self.p, _warp(x, a.to(dtype), b.to(dtype)), x)


class Gamma(nn.Module):
    """albumentations' RandomGamma: x ** g, g uniform in `gamma` per image."""

    def __init__(self, gamma: tuple[float, float], p: float):
        super().__init__()
        self.gamma, self.p = gamma, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = _uniform(len(x), *self.gamma, x.device).view(-1, 1, 1, 1)
        return _choose(self.p, x.clamp(min=0) ** g, x)


class GaussianBlur(nn.Module):
    """albumentations' GaussianBlur with sigma uniform in `sigma` per image: a separable convolution whose kernel
    (side fixed by the largest sigma, as albumentations sizes it: int(3.5 s) * 2 + 1) is each image's own;
    reflected borders (cv2's BORDER_REFLECT_101)."""

    def __init__(self, sigma: tuple[float, float], size: int, p: float):
        super().__init__()
        self.sigma, self.p = sigma, p
        self.side = min(int(3.5 * sigma[1]) * 2 + 1, 2 * size - 1)  # reflection needs the pad under the side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        r = self.side // 2
        sigma = _uniform(n, *self.sigma, x.device).view(n, 1)
        taps = torch.arange(self.side, device=x.device, dtype=x.dtype) - r
        kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one per image and channel
        out = F.pad(x, (r, r, r, r), mode="reflect").reshape(1, n * c, h + 2 * r, w + 2 * r)
        out = F.conv2d(out, kernel.view(n * c, 1, 1, self.side), groups=n * c)
        out = F.conv2d(out, kernel.view(n * c, 1, self.side, 1), groups=n * c)
        return _choose(self.p, out.view(n, c, h, w), x)


def _module(op: str, a: dict, size: int) -> nn.Module:
    if op == "hflip":
        return HorizontalFlip(a["p"])
    if op == "crop":
        return ResizedCrop(a["scale"], a["p"])
    if op == "affine":
        return Affine(a["scale"], a["translate"], a["rotate"], a["shear"], a["p"])
    if op == "brightness_contrast":
        return BrightnessContrast(a["brightness"], a["contrast"], a["p"])
    if op == "gamma":
        return Gamma(a["gamma"], a["p"])
    if op == "blur":
        return GaussianBlur(a["sigma"], size, a["p"])
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
