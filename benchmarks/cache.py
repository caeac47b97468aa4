"""Decoded-image cache vs decoding files every epoch.

Writes N generated JPEGs (default 2,000 at 256x256) to a temporary folder, then times one epoch of
reading them at 64x64 two ways, in the same run: the plain baseline decodes and resizes every file
(what a Dataset over file paths does each epoch); the cache reads the rows of the uint8 array that
`pipeline.data.cache` builds once. Prints the median times and the median ratio with its spread over
interleaved rounds. Not a test: run it by hand.

    .venv/bin/python benchmarks/cache.py [N]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from timing import interleaved, median, ratio_text

from pipeline.data.images import load_image, resize, to_channels


def main(n: int = 2000, size: int = 64, repeats: int = 5) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n):
            base = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            im = Image.fromarray(base).resize((256, 256), Image.BILINEAR)
            path = Path(tmp) / f"{i}.jpg"
            im.save(path, quality=90)
            paths.append(path)
        # what pipeline.data.cache stores once
        cache = np.stack([resize(to_channels(load_image(p), 3), size) for p in paths])
        order = rng.permutation(n)
        times = interleaved({"decode": lambda: [resize(to_channels(load_image(p), 3), size) for p in paths],
                             "cached": lambda: [np.ascontiguousarray(cache[i]) for i in order]}, repeats)
    print(f"{n} images, one epoch at {size}x{size}: decode every epoch {median(times['decode']):.3f} s, cached array "
          f"{median(times['cached']):.4f} s (medians), ratio {ratio_text(times['decode'], times['cached'], 0)}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
