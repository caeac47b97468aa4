"""Measured speed of a backbone on this machine: seconds per image of a training step and of a prediction step.

`make auto` plans epochs and members from these numbers rather than from a table of guesses: the same network is
ten times faster on one machine than another, and a 28 px image costs a fraction of a 224 px one. A few real steps
(forward, backward, AdamW) on random images at the candidate size and batch are timed after a warm-up step; the
data loading, augmentation and validation around them are what the auto driver's calibration factor adds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pipeline.training.models import build_model
from pipeline.training.runtime import Runtime


@dataclass(frozen=True)
class Speed:
    """Seconds per image of one training step (forward, backward, optimizer) and of one prediction step."""

    train: float
    predict: float


def measure(backbone: str, image_size: int, channels: int, n_out: int, batch_size: int, rt: Runtime,
            steps: int = 2) -> Speed:
    """Time `steps` training steps and `steps` prediction steps of `backbone` after one warm-up step of each."""
    torch.manual_seed(0)
    model = rt.prepare(build_model(backbone, n_out, channels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = rt.to_device(torch.randn(batch_size, channels, image_size, image_size))
    y = rt.to_device(torch.randint(0, max(n_out, 1), (batch_size,)))
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with rt.autocasting():
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        optimizer.step()

    def predict_step():
        with torch.no_grad(), rt.autocasting():
            model(x)

    model.train()
    train = _timed(train_step, steps, rt.device) / batch_size
    model.eval()
    predict = _timed(predict_step, steps, rt.device) / batch_size
    return Speed(train, predict)


def _timed(step, steps: int, device: torch.device) -> float:
    """Median seconds of one call of `step`, after one untimed call (allocations, cuDNN's algorithm search)."""
    step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
