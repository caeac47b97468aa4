"""The training masks as one (N, C, S, S) uint8 array at image_size, decoded once and kept in a .npy file beside
the decoded images (pipeline/data/cache.py), so training reads batches of masks like batches of images.

Masks are resized with nearest-neighbour sampling, so a mask stays 0/1 and the image-to-mask pixel grid matches
the images' resize (both map the whole image onto S x S).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.core.artifacts import atomic_write, content_key, file_digest, fingerprint
from pipeline.segmentation.data import PngMasks, SegmentationData


def masks_key(data: SegmentationData, train_csv: Path) -> str:
    """What the masks are made of: train.csv's bytes, the mask files' when they are PNGs, and which training images
    are read (the clean stage may leave unreadable ones out)."""
    files = [p for per_image in data.source.files for p in per_image] if isinstance(data.source, PngMasks) else []
    return fingerprint(file_digest(train_csv), content_key(files) if files else None, data.classes, data.train.ids)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) bool -> (size, size) uint8 0/1, nearest neighbour."""
    if mask.shape == (size, size):
        return mask.astype(np.uint8)
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.NEAREST))


def mask_array(data: SegmentationData, folder: Path, key: str, size: int) -> np.ndarray:
    """(N, C, size, size) uint8 of every training image's masks, read from `folder` when already built for
    `key` (masks_key) at this size."""
    file = Path(folder) / f"masks-{size}px-{fingerprint(key, data.train.ids, size)}.npy"
    if not file.exists():
        file.parent.mkdir(parents=True, exist_ok=True)

        def fill(tmp: Path) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                            shape=(len(data.train), len(data.classes), size, size))
            for i in tqdm(range(len(data.train)), desc="cache: masks", unit="img", disable=None):
                out[i] = np.stack([resize_mask(m, size) for m in data.masks(i)])
            out.flush()

        atomic_write(file, fill)
    return np.load(file, mmap_mode="r")


def presence(masks: np.ndarray) -> np.ndarray:
    """(N, C) bool: which classes each image holds (at image_size)."""
    return np.asarray(masks).reshape(*masks.shape[:2], -1).any(-1)


def presence_strata(held: np.ndarray, n_splits: int) -> np.ndarray:
    """One label per image for stratified folds: its pattern of present classes ('101': the first and third);
    patterns held by fewer images than folds share one label 'rare' (they cannot be spread over every fold), which
    joins the commonest pattern when it is itself that small."""
    patterns = np.array(["".join("1" if v else "0" for v in row) for row in held])
    values, counts = np.unique(patterns, return_counts=True)
    rare = np.isin(patterns, values[counts < n_splits])
    if 0 < rare.sum() < n_splits:
        return np.where(rare, values[np.argmax(counts)], patterns)
    return np.where(rare, "rare", patterns)
