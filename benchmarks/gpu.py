"""GPU checks in one run (needs CUDA): training throughput of the engine against a plain loop, per
precision and memory format, and torch.compile. All numbers come from the same process and card.

Rows: the plain baseline (a bare fp32 NCHW loop), the bare loop with bf16 autocast + channels_last,
then the engine as train.py configures it on cuda (channels_last, pinned memory) in fp32, bf16 and
fp16 (grad scaler), and bf16 + torch.compile. Ratios are against the plain baseline; "engine/bare"
compares the engine with the bare loop at the same settings (the overhead of the engine). Every row
runs once per interleaved round; printed are medians and the spread of the per-round ratios.

    python benchmarks/gpu.py [--model resnet18] [--size 224] [--images 4096] [--batch 128]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from timing import interleaved, median, ratio_text
from train_throughput import bare_epoch, engine_epoch

CUDA = torch.device("cuda")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every row (medians and spreads)")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (args.images, args.size, args.size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images)
    run = (args.model, images, labels, args.batch)
    bare_epoch(*run, device=CUDA)  # warm-up: context, cudnn autotuning
    bare_epoch(*run, device=CUDA, amp="bfloat16", channels_last=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model} {args.size}px, "
          f"batch {args.batch}, {args.images} images")
    runs = {"bare fp32 NCHW (baseline)": lambda: bare_epoch(*run, device=CUDA),
            "bare bf16 channels_last": lambda: bare_epoch(*run, device=CUDA, amp="bfloat16", channels_last=True),
            "engine fp32 channels_last": lambda: engine_epoch(*run, device=CUDA, warm=True),
            "engine bf16 channels_last": lambda: engine_epoch(*run, device=CUDA, amp="bfloat16", warm=True),
            "engine fp16 channels_last + scaler": lambda: engine_epoch(*run, device=CUDA, amp="float16", warm=True)}
    if not args.no_compile:
        runs["engine bf16 channels_last compiled"] = lambda: engine_epoch(*run, device=CUDA, amp="bfloat16",
                                                                          compile=True)
    speeds = interleaved(runs, args.repeats, measure=lambda fn: fn())  # each call returns its own img/s
    base = speeds["bare fp32 NCHW (baseline)"]
    for name, values in speeds.items():
        print(f"  {name:38s} {median(values):8.0f} img/s (median)  {ratio_text(values, base)} baseline", flush=True)
    print(f"  engine/bare at bf16 channels_last: "
          f"{ratio_text(speeds['engine bf16 channels_last'], speeds['bare bf16 channels_last'])}")


if __name__ == "__main__":
    main()
