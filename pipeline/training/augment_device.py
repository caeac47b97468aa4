"""Where the training augmentation runs (train.augment_device): albumentations per image in the loader, or the
preset batched on the training device (gpu_augment.DeviceAugment). `auto` measures both sides on the run's own
images and network: the CPU path's images per second against the device's training speed without augmentation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.core.config import TrainConfig
from pipeline.core.errors import PipelineError
from pipeline.training.gpu_augment import DeviceAugment, choose_device
from pipeline.training.runtime import Runtime


def device_augment(cfg: TrainConfig, rt: Runtime, transform, model: torch.nn.Module, images: np.ndarray, norm: dict,
                   say: Callable[[str], None]) -> DeviceAugment | None:
    """The preset batched on the training device (train.augment_device gpu, or auto when measured faster),
    else None (albumentations `transform` in the loader). `say` prints auto's choice and why."""
    where = cfg.augment_device
    if where == "auto":
        where = "cpu"
        if rt.device.type == "cuda" and cfg.augment != "none" and not cfg.transforms:
            where, line = choose_device(cpu_augment_img_s(transform, images), rt.num_workers,
                                        gpu_train_img_s(model, images, norm, rt, min(cfg.batch_size, len(images))))
            say(line)
    if where == "cpu" or cfg.augment == "none":
        return None
    if cfg.transforms:
        raise PipelineError("train.augment_device=gpu: train.transforms are albumentations transforms (per image, "
                            "cpu only); set train.augment_device=cpu or move them into a preset")
    return DeviceAugment(cfg.augment, cfg.image_size, cfg.hflip).to(rt.device)


def cpu_augment_img_s(transform, images: np.ndarray, n: int = 64) -> float:
    """Images per second of the albumentations `transform` on one core (the main process), over n of `images`."""
    images = images[:n]
    t0 = time.perf_counter()
    for img in images:
        transform(image=np.array(img))
    return len(images) / max(time.perf_counter() - t0, 1e-9)


def gpu_train_img_s(model: torch.nn.Module, images: np.ndarray, norm: dict, rt: Runtime, batch: int,
                    steps: int = 3) -> float:
    """Images per second of forward + backward passes at `batch` on the device, without augmentation, on a copy
    of the network (the model's weights and normalisation statistics stay as they are)."""
    copied = copy.deepcopy(model).train()
    x = rt.to_input(torch.from_numpy(np.array(images[:batch])).permute(0, 3, 1, 2), norm)
    seconds = []
    for _ in range(steps + 1):  # the first is a warm-up: cudnn's algorithm search, the allocator
        t0 = time.perf_counter()
        with rt.autocasting():
            copied(x).float().mean().backward()
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        seconds.append(time.perf_counter() - t0)
    return batch * steps / max(sum(seconds[1:]), 1e-9)
