"""Plain-loop run-length encoding, written straight from Kaggle's definition: the yardstick that
tests/test_segmentation_rle.py checks pipeline.segmentation.rle against and benchmarks/rle.py times it against.

One Python step per pixel, no numpy tricks: column by column, top to bottom, counting pixels from 1; and the
run-by-run decoder of the Kaggle kernels (`kernel_decode`) for a second, harder yardstick.
"""

from __future__ import annotations

import numpy as np


def loop_encode(mask: np.ndarray) -> str:
    pixels = np.asarray(mask).ravel(order="F").tolist()  # column by column, top to bottom
    pairs: list[int] = []
    run_start = 0
    for pixel, value in enumerate(pixels, start=1):
        if value:
            if run_start == 0:
                run_start = pixel
        elif run_start:
            pairs += [run_start, pixel - run_start]
            run_start = 0
    if run_start:
        pairs += [run_start, len(pixels) + 1 - run_start]
    return " ".join(str(v) for v in pairs)


def loop_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    height, width = shape
    pixels = [False] * (height * width)
    tokens = [int(t) for t in rle.split()]
    for start, length in zip(tokens[0::2], tokens[1::2], strict=True):
        for pixel in range(start - 1, start - 1 + length):
            pixels[pixel] = True
    return np.array(pixels, dtype=bool).reshape((height, width), order="F")


def kernel_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """The decoder most Kaggle kernels share: a loop over runs, one slice assignment each."""
    tokens = rle.split()
    starts, lengths = (np.asarray(x, dtype=int) for x in (tokens[0::2], tokens[1::2]))
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    for lo, hi in zip(starts - 1, starts - 1 + lengths, strict=True):
        flat[lo:hi] = True
    return flat.reshape(shape, order="F")


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
