"""The runtime policy of both tracks, for training and prediction alike: device, autocast, memory format,
input scaling, torch.compile, CPU threads and loader workers.

One `Runtime` is resolved from the `runtime` config section and handed to the training loop, the
validation pass and the predict stages, so what runs on the GPU at prediction time is what ran in
training (bf16 autocast and channels_last on CUDA by default). Autocast is used on CUDA only: on
the CPU the config's `amp` is ignored, which keeps CPU runs exact and reproducible.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.core.config import RuntimeConfig
from pipeline.core.errors import PipelineError
from pipeline.training import distributed

Track = Literal["classification", "detection", "segmentation"]


@dataclass(frozen=True)
class Runtime:
    """Resolved decisions; the defaults are a plain fp32 CPU run."""

    device: torch.device = torch.device("cpu")
    autocast: bool = False
    amp_dtype: torch.dtype = torch.bfloat16
    channels_last: bool = False
    compile: bool = False
    num_workers: int = 0
    eval_batch_factor: int = 2

    @property
    def grad_scaler(self) -> bool:
        """float16 autocast needs loss scaling (bfloat16 has float32's range and does not)."""
        return self.autocast and self.amp_dtype == torch.float16

    def autocasting(self) -> contextlib.AbstractContextManager:
        """The autocast region of every forward pass, training and prediction."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the device, in the memory format its inputs will have."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """x on the device; a CPU batch bound for CUDA goes through pinned memory and is copied with
        non_blocking=True, so the host goes on queueing work while the copy runs (the DataLoader pins the
        training batches already; prediction's batches are pinned here)."""
        if self.device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    def to_input(self, x: torch.Tensor, norm: dict, divisor: float = 255.0) -> torch.Tensor:
        """uint8 NCHW -> (x / divisor - mean) / std as float32 on the device, channels_last when the policy says so
        (else the layout as it comes: uint8 NHWC arrays permuted to NCHW are channels-last strided already).

        `norm` holds per-channel mean and std in the units of x / divisor (classification: [0, 1]
        with divisor 255; TinySSD: pixel values with divisor 1).
        """
        mean, std = _norm_tensors(tuple(norm["mean"]), tuple(norm["std"]), self.device)
        x = self.to_device(x).float()
        if divisor != 1:
            x = x.div_(divisor)
        out = (x - mean) / std
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out


@functools.lru_cache(maxsize=32)
def _norm_tensors(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation constants on the device, made once: a fresh torch.tensor(list, device=cuda) per batch is a
    copy from pageable host memory, which waits for the GPU's queue to drain (two stalls per batch)."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


def pick_device(name: str, key: str = "runtime.device") -> torch.device:
    """The device `name` (auto, cpu, cuda) asks for, this rank's GPU under torchrun; `key` is named in the error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{key}=cuda but no CUDA device is visible; use {key}=auto or cpu")
    return distributed.device_for(name)


def decide(device: torch.device, amp: bool, amp_dtype: str, channels_last: bool | None,
           track: Track) -> tuple[bool, torch.dtype, bool]:
    """(autocast on, its dtype, channels_last) for this device: autocast on CUDA only; channels_last as set,
    or by default on CUDA for classification and everywhere for detection (TinySSD's choice since its start)."""
    cuda = device.type == "cuda"
    if channels_last is None:
        channels_last = cuda or track == "detection"
    return amp and cuda, getattr(torch, amp_dtype), channels_last


def from_config(cfg: RuntimeConfig, track: Track) -> Runtime:
    """The Runtime of one track (training and prediction) from the runtime config section."""
    device = pick_device(cfg.device, "runtime.device")
    autocast, dtype, channels_last = decide(device, cfg.amp, cfg.amp_dtype, cfg.channels_last, track)
    return Runtime(device, autocast, dtype, channels_last, cfg.compile, loader_workers(cfg.num_workers, device),
                   cfg.eval_batch_factor)


MAX_WORKERS = 8


def cores_per_process() -> int:
    """The cores this process may use (its CPU affinity, which containers and SLURM set), shared by the
    processes torchrun starts on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def loader_workers(setting: int | str, device: torch.device) -> int:
    """DataLoader workers: the number set, or for auto on CUDA the cores per GPU less the one the training
    process needs (at most MAX_WORKERS); on the CPU auto is 0, because the model's own forward and backward
    passes already run on every core (torch's intra-op threads), and workers would take cores from them."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    return min(MAX_WORKERS, cores_per_process() - 1)


def result_keys(cfg: RuntimeConfig) -> dict:
    """The runtime keys that change what training produces, for the training fingerprints; device,
    threads, workers and the evaluation batch size do not and stay out (a CPU rerun reuses a GPU model)."""
    return cfg.model_dump(include={"amp", "amp_dtype", "channels_last", "compile"})


def set_threads(threads: int | None) -> None:
    """torch's CPU threads, when set (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def find_batch_size(try_batch: Callable[[int], None], start: int, say: Callable[[str], None] = print) -> int:
    """The largest batch from `start` down, halving, for which `try_batch(batch)` (a few training steps at that
    batch) does not run out of GPU memory, as Lightning's batch-size finder does; one line says what it chose."""
    batch, failed = start, None
    while True:
        try:
            try_batch(batch)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise PipelineError("train.batch_size=auto: one image does not fit in GPU memory; lower "
                                    "train.image_size or choose a smaller backbone") from None
            failed, batch = batch, batch // 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        why = f"{failed} ran out of GPU memory" if failed else "the largest tried"
        say(f"train: batch_size auto: {batch} ({why})")
        return batch


def peak_gpu_gb(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors on `device` since the process started (None off CUDA), in GiB."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
