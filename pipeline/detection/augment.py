"""Box-aware training augmentation: albumentations with BboxParams, plus its Mosaic.

Each training image goes through one albumentations Compose: Mosaic (the image and three others
drawn from the training set, placed on a 2x2 grid at their own scale and cropped to the image size,
as the Global Wheat winners trained), RandomResizedCrop, Affine scale and shift, flips and colour
jitter. BboxParams keeps the boxes with the pixels: clipped to the image and dropped when less
than `min_visibility` of a box stays visible. Boxes stay in albumentations' normalised
(x1, y1, x2, y2) form, which is the form the targets are in. The batch is re-padded to its fullest
image (a mosaic can hold four images' boxes).
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch


@dataclass(frozen=True)
class BoxAugmentSettings:
    hflip: bool = True
    vflip: bool = False
    crop_scale: float | None = None  # RandomResizedCrop keeps this share of the area at least; None: off
    scale: float = 0.0  # Affine zoom in [1 - scale, 1 + scale]
    shift: float = 0.0  # Affine shift up to this share of the side
    colour: float = 0.0  # ColorJitter brightness/contrast/saturation strength (hue a quarter of it)
    mosaic: float = 0.0  # probability of a 4-image mosaic
    min_visibility: float = 0.3  # boxes less visible than this after a crop are dropped

    @property
    def active(self) -> bool:
        """Anything beyond the plain horizontal flip the trainer does on tensors."""
        return bool(self.vflip or self.crop_scale or self.scale or self.shift or self.colour or self.mosaic)


def _params(s: BoxAugmentSettings, fields: list[str]) -> A.BboxParams:
    return A.BboxParams(format="albumentations", label_fields=fields, min_visibility=s.min_visibility,
                        clip=True, filter_invalid_bboxes=True)


def compose(s: BoxAugmentSettings, size: int, seed: int = 0) -> tuple[A.Compose | None, A.Compose | None]:
    """(mosaic, the rest). Mosaic runs alone because albumentations' Mosaic does not apply min_visibility
    to the boxes it crops (measured: boxes 2% visible stay); each box carries its area through it
    ("areas") and BoxAugment drops the ones below min_visibility. Cells are image-sized, so the
    images keep their scale and the area ratio is the visible fraction."""
    mosaic = None
    if s.mosaic:
        mosaic = A.Compose([A.Mosaic(grid_yx=(2, 2), target_size=(size, size), cell_shape=(size, size),
                                     center_range=(0.3, 0.7), fit_mode="cover", p=s.mosaic)],
                           bbox_params=_params(s, ["labels", "areas"]), seed=seed)
    transforms = []
    if s.crop_scale:
        transforms.append(A.RandomResizedCrop(size=(size, size), scale=(s.crop_scale, 1.0), p=0.5))
    if s.scale or s.shift:
        transforms.append(A.Affine(scale=(1 - s.scale, 1 + s.scale), translate_percent=(-s.shift, s.shift), p=0.5))
    if s.hflip:
        transforms.append(A.HorizontalFlip(p=0.5))
    if s.vflip:
        transforms.append(A.VerticalFlip(p=0.5))
    if s.colour:
        transforms.append(A.ColorJitter(brightness=s.colour, contrast=s.colour, saturation=s.colour,
                                        hue=s.colour / 4, p=0.8))
    return mosaic, A.Compose(transforms, bbox_params=_params(s, ["labels"]), seed=seed + 1) if transforms else None


def _item(images: np.ndarray, labels: np.ndarray, i: int) -> dict:
    rows = labels[i][labels[i, :, 0] >= 0]
    areas = (rows[:, 3] - rows[:, 1]) * (rows[:, 4] - rows[:, 2])
    return {"image": images[i], "bboxes": rows[:, 1:].astype(np.float32), "labels": rows[:, 0].astype(np.int64),
            "areas": areas.astype(np.float64)}


def pad(rows: list[np.ndarray]) -> torch.Tensor:
    """(B, G, 5) targets from per-image (n, 5) rows, padded with class -1 to the fullest image (G >= 1)."""
    out = torch.full((len(rows), max([1] + [len(r) for r in rows]), 5), -1.0)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.float32).reshape(-1, 5)
    return out


class BoxAugment:
    """Augments batches of the in-memory training images (uint8 (N, 3, S, S), targets (N, G, 5))."""

    def __init__(self, settings: BoxAugmentSettings, images: torch.Tensor, labels: torch.Tensor, seed: int = 0):
        self.images = images.permute(0, 2, 3, 1).numpy()  # HWC views for albumentations, no copy
        self.labels = labels.numpy()
        self.settings = settings
        self.mosaic, self.transform = compose(settings, images.shape[-1], seed)
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        """Same seed, same augmented epoch (exact resume)."""
        if self.transform is not None:
            self.transform.set_random_seed(seed + 1)
        if self.mosaic is not None:
            self.mosaic.set_random_seed(seed)
        self.rng = np.random.default_rng(seed)

    def one(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """One augmented image (H, W, 3) and its rows [class, x1, y1, x2, y2]."""
        item = _item(self.images, self.labels, i)
        if self.mosaic is not None:
            n = len(self.images) - 1  # three other images (with repeats only when there are not three)
            others = self.rng.choice(n, size=3, replace=n < 3) if n else np.zeros(3, dtype=np.int64)
            others = others + (others >= i) if n else others
            item["mosaic_metadata"] = [_item(self.images, self.labels, int(j)) for j in others]
            out = self.mosaic(**item)
            boxes = np.asarray(out["bboxes"], dtype=np.float64).reshape(-1, 4)
            seen = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            keep = seen >= self.settings.min_visibility * np.asarray(out["areas"], dtype=np.float64) - 1e-9
            item = {"image": out["image"], "bboxes": boxes[keep].astype(np.float32),
                    "labels": np.asarray(out["labels"], dtype=np.int64)[keep]}
        else:
            item.pop("areas")
        out = self.transform(**item) if self.transform is not None else item
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        rows = np.column_stack([np.asarray(out["labels"], dtype=np.float32).reshape(-1), boxes])
        return np.ascontiguousarray(out["image"]), rows

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        done = [self.one(int(i)) for i in idx]
        images = torch.from_numpy(np.stack([im for im, _ in done])).permute(0, 3, 1, 2).contiguous()
        return images, pad([rows for _, rows in done])
