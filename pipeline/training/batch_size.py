"""train.batch_size=auto for the classification track: real training steps at halving batch sizes, undone after."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.training import runtime
from pipeline.training.runtime import Runtime
from pipeline.training.trainer import FoldData

AUTO_BATCH_START = 1024  # train.batch_size=auto halves from here (or from the training rows when fewer)
AUTO_BATCH_CPU = 64  # and on the CPU, which has no device memory to fill, takes this


def auto_batch_size(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: FoldData, rt: Runtime,
                    say: Callable[[str], None] = print, steps: int = 2, trial: bool | None = None) -> int:
    """train.batch_size=auto: the largest batch whose training steps fit in GPU memory (runtime.find_batch_size).
    The steps are real (forward, backward, optimizer step: AdamW's state counts) and then undone: the model's
    and the optimizer's states are restored, so the run starts from the weights it would have started from.
    `trial` (default: on CUDA) runs the search; off it, the CPU default applies."""
    rows = len(data.train_x)
    if not (rt.device.type == "cuda" if trial is None else trial):
        batch = min(AUTO_BATCH_CPU, rows)
        say(f"train: batch_size auto: {batch} on the cpu (no GPU memory to fill)")
        return batch
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())
    model.train()

    def try_batch(batch: int) -> None:
        idx = np.arange(batch) % rows
        x = rt.to_input(torch.from_numpy(np.array(data.train_x[idx])).permute(0, 3, 1, 2), data.norm)
        y = torch.as_tensor(np.asarray(data.train_y)[idx] % data.n_classes, device=rt.device)
        try:
            for _ in range(steps):
                with rt.autocasting():
                    loss = F.cross_entropy(model(x).float(), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        finally:
            optimizer.zero_grad(set_to_none=True)
            del x, y

    try:
        return runtime.find_batch_size(try_batch, min(AUTO_BATCH_START, rows), say)
    finally:
        model.load_state_dict(weights)
        optimizer.load_state_dict(state)
