"""Kaggle run-length encoding at 1024x1024: pipeline.segmentation.rle vs the plain loops, same run.

Random blob masks (discs and rectangles, the connected shapes real masks hold; 12 per mask, about a third
of the pixels). Encode: the vectorised `encode` (one np.diff over the flattened mask) vs a loop with one
Python step per pixel. Decode: the vectorised `decode` (string checked, then a cumulative sum of run marks)
vs a loop with one step per pixel of each run, and vs the run-by-run slice assignment most Kaggle kernels
use (which checks nothing). All must agree; prints medians and the median ratio (and its spread) over
interleaved rounds.

    .venv/bin/python benchmarks/rle.py [--repeats 7] [--size 1024] [--masks 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from timing import interleaved, median, ratio_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the reference loops live with the tests

from pipeline.segmentation.rle import decode, encode  # noqa: E402
from tests.segmentation_reference import blobs, kernel_decode, loop_decode, loop_encode  # noqa: E402


def report(what: str, t: dict[str, list[float]], base: str, fast: str, n: int) -> None:
    print(f"{what}, {n} masks: {base} {median(t[base]) / n * 1000:.2f} ms, {fast} {median(t[fast]) / n * 1000:.3f} ms "
          f"per mask (medians); {base}/{fast} {ratio_text(t[base], t[fast], 1)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="masks are size x size")
    parser.add_argument("--masks", type=int, default=4, help="masks per round (each side encodes/decodes all)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.size, args.size)
    masks = [blobs(rng, shape, 12) for _ in range(args.masks)]
    rles = [encode(m) for m in masks]
    for m, rle in zip(masks, rles, strict=True):
        assert rle == loop_encode(m), "encode disagrees with the loop"
        assert np.array_equal(decode(rle, shape), m) and np.array_equal(loop_decode(rle, shape), m)
        assert np.array_equal(kernel_decode(rle, shape), m), "decode disagrees with the kernels' decoder"
    runs = np.mean([len(r.split()) // 2 for r in rles])
    print(f"{args.masks} random blob masks {args.size}x{args.size}: {np.mean(masks):.1%} foreground, "
          f"{runs:.0f} runs each on average; {args.repeats} interleaved rounds")

    t = interleaved({"loop": lambda: [loop_encode(m) for m in masks],
                     "vectorised": lambda: [encode(m) for m in masks]}, args.repeats)
    report("encode", t, "loop", "vectorised", args.masks)
    t = interleaved({"loop": lambda: [loop_decode(r, shape) for r in rles],
                     "kernel": lambda: [kernel_decode(r, shape) for r in rles],
                     "vectorised": lambda: [decode(r, shape) for r in rles]}, args.repeats)
    report("decode", t, "loop", "vectorised", args.masks)
    report("decode", t, "kernel", "vectorised", args.masks)


if __name__ == "__main__":
    main()
