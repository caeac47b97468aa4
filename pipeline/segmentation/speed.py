"""Measured speed of a segmentation model on this machine: seconds per image of a training step and of validation.

`make auto` plans a segmentation folder's image size, folds and epochs from these numbers. The steps are the
trainer's own (pipeline/segmentation/fit.py: normalised input, mirror flips, the configured loss, AdamW) on real
decoded images and their masks at a candidate size; validation is the per-epoch one (the plain view's maps, then the
post-processed Dice the early stopping monitors). One warm-up batch of each goes untimed (allocations, cuDNN's
algorithm search); the loop around the steps and the checkpoints are what the calibration factor adds.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.segmentation.fit import batches_of, flip_batch, loss_fn, post_processed_dice
from pipeline.segmentation.infer import predict_views
from pipeline.segmentation.models import NORM
from pipeline.training.runtime import Runtime


def measure(model: torch.nn.Module, images: np.ndarray, masks: np.ndarray, batch_size: int, lr: float, loss: str,
            rt: Runtime, steps: int = 3) -> tuple[float, float]:
    """(training, validation) seconds per image over `steps` batches after one warm-up batch of `images` (uint8,
    (N, S, S, 3)) with their `masks` ((N, C, S, S) uint8 0/1); fewer images than (steps + 1) batches are cycled."""
    needed = (steps + 1) * batch_size
    idx = np.arange(needed) % len(images)
    images, masks = np.ascontiguousarray(images[idx]), np.ascontiguousarray(masks[idx])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    criterion = loss_fn(loss)
    generator = torch.Generator().manual_seed(0)

    def train_step(batch: torch.Tensor) -> None:
        rows = batch.numpy()
        x = torch.from_numpy(images[rows]).permute(0, 3, 1, 2)
        y = torch.from_numpy(masks[rows])
        x, y = flip_batch(x, y, torch.rand(len(rows), generator=generator) < 0.5, -1)
        optimizer.zero_grad(set_to_none=True)
        with rt.autocasting():
            logits = model(rt.to_input(x, NORM))
        criterion(logits.float(), rt.to_device(y).float()).backward()
        optimizer.step()

    batches = batches_of(torch.arange(needed), batch_size)
    model.train()
    train_step(batches[0])
    train = _seconds(lambda: [train_step(b) for b in batches[1:]], rt) / (needed - len(batches[0]))

    def validate(rows: slice) -> None:
        probs = predict_views(model, images[rows], ("identity",), batch_size, rt, combined=True)
        post_processed_dice(probs, masks[rows].astype(bool))

    validate(slice(0, batch_size))
    validated = _seconds(lambda: validate(slice(batch_size, needed)), rt) / (needed - batch_size)
    return train, validated


def _seconds(work, rt: Runtime) -> float:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    t0 = time.perf_counter()
    work()
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    return time.perf_counter() - t0
