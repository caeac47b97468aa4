"""The training data path alone (no model): images per second that the engine's loader delivers with the
medium preset at 224 px, for 0 (main process), 1, 2, ... persistent workers up to the cores this process may
use, as a ratio against 1 worker measured in the same run (interleaved rounds, benchmarks/timing.py).

It is what `runtime.num_workers` buys: the goal is >= 1.7x from 1 to 2 workers on 2 free cores. The loader is
built as the Trainer builds it (pipeline/training/feeding.py: ArrayDataset, EpochSampler, loader), so the per-batch
reseeding and the worker start-up policy are the ones training uses.

    nice .venv/bin/python benchmarks/data_path.py [--size 224] [--images 1024] [--batch 64] [--preset medium]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from timing import interleaved, median, ratio_text
from torch.utils.data import DataLoader

from pipeline.core.config import TrainConfig
from pipeline.training import feeding
from pipeline.training.augment import train_transform
from pipeline.training.feeding import ArrayDataset, EpochSampler
from pipeline.training.runtime import Runtime


def loader(images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, workers: int) -> DataLoader:
    dataset = ArrayDataset(images, labels, train_transform(cfg, 0))
    return feeding.loader(dataset, cfg.batch_size, EpochSampler(len(images), 0), True, 0, Runtime(num_workers=workers))


def epoch_img_s(data: DataLoader) -> float:
    t0 = time.perf_counter()
    seen = sum(len(y) for _, y in data)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--preset", default="medium", choices=["none", "light", "medium", "heavy"])
    parser.add_argument("--max-workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians and spreads)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only collects batches here
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (args.images, args.size, args.size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images)
    cfg = TrainConfig(augment=args.preset, image_size=args.size, batch_size=args.batch)
    counts = list(range(0, args.max_workers + 1))
    loaders = {w: loader(images, labels, cfg, w) for w in counts}
    for data in loaders.values():  # untimed: starts the persistent workers, warms the caches
        epoch_img_s(data)
    speeds = interleaved({w: (lambda d=d: epoch_img_s(d)) for w, d in loaders.items()}, args.repeats,
                         measure=lambda fn: fn())
    print(f"data path: {args.preset} preset at {args.size} px, batch {args.batch}, {args.images} images, "
          f"{len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.1f}")
    for w in counts:
        name = "main process" if w == 0 else f"{w} worker{'s' if w > 1 else ''}"
        print(f"  {name:14s} {median(speeds[w]):7.0f} img/s  {ratio_text(speeds[w], speeds[1])} 1 worker")


if __name__ == "__main__":
    main()
