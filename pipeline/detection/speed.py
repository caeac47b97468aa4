"""Measured speed of a detector on this machine: seconds per image of a training step and of validation.

`make auto` plans a detection folder's epochs and folds from these numbers. The steps are the detector's own (its
losses, backward, SGD with momentum as DetectionTrainer's) on real decoded images and their boxes at the planned
size; validation is the per-epoch one (candidates, NMS, mAP). One warm-up batch of each goes untimed (allocations,
cuDNN's algorithm search); augmentation, checkpoints and the loop around them are what the calibration factor adds.
"""

from __future__ import annotations

import time

import torch

from pipeline.core.config import DecodeConfig
from pipeline.detection.fit import evaluate
from pipeline.detection.torchvision_models import TorchvisionDetector
from pipeline.training.runtime import Runtime


def measure(model: TorchvisionDetector, images: torch.Tensor, targets: torch.Tensor, sizes: torch.Tensor,
            batch_size: int, lr: float, rt: Runtime, steps: int = 3) -> tuple[float, float]:
    """(training, validation) seconds per image over `steps` batches after one warm-up batch of `images` (uint8,
    (N, 3, S, S)) with their `targets` ((N, G, 5)) and pixel `sizes`; fewer images than (steps + 1) batches are
    cycled."""
    needed = (steps + 1) * batch_size
    idx = torch.arange(needed) % len(images)
    images, targets, sizes = images[idx], targets[idx], sizes[idx]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batches = torch.arange(needed).split(batch_size)

    def train_step(batch: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = sum(model.losses(images[batch], targets[batch], rt).values())
        loss.backward()
        optimizer.step()

    model.train()
    train_step(batches[0])
    train = _seconds(lambda: [train_step(b) for b in batches[1:]], rt) / (needed - batch_size)
    decode = DecodeConfig()
    evaluate(model, decode, rt, images[:batch_size], targets[:batch_size], sizes[:batch_size], batch_size, 0.01)
    rest = slice(batch_size, needed)
    validate = _seconds(lambda: evaluate(model, decode, rt, images[rest], targets[rest], sizes[rest], batch_size,
                                         0.01), rt) / (needed - batch_size)
    return train, validate


def _seconds(work, rt: Runtime) -> float:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    t0 = time.perf_counter()
    work()
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    return time.perf_counter() - t0
