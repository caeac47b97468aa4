"""Batched TTA (all views of a batch in one forward pass) vs a view-by-view loop, same run.

Both paths compute the same logits (tests/test_tta.py checks equality); the batched one stacks the
views along the batch axis, so the network runs once per batch instead of once per view per batch.
Prints both median times and the median ratio with its spread over interleaved rounds. Not a test:
run it by hand.

    .venv/bin/python benchmarks/tta.py [--model resnet18] [--size 32] [--images 512] [--batch 32] [--device cuda]
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np
import torch
from timing import interleaved, median, ratio_text, seconds

from pipeline.training.models import build_model
from pipeline.training.runtime import Runtime
from pipeline.training.tta import tta_logits

VIEWS = ["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "random0", "random1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="images per batch (the batched path runs batch x views)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median ratio and spread)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    # the memory format prediction uses (autocast off: fp32 views)
    rt = Runtime(device, channels_last=device.type == "cuda")
    model = rt.prepare(build_model(args.model, 10, 3).eval())
    images = np.random.default_rng(0).integers(0, 255, (args.images, args.size, args.size, 3), dtype=np.uint8)
    prep = partial(rt.to_input, norm={"mean": [0.5] * 3, "std": [0.25] * 3})

    def batched():
        return tta_logits(model, images, VIEWS, prep, args.batch)

    def one_view_at_a_time():
        return np.stack([tta_logits(model, images, [v], prep, args.batch)[0] for v in VIEWS])

    outputs = {"view-by-view loop": one_view_at_a_time(), "batched": batched()}  # also warms both paths up
    np.testing.assert_allclose(outputs["batched"], outputs["view-by-view loop"],
                               atol=1e-4 if device.type == "cpu" else 1e-2)  # cuda kernels depend on the batch size
    times = interleaved({"loop": one_view_at_a_time, "batched": batched}, args.repeats,
                        measure=lambda fn: synced_seconds(fn, device))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{args.model} {args.size}px, {args.images} images, {len(VIEWS)} views, batch {args.batch}, "
          f"{where}: view-by-view {median(times['loop']):.3f} s, batched {median(times['batched']):.3f} s (medians), "
          f"ratio {ratio_text(times['loop'], times['batched'])}")


def synced_seconds(fn, device: torch.device) -> float:
    """Wall time of fn() with the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seconds(lambda: (fn(), torch.cuda.synchronize() if device.type == "cuda" else None))


if __name__ == "__main__":
    main()
