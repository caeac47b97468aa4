"""Multi-process training under torchrun (DDP): set-up, rank checks, reductions.

`torchrun --nproc_per_node N -m pipeline train ...` starts N processes; each trains on its shard
of every batch order (DistributedSampler), gradients are averaged by DistributedDataParallel,
rank 0 alone writes files and prints, and training metrics are summed across ranks. NCCL on
CUDA, gloo on the CPU (which is how the tests run it).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return rank(), world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def reduction_device(backend: str) -> torch.device:
    """Where a collective's tensor must live: NCCL reduces CUDA tensors only (this rank's GPU), gloo CPU ones."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across(values: list[float]) -> list[float]:
    """Element-wise sum of a few numbers over all ranks (identity without a process group)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=reduction_device(dist.get_backend()))
    dist.all_reduce(t)
    return t.tolist()


def device_for(name: str) -> torch.device:
    """The rank's device: its own GPU under torchrun with CUDA, else the CPU."""
    if name != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def say(message: str) -> None:
    """print on rank 0 only."""
    if is_main():
        print(message)
