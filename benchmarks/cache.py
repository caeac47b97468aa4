"""Decoded-image cache vs decoding files every epoch.

Writes N generated JPEGs (default 2,000 at 256x256) to a temporary folder, then times one epoch of
reading them at 64x64 two ways, in the same run: the plain baseline decodes and resizes every file
(what a Dataset over file paths does each epoch); the cache reads the rows of the uint8 array that
`pipeline.cache` builds once. Prints both times and the ratio. Not a test: run it by hand.

    .venv/bin/python benchmarks/cache.py [N]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.images import load_image, resize, to_channels


def main(n: int = 2000, size: int = 64) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n):
            base = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            im = Image.fromarray(base).resize((256, 256), Image.BILINEAR)
            path = Path(tmp) / f"{i}.jpg"
            im.save(path, quality=90)
            paths.append(path)
        t0 = time.perf_counter()
        epoch = [resize(to_channels(load_image(p), 3), size) for p in paths]
        plain = time.perf_counter() - t0
        cache = np.stack(epoch)  # what pipeline.cache stores once
        t0 = time.perf_counter()
        for i in rng.permutation(n):
            np.ascontiguousarray(cache[i])
        cached = time.perf_counter() - t0
    print(f"{n} images, one epoch at {size}x{size}: decode every epoch {plain:.3f} s, cached array {cached:.4f} s, "
          f"ratio {plain / cached:.0f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
