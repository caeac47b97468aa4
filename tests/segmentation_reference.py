"""Plain-loop run-length encoding, written straight from Kaggle's definition: the yardstick that
tests/test_segmentation_rle.py checks pipeline.segmentation.rle against and benchmarks/rle.py times it against.

One Python step per pixel, no numpy tricks: column by column, top to bottom, counting pixels from 1.
"""

from __future__ import annotations

import numpy as np


def loop_encode(mask: np.ndarray) -> str:
    height, width = mask.shape
    pairs: list[int] = []
    run_start, pixel = 0, 0
    for x in range(width):
        for y in range(height):
            pixel += 1
            if mask[y, x]:
                if run_start == 0:
                    run_start = pixel
            elif run_start:
                pairs += [run_start, pixel - run_start]
                run_start = 0
    if run_start:
        pairs += [run_start, pixel + 1 - run_start]
    return " ".join(str(v) for v in pairs)


def loop_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    height, width = shape
    mask = np.zeros(shape, dtype=bool)
    tokens = [int(t) for t in rle.split()]
    for start, length in zip(tokens[0::2], tokens[1::2], strict=True):
        for pixel in range(start - 1, start - 1 + length):
            mask[pixel % height, pixel // height] = True
    return mask


def blobs(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """A bool mask of n random discs and rectangles: the connected shapes masks usually hold."""
    height, width = shape
    yy, xx = np.ogrid[:height, :width]
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        r = rng.integers(1, max(2, min(shape) // 6))
        if rng.random() < 0.5:
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            mask[max(0, cy - r):cy + r, max(0, cx - 2 * r):cx + r] = True
    return mask
